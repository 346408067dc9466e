"""Where the shipped workflows live. UI files (what the editor loads) are in example_workflows/,
which current ComfyUI serves as the pack's templates; their API twins (what `POST /prompt`
takes) are in api_workflows/, a folder the template browser does not list, since the editor
cannot open an API file."""
import glob
import os

PACK_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UI_DIR = os.path.join(PACK_ROOT, "example_workflows")
API_DIR = os.path.join(PACK_ROOT, "api_workflows")
# Workflows that need a current ComfyUI (Flux, ReferenceLatent): the installable host has neither.
CURRENT_HOST_ONLY = {"flux_msa_references": "Flux", "flux_kontext_foreground": "Flux Kontext",
                     "flux_two_subjects_routing": "Flux"}


def api_files():
    return sorted(glob.glob(os.path.join(API_DIR, "*_api.json")))


def ui_files():
    return sorted(glob.glob(os.path.join(UI_DIR, "*.json")))


def api_path(name):
    return os.path.join(API_DIR, f"{name}_api.json")


def ui_path(name):
    return os.path.join(UI_DIR, f"{name}.json")


def name_of(path):
    base = os.path.basename(path)
    return base[: -len("_api.json")] if base.endswith("_api.json") else base[: -len(".json")]


def needs_current_host(name):
    """Why a shipped workflow cannot run on the installable host, or None."""
    if name in CURRENT_HOST_ONLY:
        return (f"{name} uses {CURRENT_HOST_ONLY[name]}, which needs a current ComfyUI (run with "
                "MULTIREF_TEST_HOST=checkout COMFYUI_PATH=...)")
    return None


def thumbnail_path(name):
    """The template browser's picture of a UI file: the current editor asks the pack's
    template route for NAME.jpg beside NAME.json."""
    return os.path.join(UI_DIR, f"{name}.jpg")

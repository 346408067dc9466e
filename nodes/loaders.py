"""MultiRefAdapterLoader: loads an adapter file from models/multiref or models/ipadapter."""
import json
import logging
import os

from ..headless import model_files, shipped
from ..kernels import checkpoints

try:  # a ComfyUI checkout has a top-level folder_paths; the installable host has comfy.cmd's
    import folder_paths
except ImportError:
    from comfy.cmd import folder_paths

log = logging.getLogger("multiref")

# models/multiref is ours; models/ipadapter is where users already keep IP-Adapter files.
# Registering through folder_paths lets extra_model_paths.yaml add more folders for either name.
# Ours is created, so a new user finds where the files go.
ADAPTER_FOLDERS = model_files.FILE_INPUTS[("*", "adapter_name")]
for _name in ADAPTER_FOLDERS:
    folder_paths.add_model_folder_path(_name, os.path.join(folder_paths.models_dir, _name))
os.makedirs(os.path.join(folder_paths.models_dir, ADAPTER_FOLDERS[0]), exist_ok=True)


def adapter_files():
    names = []
    for folder in ADAPTER_FOLDERS:
        for name in folder_paths.get_filename_list(folder):
            if name.lower().endswith(checkpoints.ADAPTER_SUFFIXES) and name not in names:
                names.append(name)
    return sorted(names)


def resolve_adapter(name):
    path = _find_adapter(name)
    if path is None:
        raise checkpoints.CheckpointError(f"adapter_name: {_not_installed(name)}")
    return path


def _find_adapter(name):
    for folder in ADAPTER_FOLDERS:
        path = folder_paths.get_full_path(folder, name)
        if path and os.path.isfile(path):
            return path
    return None


def searched_folders():
    return [p for folder in ADAPTER_FOLDERS for p in folder_paths.get_folder_paths(folder)]


def _not_installed(name):
    return (f"file {name!r} not found. Searched: {', '.join(searched_folders())}. Put one of these "
            f"files there (any name, detected by its keys): {'; '.join(checkpoints.DOWNLOADS)}")


def note_missing_example_files():
    """One start-up log line naming the model files the shipped workflows use that are not
    installed, each with the folder it goes in (nothing when all are there)."""
    missing = {}
    for path in shipped.api_files():
        with open(path) as f:
            workflow = json.load(f)
        for item in model_files.missing_files(workflow, folder_paths, pictures=False):
            missing.setdefault(item.file_name, item.folders[0])
    if missing:
        log.warning("MultiRef: the example workflows use model files that are not installed: %s "
                    "(what to download: %s)",
                    "; ".join(f"{name} -> {folder}" for name, folder in missing.items()),
                    model_files.README_SECTION)


class MultiRefAdapterLoader:
    DESCRIPTION = ("Loads an image adapter: h94 IP-Adapter (base or Plus, SD1.5 or SDXL), "
                   "MIP-Adapter (model_sdxl.bin / model_sdxl_plus.bin, enables learned routing), "
                   "SynCD's sdxl_finetuned_20k.ckpt (fine-tuned IP layers + self-attention LoRA), "
                   "or an adapter or LoRA trained by this pack (multiref_adapter.safetensors, "
                   "multiref_lora.safetensors: the LoRA alone serves MultiRef Apply MSA). The "
                   "format is detected from the keys.")
    CATEGORY = "MultiRef"
    FUNCTION = "load"
    RETURN_TYPES = ("MULTIREF_ADAPTER",)
    OUTPUT_TOOLTIPS = ("the loaded adapter (image projection + per-layer image key/value "
                       "projections), for MultiRef Encode References and the apply nodes; a "
                       "LoRA-only file, for MultiRef Apply MSA only",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "adapter_name": (adapter_files(), {"tooltip":
                             "Adapter file (IP-Adapter, MIP-Adapter, SynCD, or trained by "
                             f"MultiRef Train). Put files in {' or '.join(searched_folders())} (folders "
                             "added for 'multiref'/'ipadapter' in extra_model_paths.yaml count "
                             "too), then refresh; what to download: "
                             f"{model_files.README_SECTION}."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, adapter_name):
        """Replaces the host's list check, whose message for a missing file is only
        "'name' not in []": ours names the folders searched and what to download."""
        return True if _find_adapter(adapter_name) else _not_installed(adapter_name)

    def load(self, adapter_name):
        path = resolve_adapter(adapter_name)
        adapter = checkpoints.load_adapter(path)
        log.info("MultiRefAdapterLoader: %s", adapter.describe())
        return (adapter,)


NODE_CLASS_MAPPINGS = {"MultiRefAdapterLoader": MultiRefAdapterLoader}
NODE_DISPLAY_NAME_MAPPINGS = {"MultiRefAdapterLoader": "MultiRef Adapter Loader"}

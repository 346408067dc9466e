"""MultiRefUnifiedLoader: picks the adapter file and its CLIP vision model for a preset and the
model's base family, from the usual folders and the published file names, and says exactly
which file is missing, where it goes and where to download it."""
import logging
import os
import re

import comfy.clip_vision

from ..kernels import checkpoints, weights_files
from . import loaders

log = logging.getLogger("multiref")

H94 = "https://huggingface.co/h94/IP-Adapter/resolve/main"
# CLIP vision models: the usual file name, how other names of the same model look, where from.
CLIP_VISION = {
    "ViT-H": ("CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors", r"vit.?h.?14",
              f"{H94}/models/image_encoder/model.safetensors (rename it)"),
    "ViT-bigG": ("CLIP-ViT-bigG-14-laion2B-39B-b160k.safetensors", r"vit.?bigg.?14",
                 f"{H94}/sdxl_models/image_encoder/model.safetensors (rename it)"),
}
# preset -> {family: (published adapter file, where to download it, CLIP vision model)};
# a family left out has no such file.
PRESETS = {
    "base": {"sd15": ("ip-adapter_sd15.safetensors", f"{H94}/models/", "ViT-H"),
             "sdxl": ("ip-adapter_sdxl_vit-h.safetensors", f"{H94}/sdxl_models/", "ViT-H")},
    "base ViT-bigG": {"sd15": ("ip-adapter_sd15_vit-G.safetensors", f"{H94}/models/", "ViT-bigG"),
                      "sdxl": ("ip-adapter_sdxl.safetensors", f"{H94}/sdxl_models/", "ViT-bigG")},
    "Plus": {"sd15": ("ip-adapter-plus_sd15.safetensors", f"{H94}/models/", "ViT-H"),
             "sdxl": ("ip-adapter-plus_sdxl_vit-h.safetensors", f"{H94}/sdxl_models/", "ViT-H")},
    "Plus face": {"sd15": ("ip-adapter-plus-face_sd15.safetensors", f"{H94}/models/", "ViT-H"),
                  "sdxl": ("ip-adapter-plus-face_sdxl_vit-h.safetensors", f"{H94}/sdxl_models/",
                           "ViT-H")},
    "full face": {"sd15": ("ip-adapter-full-face_sd15.safetensors", f"{H94}/models/", "ViT-H")},
    "MIP-Adapter Plus": {"sdxl": ("model_sdxl_plus.bin",
                                  "https://huggingface.co/hqhQAQ/MIP-Adapter/resolve/main/", "ViT-H")},
    "MIP-Adapter": {"sdxl": ("model_sdxl.bin",
                             "https://huggingface.co/hqhQAQ/MIP-Adapter/resolve/main/", "ViT-bigG")},
    "SynCD": {"sdxl": ("sdxl_finetuned_20k.ckpt",
                       "https://www.cs.cmu.edu/~syncd-project/assets/", "ViT-H")},
}


def _stem(name):
    """File names compare without folder, suffix, case and -/_ differences."""
    base = os.path.basename(name).lower()
    for suffix in checkpoints.ADAPTER_SUFFIXES:
        if base.endswith(suffix):
            base = base[:-len(suffix)]
            break
    return base.replace("-", "_")


def find_adapter(file_name, names):
    """The installed adapter file of this published name (any suffix), or None."""
    wanted = _stem(file_name)
    return next((n for n in names if _stem(n) == wanted), None)


def find_clip_vision(model, names):
    usual, pattern, _ = CLIP_VISION[model]
    found = [n for n in names if os.path.basename(n) == usual]
    found += [n for n in names if re.search(pattern, os.path.basename(n), re.IGNORECASE)]
    return found[0] if found else None


def missing_message(preset, family, adapter, clip):
    """One message naming every file the preset lacks (None when nothing is missing)."""
    file_name, source, clip_model = PRESETS[preset][family]
    lines = []
    if adapter is None:
        lines.append(f"adapter file {file_name} (or the same name ending in .bin/.safetensors) "
                     f"is not in {' or '.join(loaders.searched_folders())}; download "
                     f"{source}{file_name}")
    if clip is None:
        usual, _, download = CLIP_VISION[clip_model]
        lines.append(f"CLIP vision model {clip_model} file {usual} is not in "
                     f"{' or '.join(_clip_folders())}; download {download}")
    if not lines:
        return None
    return f"preset: '{preset}' for a {family.upper()} model needs " + "; ".join(lines)


def _clip_folders():
    return loaders.folder_paths.get_folder_paths("clip_vision")


def model_family(model):
    dims = checkpoints.cross_attention_dims(model.model.diffusion_model)
    contexts = sorted({context for context, _ in dims.values()})
    family = checkpoints.FAMILY_BY_CONTEXT_DIM.get(contexts[0]) if len(contexts) == 1 else None
    if family is None:
        raise ValueError(f"model: cross-attention context width {', '.join(map(str, contexts))} "
                         "is neither SD1.5 (768) nor SDXL (2048); connect an SD1.5 or SDXL model")
    return family


def load_clip_vision(path):
    weights_files.check(path, "clip_vision")  # the host may unpickle it without weights_only
    return comfy.clip_vision.load(path)


class MultiRefUnifiedLoader:
    DESCRIPTION = ("Loads the adapter of a preset for the connected model's base family (SD1.5 "
                   "or SDXL) and the CLIP vision model it was trained with, found by their "
                   "published file names in models/multiref, models/ipadapter and "
                   "models/clip_vision. A missing file is named with its folder and download.")
    CATEGORY = "MultiRef"
    FUNCTION = "load"
    RETURN_TYPES = ("MULTIREF_ADAPTER", "CLIP_VISION")
    OUTPUT_TOOLTIPS = ("the adapter, for MultiRef Encode References and the apply nodes",
                       "its CLIP vision model, for MultiRef Encode References")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The SD1.5 or SDXL model the adapter is for (its "
                                           "base family picks the file)."}),
            "preset": (list(PRESETS), {"default": "Plus", "tooltip":
                       "base / Plus / Plus face / full face (SD1.5): h94 IP-Adapter files; base "
                       "ViT-bigG: ip-adapter_sdxl / ip-adapter_sd15_vit-G; MIP-Adapter (Plus): "
                       "learned routing gate, SDXL; SynCD: SDXL, for Masked Shared Attention."}),
        }}

    def load(self, model, preset):
        if preset not in PRESETS:
            raise ValueError(f"preset: {preset!r} is not one of {list(PRESETS)}")
        family = model_family(model)
        if family not in PRESETS[preset]:
            made = ", ".join(f.upper() for f in PRESETS[preset])
            raise ValueError(f"preset: '{preset}' exists for {made} only, the model is "
                             f"{family.upper()}; pick another preset or connect a {made} model")
        file_name, _, clip_model = PRESETS[preset][family]
        adapter = find_adapter(file_name, loaders.adapter_files())
        clip = find_clip_vision(clip_model, loaders.folder_paths.get_filename_list("clip_vision"))
        message = missing_message(preset, family, adapter, clip)
        if message:
            raise checkpoints.CheckpointError(message)
        loaded = checkpoints.load_adapter(loaders.resolve_adapter(adapter))
        log.info("MultiRefUnifiedLoader: %s with CLIP vision %s", loaded.describe(), clip)
        return (loaded, load_clip_vision(loaders.folder_paths.get_full_path("clip_vision", clip)))


NODE_CLASS_MAPPINGS = {"MultiRefUnifiedLoader": MultiRefUnifiedLoader}
NODE_DISPLAY_NAME_MAPPINGS = {"MultiRefUnifiedLoader": "MultiRef Unified Loader"}

"""MultiRefAdapterLoader: loads an adapter file from models/multiref or models/ipadapter."""
import logging
import os

from ..kernels import checkpoints

try:  # a ComfyUI checkout has a top-level folder_paths; the installable host has comfy.cmd's
    import folder_paths
except ImportError:
    from comfy.cmd import folder_paths

log = logging.getLogger("multiref")

# models/multiref is ours; models/ipadapter is where users already keep IP-Adapter files.
# Registering through folder_paths lets extra_model_paths.yaml add more folders for either name.
ADAPTER_FOLDERS = ("multiref", "ipadapter")
for _name in ADAPTER_FOLDERS:
    folder_paths.add_model_folder_path(_name, os.path.join(folder_paths.models_dir, _name))


def adapter_files():
    names = []
    for folder in ADAPTER_FOLDERS:
        for name in folder_paths.get_filename_list(folder):
            if name.lower().endswith(checkpoints.ADAPTER_SUFFIXES) and name not in names:
                names.append(name)
    return sorted(names)


def resolve_adapter(name):
    for folder in ADAPTER_FOLDERS:
        path = folder_paths.get_full_path(folder, name)
        if path and os.path.isfile(path):
            return path
    searched = [p for folder in ADAPTER_FOLDERS for p in folder_paths.get_folder_paths(folder)]
    raise checkpoints.CheckpointError(
        f"adapter_name: file {name!r} not found. Searched: {', '.join(searched)}. Put one of "
        f"these files there (any name, detected by its keys): {'; '.join(checkpoints.DOWNLOADS)}")


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
                             "Adapter file in models/multiref or models/ipadapter (or folders "
                             "added for 'multiref'/'ipadapter' in extra_model_paths.yaml)."}),
        }}

    def load(self, adapter_name):
        path = resolve_adapter(adapter_name)
        adapter = checkpoints.load_adapter(path)
        log.info("MultiRefAdapterLoader: %s", adapter.describe())
        return (adapter,)


NODE_CLASS_MAPPINGS = {"MultiRefAdapterLoader": MultiRefAdapterLoader}
NODE_DISPLAY_NAME_MAPPINGS = {"MultiRefAdapterLoader": "MultiRef Adapter Loader"}

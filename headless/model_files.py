"""Which node inputs name a file on disk, and where the host looks for it: the one table the
headless runner (listing every missing file of a workflow before anything runs) and the pack
(its startup note on the example workflows, the adapter loader's tooltip) read.

Folder names are the host's folder_paths names; the first one is where a new file belongs.
Imports nothing: the host's folder_paths module is passed in."""
import os
from typing import NamedTuple

# (node class, input name) -> folder_paths names searched, in order; "*" = that input on any node.
FILE_INPUTS = {
    ("*", "ckpt_name"): ("checkpoints",),
    ("*", "vae_name"): ("vae",),
    ("*", "lora_name"): ("loras",),
    ("*", "unet_name"): ("unet",),
    ("*", "adapter_name"): ("multiref", "ipadapter"),
    ("*", "fusion_name"): ("multiref", "ipadapter"),
    ("CLIPVisionLoader", "clip_name"): ("clip_vision",),
    ("CLIPLoader", "clip_name"): ("clip",),
}
# Inputs naming a picture in the host's input/ folder.
PICTURE_INPUTS = {("LoadImage", "image"), ("LoadImageMask", "image")}
README_SECTION = "the README's 'Model files' section"


class MissingFile(NamedTuple):
    node_id: str
    class_type: str
    input_name: str
    file_name: str
    folders: tuple  # full paths searched; the first is where to put it
    kind: str  # the folder_paths name of the first folder, or "input" for a picture

    def line(self, place=None):
        return (f"{self.file_name} (node {self.node_id} {self.class_type}, {self.input_name}): "
                f"put it in {place or self.folders[0]}")


def folders_for(class_type, input_name):
    """The folder_paths names searched for this node input's file, or None if it names none."""
    return FILE_INPUTS.get((class_type, input_name)) or FILE_INPUTS.get(("*", input_name))


def missing_files(prompt, folder_paths, pictures=True):
    """Every file `prompt` names that the host would not find, in node order."""
    missing = []
    for node_id, node in prompt.items():
        kind = node.get("class_type")
        for name, value in (node.get("inputs") or {}).items():
            if not isinstance(value, str):
                continue  # a link, or not a file name
            folders = folders_for(kind, name)
            if folders:
                if not any(_known(folder_paths, f) and folder_paths.get_full_path(f, value)
                           for f in folders):
                    searched = tuple(p for f in folders if _known(folder_paths, f)
                                     for p in folder_paths.get_folder_paths(f))
                    missing.append(MissingFile(str(node_id), kind, name, value, searched,
                                               folders[0]))
            elif pictures and (kind, name) in PICTURE_INPUTS:
                if not os.path.isfile(folder_paths.get_annotated_filepath(value)):
                    missing.append(MissingFile(str(node_id), kind, name, value,
                                               (folder_paths.get_input_directory(),), "input"))
    return missing


def _known(folder_paths, folder):
    """The pack registers multiref/ipadapter when it loads; hosts rename a few (clip, unet)."""
    try:
        folder_paths.get_folder_paths(folder)
    except KeyError:
        return False
    return True

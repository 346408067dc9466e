"""The example reference pictures (example_inputs/) in ComfyUI's input folder, where Load Image
lists its files, so the shipped workflows run without hunting for pictures. Copied at pack load
under the names the workflows use (`multiref_<file>`); a file of that name already there is the
user's and is left as it is."""
import logging
import os
import shutil

from .loaders import folder_paths

log = logging.getLogger("multiref")

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "example_inputs")
PREFIX = "multiref_"
PICTURE_SUFFIXES = (".jpg", ".png")


def example_files():
    """{name in the input folder: path of the shipped file}."""
    return {PREFIX + name: os.path.join(EXAMPLES, name) for name in sorted(os.listdir(EXAMPLES))
            if name.endswith(PICTURE_SUFFIXES)}


def copy_to_input_folder(folder=None):
    """Copy each example picture missing from `folder` (default: the host's input folder);
    returns the names copied. Never overwrites; a folder that cannot be written is logged and
    left alone (the pack's nodes do not need the pictures)."""
    folder = folder or folder_paths.get_input_directory()
    copied, kept = [], []
    try:
        os.makedirs(folder, exist_ok=True)
        for name, source in example_files().items():
            target = os.path.join(folder, name)
            if os.path.exists(target):
                kept.append(name)
                continue
            shutil.copyfile(source, target + ".tmp")  # no half-written picture under the name
            os.replace(target + ".tmp", target)
            copied.append(name)
    except OSError as exc:
        log.warning("MultiRef: could not copy the example pictures into %s (%s); the shipped "
                    "workflows need them there: copy example_inputs/<file> as multiref_<file>",
                    folder, exc)
        return copied
    if copied:
        log.info("MultiRef: copied %d example picture(s) into %s: %s", len(copied), folder,
                 ", ".join(copied))
    if kept:
        log.info("MultiRef: kept %d file(s) already in %s under the example pictures' names: %s",
                 len(kept), folder, ", ".join(kept))
    return copied

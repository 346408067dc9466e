"""MultiRefSaveEncodedReferences / MultiRefLoadEncodedReferences: encoded references in a
safetensors file (kernels/encoded_files.py), written inside the host's output folder and read
from its input or output folder, so a reference is encoded once and reused."""
import logging
import os
import re

from ..kernels import encoded_files
from ..kernels.references import ReferenceInputError
from .loaders import folder_paths
from .output_folder import inside_output

log = logging.getLogger("multiref")

OUTPUT_MARK = " [output]"  # the host's annotation for a file of the output folder


def _inside(folder, path):
    """Whether `path`, links resolved, lies inside `folder` (links leading out count as out)."""
    root = os.path.realpath(folder)
    return os.path.commonpath([root, os.path.realpath(path)]) == root


def save_path(filename_prefix):
    """A new file `<output>/<prefix>_NNNNN_.references.safetensors`; the prefix may name
    subfolders inside the output folder, nothing outside it (nodes/output_folder.py)."""
    path = inside_output(filename_prefix.strip(), "filename_prefix", ReferenceInputError,
                         "'multiref/dog'")
    if path == os.path.realpath(folder_paths.get_output_directory()):
        raise ReferenceInputError(f"filename_prefix: {filename_prefix!r} names no file; give a "
                                  "name such as 'multiref/dog'")
    folder, stem = os.path.split(path)
    os.makedirs(folder, exist_ok=True)
    taken = [int(m.group(1)) for n in os.listdir(folder)
             for m in [re.fullmatch(re.escape(stem) + r"_(\d+)_" + re.escape(encoded_files.SUFFIX), n)] if m]
    return os.path.join(folder, f"{stem}_{max(taken, default=0) + 1:05d}_{encoded_files.SUFFIX}")


def saved_files():
    """Files of encoded references in the input folder (plain names) and the output folder
    (names marked ' [output]'), searched in subfolders too."""
    names = []
    for folder, mark in ((folder_paths.get_input_directory(), ""),
                         (folder_paths.get_output_directory(), OUTPUT_MARK)):
        for root, _, files in os.walk(folder, followlinks=False):
            for name in files:
                if name.endswith(encoded_files.SUFFIX):
                    rel = os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")
                    names.append(rel + mark)
    return sorted(names)


def resolve(reference_file):
    """The path of a listed name, confined to the input or output folder it names."""
    output = reference_file.endswith(OUTPUT_MARK)
    name = reference_file[:-len(OUTPUT_MARK)] if output else reference_file
    folder = folder_paths.get_output_directory() if output else folder_paths.get_input_directory()
    path = os.path.join(folder, name)
    if os.path.isabs(name) or not _inside(folder, path):
        raise ReferenceInputError(f"reference_file: {reference_file!r} is not inside the "
                                  f"{'output' if output else 'input'} folder {folder}")
    if not os.path.isfile(path):
        raise ReferenceInputError(
            f"reference_file: {name} is not in {folder}; copy the file there (names ending in "
            f"'{OUTPUT_MARK.strip()}' are read from the output folder, others from the input "
            "folder)")
    return path


class MultiRefSaveEncodedReferences:
    DESCRIPTION = ("Saves encoded references (tokens, uncond tokens, VAE latents, masks, phrases, "
                   "weights) to a safetensors file in the output folder, to reuse them in other "
                   "workflows or on other machines without encoding again.")
    CATEGORY = "MultiRef"
    FUNCTION = "save"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("reference_file",)
    OUTPUT_TOOLTIPS = ("the saved file as MultiRef Load Encoded References names it",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "references": ("MULTIREF_ENCODED", {"tooltip": "From MultiRef Encode References."}),
            "filename_prefix": ("STRING", {"default": "multiref/references", "tooltip":
                                "File name inside the output folder (subfolders allowed); a "
                                "counter and '.references.safetensors' are appended."}),
        }}

    def save(self, references, filename_prefix):
        if not references:
            raise ReferenceInputError("references: the list is empty; connect MultiRef Encode "
                                      "References")
        path = encoded_files.save(references, save_path(filename_prefix))
        name = os.path.relpath(path, folder_paths.get_output_directory()).replace(os.sep, "/")
        log.info("MultiRefSaveEncodedReferences: %d reference(s) -> %s", len(references), path)
        return {"ui": {"text": [name + OUTPUT_MARK]}, "result": (name + OUTPUT_MARK,)}


class MultiRefLoadEncodedReferences:
    DESCRIPTION = ("Loads references saved by MultiRef Save Encoded References (from the input "
                   "folder, or the output folder for names marked [output]); use them as MultiRef "
                   "Encode References' output, with the adapter they were encoded with.")
    CATEGORY = "MultiRef"
    FUNCTION = "load"
    RETURN_TYPES = ("MULTIREF_ENCODED",)
    OUTPUT_TOOLTIPS = ("the encoded references, for the MultiRef apply nodes",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "reference_file": (saved_files(), {"tooltip":
                               "A *.references.safetensors file in the input folder (copy files "
                               "from another machine there), or one this ComfyUI saved "
                               "([output]); refresh after adding one."}),
        }, "optional": {
            "adapter": ("MULTIREF_ADAPTER", {"tooltip": "Optional: checked now to be the adapter "
                                                        "the references were encoded with (the "
                                                        "apply nodes check it anyway)."}),
        }}

    def load(self, reference_file, adapter=None):
        encoded = encoded_files.load(resolve(reference_file))
        if adapter is not None and encoded[0].adapter_fingerprint != adapter.fingerprint:
            raise ReferenceInputError(
                f"adapter: {reference_file} was encoded with another adapter (fingerprint "
                f"{encoded[0].adapter_fingerprint}) than {adapter.describe()} (fingerprint "
                f"{adapter.fingerprint}); connect the adapter the references were encoded with, "
                "or encode them again with this one")
        log.info("MultiRefLoadEncodedReferences: %d reference(s) from %s", len(encoded),
                 reference_file)
        return (encoded,)


NODE_CLASS_MAPPINGS = {"MultiRefSaveEncodedReferences": MultiRefSaveEncodedReferences,
                       "MultiRefLoadEncodedReferences": MultiRefLoadEncodedReferences}
NODE_DISPLAY_NAME_MAPPINGS = {"MultiRefSaveEncodedReferences": "MultiRef Save Encoded References",
                              "MultiRefLoadEncodedReferences": "MultiRef Load Encoded References"}

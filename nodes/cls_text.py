"""MultiRefClsFusionLoader and MultiRefClsTextEncode: CLS-augmented text (MM-Diff), the
reference's CLIP class embedding fused into its entity word before the text encoder
(kernels/cls_text.py, families/cls_text.py)."""
import logging

import torch

from ..families import cls_text as host_cls_text
from ..kernels import cls_text
from . import loaders

log = logging.getLogger("multiref")


def fusion_files():
    return [name for name in loaders.adapter_files() if name.lower().endswith(".safetensors")]


def _not_installed(name):
    return (f"file {name!r} not found. Searched: {', '.join(loaders.searched_folders())}. Train a "
            "fusion with MultiRef Train (cls_text on) and copy multiref_cls_text.safetensors from "
            "its output folder there")


class MultiRefClsFusionLoader:
    DESCRIPTION = ("Loads a CLS text fusion (MM-Diff's MLP that fuses a reference's CLIP class "
                   "embedding into its entity word), as MultiRef Train writes it "
                   "(multiref_cls_text.safetensors, with cls_text on). Detected by its keys "
                   "(cls_text.*).")
    CATEGORY = "MultiRef"
    FUNCTION = "load"
    RETURN_TYPES = ("MULTIREF_CLS_FUSION",)
    OUTPUT_TOOLTIPS = ("the fusion, for MultiRef CLS Text Encode",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "fusion_name": (fusion_files(), {"tooltip":
                            "CLS text fusion file (multiref_cls_text.safetensors from a training "
                            f"run with cls_text on). Put it in {' or '.join(loaders.searched_folders())}, "
                            "then refresh."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, fusion_name):
        """A missing file named with the folders searched (the host's list check says only
        "'name' not in []")."""
        return True if loaders._find_adapter(fusion_name) else _not_installed(fusion_name)

    def load(self, fusion_name):
        path = loaders._find_adapter(fusion_name)
        if path is None:
            raise cls_text.CheckpointError(f"fusion_name: {_not_installed(fusion_name)}")
        fusion = cls_text.load(path)
        log.info("MultiRefClsFusionLoader: %s", fusion.describe())
        return (fusion,)


class MultiRefClsTextEncode:
    DESCRIPTION = ("Encodes the prompt with each reference's CLIP class embedding fused into its "
                   "entity word (MM-Diff's CLS-augmented text): the last token of the reference's "
                   "phrase in the prompt gets MLP([word ; projected class embedding]) in every "
                   "text encoder of the model; all other tokens stay as they are. 'delay' keeps "
                   "the plain prompt for the first part of sampling (MM-Diff's start step).")
    CATEGORY = "MultiRef"
    FUNCTION = "encode"
    RETURN_TYPES = ("CONDITIONING",)
    OUTPUT_TOOLTIPS = ("the positive conditioning (two timestep ranges when delay > 0), for any "
                       "sampler",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "clip": ("CLIP", {"tooltip": "The model's text encoder (SD1.5 or SDXL)."}),
            "text": ("STRING", {"multiline": True, "default": "", "tooltip":
                     "The prompt; each reference's phrase must appear in it (its last token is "
                     "the entity word that gets the reference's class embedding)."}),
            "references": ("MULTIREF_ENCODED", {"tooltip": "From MultiRef Encode References "
                           "(their phrases and CLIP class embeddings; weight 0 leaves one out)."}),
            "cls_fusion": ("MULTIREF_CLS_FUSION", {"tooltip": "From MultiRef CLS Fusion Loader "
                           "(trained for this model family and CLIP vision model)."}),
            "delay": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip":
                      "Share of sampling (from the start) that uses the plain prompt before the "
                      "augmented one takes over: 0 = augmented throughout; MM-Diff's start "
                      "step 10 of 50 is 0.2. Later steps settle details, earlier ones layout."}),
        }}

    def encode(self, clip, text, references, cls_fusion, delay):
        if not 0.0 <= delay <= 1.0:
            raise ValueError(f"delay: {delay} is outside 0..1; give the share of sampling that "
                             "uses the plain prompt")
        with torch.no_grad():
            tokens, replaced = host_cls_text.augmented_tokens(clip, text, references, cls_fusion)
            augmented = _entry(*host_cls_text.encode(clip, tokens))
            if delay == 0.0:
                return ([augmented],)
            plain = _entry(*host_cls_text.encode(clip, clip.tokenize(text)))
        log.info("MultiRefClsTextEncode: %d entity token(s) augmented, plain until %.2f",
                 len(next(iter(replaced.values()))), delay)
        if delay == 1.0:
            return ([plain],)
        plain[1].update(start_percent=0.0, end_percent=delay)
        augmented[1].update(start_percent=delay, end_percent=1.0)
        return ([plain, augmented],)


def _entry(cond, pooled):
    """One conditioning entry, as the host's text encode node makes it."""
    return [cond, {} if pooled is None else {"pooled_output": pooled}]


NODE_CLASS_MAPPINGS = {"MultiRefClsFusionLoader": MultiRefClsFusionLoader,
                       "MultiRefClsTextEncode": MultiRefClsTextEncode}
NODE_DISPLAY_NAME_MAPPINGS = {"MultiRefClsFusionLoader": "MultiRef CLS Fusion Loader",
                              "MultiRefClsTextEncode": "MultiRef CLS Text Encode"}

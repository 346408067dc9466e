"""A node that builds tiny random-weight models, so a machine without downloads can run a whole
workflow (the demo of run.py, the tests). Nothing it produces is a meaningful picture."""
import logging

from ..families import tiny_models

log = logging.getLogger("multiref")


class MultiRefTinyDemoModels:
    DESCRIPTION = ("Builds tiny models with RANDOM weights from ComfyUI's own classes (UNet, text "
                   "encoder, CLIP vision, VAE). For trying the node graph without downloads and "
                   "for tests: images it yields are noise, not art.")
    CATEGORY = "MultiRef/dev"
    FUNCTION = "build"
    RETURN_TYPES = ("MODEL", "CLIP", "VAE", "CLIP_VISION")
    OUTPUT_TOOLTIPS = ("tiny UNet (random weights)", "tiny text encoder (random weights)",
                       "tiny VAE (random weights)", "tiny CLIP vision model (random weights)")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "family": (["sd15", "sdxl"], {"default": "sd15", "tooltip":
                       "Shape of the tiny UNet: SD1.5-like (one text context) or SDXL-like (two "
                       "text encoders, size conditioning)."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1, "tooltip":
                     "Seed of the random weights (same seed, same models)."}),
        }}

    def build(self, family, seed):
        log.warning("MultiRefTinyDemoModels: building tiny models with RANDOM weights; outputs "
                    "show the pipeline works, not image quality")
        return (tiny_models.tiny_unet(family, seed), tiny_models.tiny_text_encoder(family, seed + 1),
                tiny_models.tiny_vae(seed + 2), tiny_models.tiny_clip_vision(seed + 3))


NODE_CLASS_MAPPINGS = {"MultiRefTinyDemoModels": MultiRefTinyDemoModels}
NODE_DISPLAY_NAME_MAPPINGS = {"MultiRefTinyDemoModels": "MultiRef Tiny Demo Models (random)"}

"""A node that builds tiny random-weight models, so a machine without downloads can run a whole
workflow (the demo of run.py, the tests). Nothing it produces is a meaningful picture."""
import logging

from ..families import tiny_dit_models, tiny_models

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
            "family": (["sd15", "sdxl", *tiny_dit_models.FAMILIES], {"default": "sd15", "tooltip":
                       "Shape of the tiny model: SD1.5-like UNet (one text context), SDXL-like "
                       "UNet (two text encoders, size conditioning), or (current ComfyUI only) a "
                       "Flux transformer with CLIP-L + T5 and the guidance embedding (flux; "
                       "Kontext is the same model with ReferenceLatent), Flux without it "
                       "(flux_schnell), or an SD3 MMDiT with CLIP-L + CLIP-G; the transformers "
                       "come with a 16-channel VAE."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1, "tooltip":
                     "Seed of the random weights (same seed, same models)."}),
        }}

    def build(self, family, seed):
        log.warning("MultiRefTinyDemoModels: building tiny models with RANDOM weights; outputs "
                    "show the pipeline works, not image quality")
        if family in tiny_dit_models.FAMILIES:
            return (tiny_dit_models.tiny_dit(family, seed),
                    tiny_dit_models.tiny_dit_text_encoder(family, seed + 1),
                    tiny_dit_models.tiny_vae16(seed + 2), tiny_models.tiny_clip_vision(seed + 3))
        return (tiny_models.tiny_unet(family, seed), tiny_models.tiny_text_encoder(family, seed + 1),
                tiny_models.tiny_vae(seed + 2), tiny_models.tiny_clip_vision(seed + 3))


class MultiRefTinyDemoAdapter:
    DESCRIPTION = ("Builds an image adapter with RANDOM weights (base IP-Adapter layout) shaped for "
                   "the given model and MultiRef Tiny Demo Models' CLIP vision, so the demo runs "
                   "every MultiRef node without an adapter download. For trying the graph and "
                   "for tests only.")
    CATEGORY = "MultiRef/dev"
    FUNCTION = "build"
    RETURN_TYPES = ("MULTIREF_ADAPTER",)
    OUTPUT_TOOLTIPS = ("a random-weight adapter for the tiny demo models, for MultiRef Encode "
                       "References and MultiRef Apply Adapter",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model from MultiRef Tiny Demo Models (the adapter "
                                           "gets one image layer per cross-attention)."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1, "tooltip":
                     "Seed of the random weights (same seed, same adapter)."}),
        }}

    def build(self, model, seed):
        log.warning("MultiRefTinyDemoAdapter: building an adapter with RANDOM weights")
        return (tiny_models.tiny_adapter(model, seed),)


NODE_CLASS_MAPPINGS = {"MultiRefTinyDemoModels": MultiRefTinyDemoModels,
                       "MultiRefTinyDemoAdapter": MultiRefTinyDemoAdapter}
NODE_DISPLAY_NAME_MAPPINGS = {"MultiRefTinyDemoModels": "MultiRef Tiny Demo Models (random)",
                              "MultiRefTinyDemoAdapter": "MultiRef Tiny Demo Adapter (random)"}

"""MultiRefEncodeReferenceLatents: references -> VAE latents and latent-grid masks only, for
Masked Shared Attention without an image adapter (Flux, whose MSA needs no adapter; or a UNet
without one). They carry no adapter tokens (and name no adapter), so they serve MSA only."""
import logging

import torch

from ..kernels.references import MASK_VALUES, EncodedReference, ReferenceInputError, latent_masks
from .references import LATENT_DOWNSCALE, center_crop, check_encoded, check_size, vae_latents

log = logging.getLogger("multiref")


class MultiRefEncodeReferenceLatents:
    DESCRIPTION = ("Encodes references for Masked Shared Attention only: VAE latents and masks on "
                   "the latent grid, no adapter or CLIP vision (Flux's MSA and Kontext mode need "
                   "none). For routing with an adapter use MultiRef Encode References.")
    CATEGORY = "MultiRef"
    FUNCTION = "encode"
    RETURN_TYPES = ("MULTIREF_ENCODED",)
    OUTPUT_TOOLTIPS = ("the encoded references (latents and masks), for MultiRef Apply MSA",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "references": ("MULTIREF_REFERENCES", {"tooltip": "From MultiRef Reference."}),
            "vae": ("VAE", {"tooltip": "The VAE of the model the references are used with."}),
            "mask_dilation": ("INT", {"default": 0, "min": 0, "max": 16, "tooltip":
                              "Grow each mask by this many latent pixels (8 image pixels each) to "
                              "keep object borders; SynCD uses about 1."}),
        }, "optional": {
            "mask_values": (list(MASK_VALUES), {"default": "binary", "tooltip":
                            "binary: a mask is cut at 0.5. soft: grey values are kept, and MSA "
                            "counts a token of value m e^(m-1) times (0 = left out)."}),
        }}

    def encode(self, references, vae, mask_dilation, mask_values="binary"):
        if not references:
            raise ReferenceInputError("references: the list is empty; connect a MultiRef Reference")
        for n, ref in enumerate(references, 1):
            check_size(ref, n, True)
        with torch.no_grad():
            encoded = tuple(encode_latents(ref, vae, mask_dilation, mask_values)
                            for ref in references)
        for n, enc in enumerate(encoded, 1):
            check_encoded(enc, n)
        log.info("MultiRefEncodeReferenceLatents: %d reference(s)", len(encoded))
        return (encoded,)


def encode_latents(ref, vae, mask_dilation, mask_values):
    views, height, width = ref.images.shape[:3]
    grid = (height // LATENT_DOWNSCALE, width // LATENT_DOWNSCALE)
    masks = None
    if ref.masks is not None:
        cropped = center_crop(ref.masks, grid[0] * LATENT_DOWNSCALE, grid[1] * LATENT_DOWNSCALE)
        masks = latent_masks(cropped, views, grid, mask_dilation, mask_values)
    latents = vae_latents(vae, ref.images)
    if tuple(latents.shape[-2:]) != grid:
        raise ReferenceInputError(f"vae: latents of {tuple(latents.shape[-2:])} for images of "
                                  f"{(height, width)}; connect a VAE with an 8x downscale")
    no_tokens = torch.zeros(1, 0, 1)
    return EncodedReference(image_tokens=no_tokens, uncond_tokens=no_tokens, latents=latents,
                            masks=masks, phrase=ref.phrase, weight=ref.weight,
                            start_percent=ref.start_percent, end_percent=ref.end_percent,
                            adapter_fingerprint="")


NODE_CLASS_MAPPINGS = {"MultiRefEncodeReferenceLatents": MultiRefEncodeReferenceLatents}
NODE_DISPLAY_NAME_MAPPINGS = {"MultiRefEncodeReferenceLatents":
                              "MultiRef Encode Latents (MSA)"}

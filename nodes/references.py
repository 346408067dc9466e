"""MultiRefReference (one object, chainable) and MultiRefEncodeReferences (CLIP vision + adapter
+ VAE -> what the patches consume)."""
import dataclasses
import hashlib
import logging

import torch

from ..families.flux import is_flux
from ..families.vision import encode_image, unconditional_tokens
from ..kernels import siglip_pooling
from ..kernels.adapter import HIDDEN_STATES
from ..kernels.flux_adapters import INSTANTX
from ..kernels.checkpoints import bind_to_unet
from ..kernels.embeds import COMBINATIONS, combine_views
from ..kernels.feature_fusion import FusionError, granularity_weights
from ..kernels.references import (MASK_VALUES, EncodedReference, Reference, ReferenceInputError,
                                  check_attention_mask, check_finite, latent_masks, square_tiles,
                                  tile_regions)
from .flux_routing import double_and_single_layers
from .loaders import folder_paths

log = logging.getLogger("multiref")

LATENT_DOWNSCALE = 8  # SD1.5 / SDXL VAEs
# Smallest reference side with a VAE or a mask: 2 latent cells (the VAE's 8x downscale of fewer
# pixels fails inside the host; one cell is no picture of an object anyway).
MIN_SIDE = 2 * LATENT_DOWNSCALE
VIEWS = ("same object", "one per batch image")


class MultiRefReference:
    DESCRIPTION = ("One reference object: one image or a batch of images showing the SAME object "
                   "from several views, an optional foreground mask, and the words for it in the "
                   "prompt. Chain several through 'previous' to give several objects.")
    CATEGORY = "MultiRef"
    FUNCTION = "make"
    RETURN_TYPES = ("MULTIREF_REFERENCES",)
    OUTPUT_TOOLTIPS = ("the list of references so far (this one last)",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE", {"tooltip": "Image(s) of the object; a batch = several views of "
                                           "the same object."}),
            "phrase": ("STRING", {"default": "", "tooltip":
                       "The object's words as written in the prompt, e.g. 'dog' (routing sends "
                       "this reference where these words are)."}),
            "weight": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 5.0, "step": 0.05, "tooltip":
                       "How strongly this reference acts (1 = as trained; 0 = off, left out "
                       "everywhere): multiplies the attention weights of its tokens. Adapter "
                       "nodes: its image attention (after its own softmax) times weight. Masked "
                       "Shared Attention: each foreground token counts weight times in the "
                       "softmax it shares with the image's own tokens."}),
            "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01,
                              "tooltip": "Sampling progress at which the reference starts acting."}),
            "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                            "tooltip": "Sampling progress at which it stops acting."}),
        }, "optional": {
            "mask": ("MASK", {"tooltip": "Foreground of the object (white = object), same size "
                                         "as the image; one per view or one for all. None = "
                                         "the whole image."}),
            "previous": ("MULTIREF_REFERENCES", {"tooltip": "References made so far, to chain "
                                                            "several objects."}),
            "negative_image": ("IMAGE", {"tooltip": "Optional: what this reference must not look "
                               "like (one image, or one per view); its adapter tokens replace the "
                               "'no image' tokens of the negative branch (IPAdapter's "
                               "image_negative)."}),
            "attention_mask": ("MASK", {"tooltip": "Optional: WHERE in the generated image this "
                               "reference acts (white = full strength, black = not at all), over "
                               "the output picture; one mask, or one per batch image (video "
                               "frames). IPAdapter's attn_mask; not the object mask above."}),
            "views": (list(VIEWS), {"default": VIEWS[0], "tooltip":
                      "same object: the images are views of one object, every generated image "
                      "reads all of them. one per batch image: image k conditions batch image k "
                      "only (a video's frames; IPAdapter Batch), one image serving every one; "
                      "routing only (Masked Shared Attention reads every view)."}),
        }}

    def make(self, image, phrase, weight, start_percent, end_percent, mask=None, previous=None,
             negative_image=None, attention_mask=None, views="same object"):
        if views not in VIEWS:
            raise ReferenceInputError(f"views: {views!r} is not one of {VIEWS}")
        if mask is not None and mask.ndim == 2:
            mask = mask.unsqueeze(0)
        if attention_mask is not None:
            attention_mask = attention_mask[None] if attention_mask.ndim == 2 else attention_mask
            check_attention_mask(attention_mask, "attention_mask")
            attention_mask = attention_mask.float().clamp(0, 1)
        ref = Reference(images=image, masks=mask, phrase=phrase.strip(), weight=float(weight),
                        start_percent=float(start_percent), end_percent=float(end_percent),
                        negative_images=negative_image, attention_mask=attention_mask,
                        one_view_per_image=views == VIEWS[1])
        return (tuple(previous or ()) + (ref,),)


def center_crop(x, height, width):
    """Crop (B, H, W, ...) to height x width around the centre, as the host's VAE encode does."""
    top, left = (x.shape[1] - height) // 2, (x.shape[2] - width) // 2
    return x[:, top:top + height, left:left + width]


class MultiRefEncodeReferences:
    DESCRIPTION = ("Encodes references once: CLIP vision -> the adapter's image tokens (all views "
                   "of an object concatenated), the adapter family's own 'no image' tokens for the "
                   "unconditional branch, "
                   "VAE latents (needed by Masked Shared Attention) and masks on the latent grid. "
                   "Checks that adapter, CLIP vision and model fit together before anything runs.")
    CATEGORY = "MultiRef"
    FUNCTION = "encode"
    RETURN_TYPES = ("MULTIREF_ENCODED",)
    OUTPUT_TOOLTIPS = ("the encoded references, for the MultiRef apply nodes",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "references": ("MULTIREF_REFERENCES", {"tooltip": "From MultiRef Reference."}),
            "adapter": ("MULTIREF_ADAPTER", {"tooltip": "From MultiRef Adapter Loader."}),
            "clip_vision": ("CLIP_VISION", {"tooltip": "The CLIP vision model the adapter was "
                            "trained with (ViT-H for Plus and *_vit-h files, ViT-bigG for "
                            "ip-adapter_sdxl / model_sdxl.bin; Flux: CLIP ViT-L/14 for XLabs "
                            "flux-ip-adapter)."}),
            "model": ("MODEL", {"tooltip": "The model the references will be used with (checked "
                                           "against the adapter's base family and layers; "
                                           "SD1.5, SDXL or Flux)."}),
            "mask_dilation": ("INT", {"default": 0, "min": 0, "max": 16, "tooltip":
                              "Grow each mask by this many latent pixels (8 image pixels each) to "
                              "keep object borders; SynCD uses about 1."}),
        }, "optional": {
            "vae": ("VAE", {"tooltip": "Encodes the views to latents for Masked Shared "
                                       "Attention; leave empty when only the adapter is used."}),
            "mask_values": (list(MASK_VALUES), {"default": "binary", "tooltip":
                            "binary: a mask is cut at 0.5 (object or not). soft: grey mask values "
                            "are kept, and Masked Shared Attention counts a token of value m "
                            "e^(m-1) times (SynCD's soft masks; 0 = left out)."}),
            "combine_views": (list(COMBINATIONS), {"default": "concat", "tooltip":
                              "How the views of one reference are combined: concat keeps every "
                              "view's tokens; add / average / norm average / subtract (first view "
                              "minus the mean of the others) combine their CLIP features into one "
                              "set of tokens (IPAdapter's combine_embeds)."}),
            "crop": (list(CROPS), {"default": "center", "tooltip":
                     "center: CLIP vision sees the centre square of each view (as before). tiles: "
                     "each view is cut into square tiles (2x2 for a nearly square view, up to 4 "
                     "along a long one), every tile encoded (IPAdapter Tiled's cut). tiles on "
                     "their regions: the same, each tile acting only on its part of the "
                     "generated image (the tiled picture stretched onto it), as IPAdapter Tiled "
                     "applies it; needs combine_views concat."}),
            "granularity": ("FLOAT", {"default": -1.0, "min": -1.0, "max": 1.0, "step": 0.05,
                            "tooltip": "For an adapter with feature fusion (several CLIP layers): "
                            "negative = the adapter's own router decides; 0 = fine detail (the "
                            "low-level expert) .. 0.5 (mid) .. 1 = coarse likeness (the high-level "
                            "expert), neighbouring levels blended in between. An adapter without "
                            "fusion needs the negative default."}),
            "siglip_head": (["none"] + siglip_files(), {"default": "none", "tooltip":
                            "InstantX Flux adapter only: the SigLIP so400m .safetensors file "
                            "(models/clip_vision) whose attention-pooling head gives the pooled "
                            "output the adapter reads; ComfyUI's SigLIP loader drops that head. "
                            "none for every other adapter."}),
        }}

    def encode(self, references, adapter, clip_vision, model, mask_dilation, vae=None,
               mask_values="binary", combine_views="concat", crop="center", granularity=-1.0,
               siglip_head="none"):
        if not references:
            raise ReferenceInputError("references: the list is empty; connect a MultiRef Reference")
        if combine_views not in COMBINATIONS:
            raise ReferenceInputError(f"combine_views: {combine_views!r} is not one of {COMBINATIONS}")
        if crop not in CROPS:
            raise ReferenceInputError(f"crop: {crop!r} is not one of {CROPS}")
        if crop == CROPS[2] and combine_views != "concat":
            raise ReferenceInputError(f"crop: '{crop}' keeps each tile's tokens for its region; "
                                      "set combine_views to 'concat' (or crop to 'tiles')")
        for n, ref in enumerate(references, 1):  # before any encoding
            check_size(ref, n, vae is not None)
        weights = fusion_weights(adapter, granularity)
        if siglip_head != "none":
            adapter = with_pooling_head(adapter, clip_vision, siglip_head)
        if is_flux(model):  # raises on any mismatch
            double_and_single_layers(model, adapter)
        else:
            bind_to_unet(adapter, model.model.diffusion_model)
        with torch.no_grad():
            encoded = tuple(self.encode_one(ref, adapter, clip_vision, vae, mask_dilation,
                                            mask_values, combine_views, crop, weights)
                            for ref in references)
        for n, enc in enumerate(encoded, 1):
            check_encoded(enc, n)
        log.info("MultiRefEncodeReferences: %d reference(s), %s", len(encoded),
                 ", ".join(f"{e.image_tokens.shape[1]} tokens" for e in encoded))
        return (encoded,)

    def encode_one(self, ref, adapter, clip_vision, vae, mask_dilation, mask_values="binary",
                   combine="concat", crop="center", weights=None):
        views, height, width = ref.images.shape[:3]
        grid = (height // LATENT_DOWNSCALE, width // LATENT_DOWNSCALE)
        masks = None
        if ref.masks is not None:  # first, so a bad mask fails before any encoding
            cropped = center_crop(ref.masks, grid[0] * LATENT_DOWNSCALE, grid[1] * LATENT_DOWNSCALE)
            masks = latent_masks(cropped, views, grid, mask_dilation, mask_values)
        output = encode_views(adapter, clip_vision, ref.images, crop)
        tokens = image_tokens(adapter, output, views, combine, weights)
        per_view = tokens.shape[1] // views  # tokens of one view (of its tiles, or the combined)
        if ref.negative_images is None:
            uncond = unconditional_tokens(adapter, clip_vision, weights)
            uncond = uncond.repeat(1, views * per_view // uncond.shape[1], 1)
        else:
            negatives = ref.negative_images
            negative = image_tokens(adapter, encode_views(adapter, clip_vision, negatives),
                                    negatives.shape[0], weights=weights)[0]
            negative = negative.reshape(negatives.shape[0], -1, negative.shape[-1])
            # One negative per view (or the one for all); combined views read the first, as
            # IPAdapter does; each tile of a view reads its view's negative.
            negative = negative[:1] if combine != "concat" else negative
            negative = negative.expand(views, -1, -1)
            uncond = negative.repeat(1, per_view // negative.shape[1], 1)
        uncond = uncond.reshape(1, -1, uncond.shape[-1])
        latents = vae_latents(vae, ref.images) if vae is not None else None
        if latents is not None and tuple(latents.shape[-2:]) != grid:
            raise ReferenceInputError(f"vae: latents of {tuple(latents.shape[-2:])} for images of "
                                      f"{(height, width)}; connect an SD1.5/SDXL VAE (8x downscale)")
        return EncodedReference(
            image_tokens=tokens, uncond_tokens=uncond,
            latents=latents, masks=masks, phrase=ref.phrase, weight=ref.weight,
            start_percent=ref.start_percent, end_percent=ref.end_percent,
            adapter_fingerprint=adapter.fingerprint, attention_mask=ref.attention_mask,
            class_embedding=class_embeddings(clip_vision, ref.images,
                                             output if crop == "center" else None),
            tokens_per_view=per_view if ref.one_view_per_image else None,
            **(tiles_on_regions(ref.images, tokens.shape[1] // views) if crop == CROPS[2] else {}))


CROPS = ("center", "tiles", "tiles on their regions")


def fusion_weights(adapter, granularity):
    """The (w_low, w_mid, w_high) of `granularity` (kernels.feature_fusion.granularity_weights),
    or None for a negative one: the fusion's router, or no fusion at all."""
    if granularity is None or granularity < 0:
        return None
    if adapter.fusion is None:
        raise ReferenceInputError(
            f"granularity: {granularity} asks for a mix of CLIP layers, but {adapter.describe()} has "
            "no feature fusion; set granularity to -1, or load an adapter trained with "
            "train_fusion (MultiRef Train)")
    try:
        return granularity_weights(granularity)
    except FusionError as exc:
        raise ReferenceInputError(str(exc)) from None


def siglip_files():
    return [n for n in folder_paths.get_filename_list("clip_vision")
            if n.lower().endswith(".safetensors")]


def with_pooling_head(adapter, clip_vision, name):
    """The InstantX adapter carrying SigLIP's attention-pooling head read from file `name`."""
    if getattr(adapter, "kind", None) != INSTANTX:
        raise ReferenceInputError(f"siglip_head: only the InstantX Flux adapter reads SigLIP's "
                                  f"pooled output, not {adapter.describe()}; set it to none")
    path = folder_paths.get_full_path("clip_vision", name)
    if not path:
        raise ReferenceInputError(f"siglip_head: {name!r} is not in models/clip_vision; put the "
                                  "SigLIP so400m model.safetensors there")
    layers = clip_vision.model.vision_model.encoder.layers
    return dataclasses.replace(adapter, pooling=siglip_pooling.load_head(
        path, layers[0].self_attn.heads))


def encode_views(adapter, clip_vision, images, crop="center"):
    """The host's CLIP vision output of the views (or of their square tiles), with what the
    adapter's feature fusion reads."""
    return encode_image(adapter, clip_vision,
                        images if crop == "center" else square_tiles(images))


def image_tokens(adapter, output, views, combine="concat", weights=None):
    """(1, V * n, C) the adapter's tokens of V views from their encoding `output`, view after view
    (n per view: its tokens, or those of each of its tiles). Combined views give one set of
    tokens, repeated for every view: attention over V copies of a set of keys and values gives
    what one copy gives, so the combination acts as IPAdapter's, and each view keeps tokens of its
    own (Masked Shared Attention's SynCD conditioning reads them view by view). weights: a
    feature fusion's override (None = its router)."""
    if combine != "concat":
        try:
            combined = {adapter.clip_input: combine_views(output[adapter.clip_input], combine)}
            if adapter.fusion is not None:  # each fused layer combined as the projection's input
                combined[HIDDEN_STATES] = {k: combine_views(v, combine)
                                           for k, v in output[HIDDEN_STATES].items()}
            output = combined
        except (KeyError, AttributeError):
            pass  # project names what is missing
    tokens = adapter.project(output, weights).float()
    if tokens.shape[0] == 1 and views > 1:
        tokens = tokens.expand(views, -1, -1)
    return tokens.reshape(1, -1, tokens.shape[-1])


def class_embeddings(clip_vision, images, output=None):
    """(V, D) CLIP vision's class embedding of each whole view (CLS-augmented text), or None
    when the encoder gives no pooled embedding (SigLIP). output: the views' encoding when the
    tokens were made from the whole views (else they are of tiles: the views are encoded here)."""
    if output is None:
        output = clip_vision.encode_image(images)
    embeds = output["image_embeds"]
    return embeds.float().cpu() if embeds.ndim == 2 else None


def tiles_on_regions(images, tokens_per_view):
    """The EncodedReference fields of a reference whose tiles act on their own regions."""
    regions = tile_regions(*images.shape[1:3])
    return {"tile_regions": regions, "tokens_per_tile": tokens_per_view // regions.shape[0]}


def check_size(ref, n, with_vae):
    """A named error before anything runs, instead of a division by zero inside the host's VAE."""
    height, width = ref.images.shape[1:3]
    needs = "the VAE" if with_vae else "its mask" if ref.masks is not None else None
    if needs and min(height, width) < MIN_SIDE:
        raise ReferenceInputError(
            f"reference {n} ('{ref.phrase}') image: {width}x{height} pixels is too small for "
            f"{needs}: references need at least {MIN_SIDE}x{MIN_SIDE} pixels ({MIN_SIDE // LATENT_DOWNSCALE}"
            f"x{MIN_SIDE // LATENT_DOWNSCALE} cells of the {LATENT_DOWNSCALE}x smaller latent grid), "
            "and show their object well from about 256 pixels; connect a larger picture (upscale "
            "this one with an Upscale Image node if it is all there is)")


def check_encoded(enc, n):
    """NaN out of an encoder would silently turn every sampled latent into NaN."""
    check_finite(enc.image_tokens, f"clip_vision / adapter (reference {n} '{enc.phrase}')",
                 "the CLIP vision model or the adapter file gives NaN for this image: load them "
                 "again (re-download a damaged file) or run them in float32")
    if enc.latents is not None:
        check_finite(enc.latents, f"vae (reference {n} '{enc.phrase}')",
                     "the VAE overflows (the SDXL VAE does in float16): start ComfyUI with "
                     "--fp32-vae (or --bf16-vae), or use an fp16-fixed SDXL VAE")


def vae_latents(vae, images):
    """The VAE's latents of `images`, identical on every call. The installable host's VAE draws
    a sample of its latent distribution from the global RNG, whose state depends on earlier
    prompts (samplers seed it); here the draw is seeded from the images themselves, inside a
    forked RNG that leaves the global stream as it was. Hosts that return the distribution's
    mean (current ComfyUI) give the same latents either way."""
    digest = hashlib.sha256(images.detach().float().cpu().contiguous().numpy().tobytes()).digest()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int.from_bytes(digest[:8], "little") % 2 ** 63)
        return vae.encode(images)


NODE_CLASS_MAPPINGS = {"MultiRefReference": MultiRefReference,
                       "MultiRefEncodeReferences": MultiRefEncodeReferences}
NODE_DISPLAY_NAME_MAPPINGS = {"MultiRefReference": "MultiRef Reference",
                              "MultiRefEncodeReferences": "MultiRef Encode References"}

"""Load the manifest's images once, encode them once (VAE latents, text, CLIP vision), and keep
only the encodings: the training loop never touches an image or an encoder again, so the
encoders can leave GPU memory before the first step.
"""
import logging
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..families.text import caption_phrase_rows
from ..kernels.msa import reference_prompt

log = logging.getLogger("multiref")


@dataclass
class EncodedGroup:
    """A group as the loop uses it (CPU tensors; the latent grid is resolution / 8)."""
    latent: torch.Tensor               # (C, h, w) in the model's latent space (process_latent_in)
    context: torch.Tensor              # (L, D) text tokens
    adm: Optional[torch.Tensor]        # (A,) SDXL pooled + size embedding, None for SD1.5
    ref_latents: torch.Tensor          # (K, C, h, w)
    ref_masks: torch.Tensor            # (K, h, w) 1 = object (foreground for MSA)
    ref_tokens: Optional[torch.Tensor] = None  # (K, T, C) adapter image tokens (frozen projection)
    phrases: tuple = ()                # (P_i, D) text embeddings of each reference's phrase
    ref_context: Optional[torch.Tensor] = None  # (K, L, D) text of each reference's prompt
    ref_adm: Optional[torch.Tensor] = None      # (K, A) its adm (SDXL), None for SD1.5
    ref_hidden: Optional[torch.Tensor] = None   # (K, 3, S, W) CLIP hidden states of the fusion's
                                                # levels (train_fusion: training/fusion.py)
    # CLS-augmented text (cls_text on): {"caption": str, "phrases": [str] (one per reference),
    # "class_embeddings": (K, D) CLIP vision's class embedding of each reference view}
    cls_text: Optional[dict] = None
    target_masks: Optional[torch.Tensor] = None  # (K, h, w) each reference's object in the target
    phrase_tokens: Optional[torch.Tensor] = None  # (K, L) 1 on the rows of `context` holding the
                                                 # reference's phrase (all 0: not found)


FIELDS = ("latent", "context", "adm", "ref_latents", "ref_masks", "ref_tokens", "phrases",
          "ref_context", "ref_adm", "ref_hidden", "cls_text", "target_masks", "phrase_tokens")


def to_tensors(encoded):
    """encode_groups' result as plain dicts/lists of tensors (torch.load(weights_only=True))."""
    groups, (context, adm), uncond = encoded
    return {"groups": [{f: getattr(g, f) for f in FIELDS} for g in groups],
            "empty_text": [context, adm], "uncond_tokens": uncond}


def from_tensors(data):
    # .get: caches written before ref_hidden or cls_text lack them
    groups = [EncodedGroup(**{f: (tuple(g[f]) if f == "phrases" else g.get(f)) for f in FIELDS})
              for g in data["groups"]]
    return groups, tuple(data["empty_text"]), data["uncond_tokens"]


def square_crop(img, resolution, resample):
    """Center crop to a square, then resize to resolution x resolution."""
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return img.crop((left, top, left + side, top + side)).resize((resolution, resolution), resample)


def load_image(path, resolution):
    """(H, W, 3) float in 0..1, the layout of a ComfyUI IMAGE."""
    with Image.open(path) as img:
        img = square_crop(img.convert("RGB"), resolution, Image.BICUBIC)
        return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)


def load_mask(path, resolution):
    """(H, W) float 0/1: gray above half = object; None path = everything is the object."""
    if path is None:
        return torch.ones(resolution, resolution)
    with Image.open(path) as img:
        img = square_crop(img.convert("L"), resolution, Image.NEAREST)
        return torch.from_numpy((np.asarray(img, dtype=np.float32) / 255.0 > 0.5).astype(np.float32))


def latent_mask(mask, latent_hw):
    """A pixel mask (H, W) at the latent grid: the fraction of object pixels per latent cell,
    binarized at half (the MSA layers resize this one further, nearest)."""
    cells = F.adaptive_avg_pool2d(mask[None, None], latent_hw)[0, 0]
    return (cells > 0.5).float()


class TextEncoder:
    """caption -> (context (L, D), adm (A,) or None), cached per caption."""

    def __init__(self, clip, base_model, resolution):
        self.clip, self.base_model, self.resolution = clip, base_model, resolution
        self.cache = {}

    def __call__(self, caption):
        if caption not in self.cache:
            cond, pooled = self.clip.encode_from_tokens(self.clip.tokenize(caption), return_pooled=True)
            adm = adm_of(self.base_model, pooled, self.resolution)
            self.cache[caption] = (cond[0].float().cpu(),
                                   None if adm is None else adm[0].float().cpu())
        return self.cache[caption]


def adm_of(base_model, pooled, resolution):
    """The model's adm conditioning (SDXL: pooled text + size embeddings at the training
    resolution, no crop), or None (SD1.5)."""
    r = resolution
    return base_model.encode_adm(pooled_output=pooled, width=r, height=r, crop_w=0, crop_h=0,
                                 target_width=r, target_height=r, device=torch.device("cpu"))


def encode_groups(groups, resolution, vae, clip, base_model, clip_vision=None, adapter=None,
                  fusion_levels=None, cls_text=False):
    """Encode every group once. Returns (encoded groups, (empty context, empty adm), uncond
    image tokens or None). With an adapter (which needs clip_vision), each reference also gets
    its image tokens (the adapter's frozen projection of its CLIP vision output, cached: it
    never trains) and its phrase embedding (for routing). fusion_levels (train_fusion): the
    tokens are the projection's alone, each reference also gets its hidden states of those
    levels, and the uncond entry is {"tokens", "hidden"} (training/fusion.py)."""
    text = TextEncoder(clip, base_model, resolution)
    encoded, phrases = [], {}
    uncond_tokens = None
    if adapter is not None:
        from ..families.vision import encode_image, unconditional_tokens
        from ..families.text import phrase_embeddings
        from . import fusion
        with torch.no_grad():
            # The adapter family's own "no image" (what sampling's uncond branch reads too).
            uncond_tokens = unconditional_tokens(adapter, clip_vision)[0].cpu() if not fusion_levels \
                else fusion.encode_uncond(adapter, clip_vision, fusion_levels)
    with torch.no_grad():
        for group in groups:
            views = [group.target] + [ref.view for ref in group.references]
            pixels = torch.stack([load_image(v.image, resolution) for v in views])
            latents = base_model.process_latent_in(vae.encode(pixels).float()).cpu()
            hw = latents.shape[-2:]
            masks = torch.stack([latent_mask(load_mask(v.mask, resolution), hw) for v in views[1:]])
            context, adm = text(group.caption)
            item = EncodedGroup(latents[0], context, adm, latents[1:], masks)
            # SynCD's reference-pass text of each reference (syncd reference conditioning).
            prompts = [text(reference_prompt(ref.phrase)) for ref in group.references]
            item.ref_context = torch.stack([c for c, _ in prompts])
            item.ref_adm = None if adm is None else torch.stack([a for _, a in prompts])
            # Where each object is, in the target and in the caption (the map constraints).
            item.target_masks = torch.stack([latent_mask(load_mask(
                ref.target_mask or group.target.mask, resolution), hw) for ref in group.references])
            item.phrase_tokens = torch.zeros(len(group.references), context.shape[0])
            for k, ref in enumerate(group.references):
                item.phrase_tokens[k, caption_phrase_rows(clip, group.caption, ref.phrase)] = 1.0
            if adapter is not None:
                vision = None
                if fusion_levels:
                    item.ref_tokens, item.ref_hidden = fusion.encode_references(
                        adapter, clip_vision, pixels[1:], fusion_levels)
                else:
                    vision = encode_image(adapter, clip_vision, pixels[1:])
                    item.ref_tokens = adapter.project(vision).float().cpu()
                if cls_text:
                    from ..families.cls_text import check_entities
                    check_entities(clip, group.caption, [r.phrase for r in group.references],
                                   f"cls_text: group {group.name}: a reference's")
                    if vision is None:  # the fusion path encoded without keeping the embeddings
                        vision = clip_vision.encode_image(pixels[1:])
                    item.cls_text = {"caption": group.caption,
                                     "phrases": [ref.phrase for ref in group.references],
                                     "class_embeddings": vision["image_embeds"].float().cpu()}
                for ref in group.references:
                    if ref.phrase not in phrases:
                        phrases[ref.phrase] = phrase_embeddings(clip, ref.phrase, group.name)
                item.phrases = tuple(phrases[ref.phrase] for ref in group.references)
            encoded.append(item)
    log.info("encoded %d training groups (%d images) at %dpx", len(encoded),
             sum(1 + len(g.references) for g in groups), resolution)
    return encoded, text(""), uncond_tokens

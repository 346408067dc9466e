"""Cross-attention map constraints in training (MM-Diff; the loss: kernels/attention_constraint.py).

At the constrained layers of the target pass, each object's attention map is pulled into the
object's mask in the target image:
  * text maps: the attention of the target's queries to the object's phrase tokens in the
    caption (the prompt's own cross-attention);
  * image maps: the share of the object's reference tokens in one softmax over all the group's
    reference image tokens, through the adapter's trained to_k_ip (needs an adapter).
The forward itself is unchanged (the fused kernels compute every output); the constrained layers
compute the probabilities a second time, explicitly, for the maps. Objects without a place to
be pulled to are left out: padding references, a dropped condition (text or image), a phrase not
found in the caption, a mask that covers all or none of the target.
The total loss: denoising + text_map_weight * text loss + image_map_weight * image loss, each
the mean over the constrained layers that computed it.
"""
from dataclasses import dataclass, field

import torch

from ..kernels import attention_constraint as kernel
from ..techniques import routing as routing_technique

LAYER_GROUPS = ("input", "middle", "output")
BATCH_KEYS = ("target_masks", "phrase_tokens", "text_valid", "image_valid")


def settings_problem(config):
    """What is wrong with the constraint settings (the message of a config.TrainConfigError),
    or None."""
    for name in ("text_map_weight", "image_map_weight"):
        value = getattr(config, name)
        if not isinstance(value, (int, float)) or value < 0:
            return f"{name} must be a number >= 0 (0 = off), got {value!r}"
    layers = config.map_layers
    if not isinstance(layers, (list, tuple)) or not layers or \
            any(layer not in LAYER_GROUPS for layer in layers):
        return (f"map_layers must be a non-empty list of layer groups out of "
                f"{list(LAYER_GROUPS)}, got {layers!r}")
    return None


ADAPTER_NEEDED = ("image_map_weight > 0 constrains the adapter's image attention: give an "
                  "adapter to train (and its clip_vision), or set it to 0")


@dataclass(frozen=True)
class MapSettings:
    """Which maps a run computes and at which layer groups."""
    layers: frozenset
    text: bool
    image: bool


def settings_of(config):
    """MapSettings of a training run, or None when both weights are 0 (the constraint is off and
    none of this module runs)."""
    if not (config.text_map_weight > 0 or config.image_map_weight > 0):
        return None
    return MapSettings(frozenset(config.map_layers), config.text_map_weight > 0,
                       config.image_map_weight > 0)


def row_targets(group, refs, drop_text, drop_image):
    """One batch row's entries of BATCH_KEYS for a dataset.EncodedGroup padded to `refs`
    references (padding: empty masks, no tokens, never valid). A group encoded without target
    masks or phrase positions (built in memory, e.g. by a benchmark) has no valid object."""
    k, pad = len(group.ref_latents), refs - len(group.ref_latents)
    masks, tokens = group.target_masks, group.phrase_tokens
    if masks is None:
        masks = group.ref_masks.new_zeros(k, *group.latent.shape[1:])
    if tokens is None:
        tokens = group.context.new_zeros(k, group.context.shape[0])
    coverage = masks.flatten(1).mean(1)
    placed = (coverage > 0) & (coverage < 1)
    found = tokens.sum(1) > 0
    pad_false = torch.zeros(pad, dtype=torch.bool)
    return {"target_masks": torch.cat([masks, masks.new_zeros(pad, *masks.shape[1:])]),
            "phrase_tokens": torch.cat([tokens, tokens.new_zeros(pad, tokens.shape[1])]),
            "text_valid": torch.cat([placed & found, pad_false]) & (not drop_text),
            "image_valid": torch.cat([placed, pad_false])
            & (not drop_image and group.ref_tokens is not None)}


@dataclass
class PassMaps:
    """One target pass: the batch's targets, and each constrained layer's terms as it runs."""
    settings: MapSettings
    masks: torch.Tensor          # (B, K, h, w) at the latent grid
    phrase_tokens: torch.Tensor  # (B, K, L)
    text_valid: torch.Tensor     # (B, K) bool
    image_valid: torch.Tensor    # (B, K) bool
    collected: list = field(default_factory=list)  # LayerTerms of the layers run so far

    @classmethod
    def of_batch(cls, settings, batch):
        return cls(settings, *(batch[key] for key in BATCH_KEYS))


@dataclass
class LayerTerms:
    """One layer's loss and share inside per map kind (None: not computed at this layer)."""
    text_loss: torch.Tensor = None
    text_share: torch.Tensor = None    # (B, K), no gradient
    image_loss: torch.Tensor = None
    image_share: torch.Tensor = None


def layer_terms(maps, attn, n, ctx, grid, heads, adapter_layer=None, image=None):
    """The terms of one cross-attention layer `attn` (queries from n, text keys from ctx, layer
    grid `grid`); the image maps when the layer has an adapter layer and the pass has image
    tokens (blocks.ImageCondition)."""
    terms = LayerTerms()
    q = attn.to_q(n)
    masks = kernel.masks_at_grid(maps.masks, grid)
    if maps.settings.text:
        a = kernel.object_maps(q, attn.to_k(ctx), heads, maps.phrase_tokens.transpose(1, 2))
        terms.text_loss = kernel.balanced_localization_loss(a, masks, maps.text_valid)
        terms.text_share = kernel.share_inside(a.detach(), masks)
    if maps.settings.image and adapter_layer is not None and image is not None:
        keys, _ = routing_technique.image_keys_values(adapter_layer, image.tokens.to(q.dtype))
        b, refs, count = keys.shape[:3]
        owner = torch.eye(refs, device=q.device).repeat_interleave(count, dim=0)  # (K*T, K)
        live = (image.weights > 0).to(q.device).repeat_interleave(count, dim=1)
        a = kernel.object_maps(q, keys.flatten(1, 2), heads, owner.expand(b, -1, -1), live)
        terms.image_loss = kernel.balanced_localization_loss(a, masks, maps.image_valid)
        terms.image_share = kernel.share_inside(a.detach(), masks)
    return terms


def pass_losses(maps):
    """(text loss, image loss): each the mean over the layers that computed it (None: none)."""
    def mean(values):
        values = [v for v in values if v is not None]
        return torch.stack(values).mean() if values else None
    return (mean([t.text_loss for t in maps.collected]),
            mean([t.image_loss for t in maps.collected]))


def pass_shares(maps):
    """{"text": ..., "image": ...}: (sum of the valid objects' shares inside, their count), each
    object's share the mean over the layers that computed it."""
    out = {}
    for kind, valid in (("text", maps.text_valid), ("image", maps.image_valid)):
        shares = [getattr(t, f"{kind}_share") for t in maps.collected]
        shares = [s for s in shares if s is not None]
        if shares:
            mean = torch.stack(shares).mean(0)
            out[kind] = (float((mean * valid).sum()), int(valid.sum()))
    return out

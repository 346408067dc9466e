"""How several views of one reference are combined before the adapter's image projection, and how
an image-attention strength scales the projected image keys and values (ComfyUI_IPAdapter_plus's
combine_embeds and embeds_scaling). Plain torch, no ComfyUI import."""
import torch
import torch.nn.functional as F

COMBINATIONS = ("concat", "add", "average", "norm average", "subtract")
SCALINGS = ("V only", "K+V", "K+V w/ C penalty", "K+mean(V) w/ C penalty")
# The C penalty divides the attention width by this (1280: SDXL's widest cross-attention).
PENALTY_WIDTH = 1280.0


def combine_views(features, how):
    """(V, ...) CLIP vision features of V views -> (V, ...) for "concat" (each view kept), or
    (1, ...) for the others, element by element over the views: add = sum, average = mean,
    norm average = mean of each view divided by the views' L2 norm of that element, subtract =
    the first view minus the mean of the others."""
    if how not in COMBINATIONS:
        raise ValueError(f"combine_views: {how!r} is not one of {COMBINATIONS}")
    if how == "concat" or features.shape[0] == 1:
        return features
    if how == "add":
        return features.sum(0, keepdim=True)
    if how == "average":
        return features.mean(0, keepdim=True)
    if how == "norm average":
        return (features / features.norm(dim=0, keepdim=True)).mean(0, keepdim=True)
    return features[:1] - features[1:].mean(0, keepdim=True)


def scale_keys_values(keys, values, weight, how, counts=None, groups=None):
    """The image keys and values (..., N, T, C) of N references (T tokens each, zero padding after
    counts[i] real ones) scaled by an attention strength `weight`, and the factor left for the
    attention output. "V only": unchanged, the output is multiplied by `weight`. "K+V": keys and
    values times `weight`. The "C penalty" forms first multiply `weight` by C / 1280 (C = the
    layer's width). "K+mean(V)": values keep their deviation from their mean over the
    reference's tokens and only the mean is scaled: v - m + m * weight; with `groups` (N, T)
    (each token's group inside its reference: views or tiles that act apart), the mean of the
    token's own group."""
    if how not in SCALINGS:
        raise ValueError(f"embeds_scaling: {how!r} is not one of {SCALINGS}")
    if how == "V only":
        return keys, values, weight
    if "C penalty" in how:
        weight = weight * keys.shape[-1] / PENALTY_WIDTH
    if how != "K+mean(V) w/ C penalty":
        return keys * weight, values * weight, 1.0
    tokens = values.shape[-2]
    counts = torch.as_tensor(counts if counts is not None else [tokens] * values.shape[-3],
                             device=values.device)
    real = (torch.arange(tokens, device=values.device)[None] < counts[:, None]).to(values.dtype)
    if groups is None:
        groups = torch.zeros(values.shape[-3], tokens, dtype=torch.long)
    # (N, T, G): which real tokens each group averages.
    members = F.one_hot(groups.to(values.device)).to(values.dtype) * real[..., None]
    sums = torch.einsum("...ntc,ntg->...ngc", values, members)
    group_means = sums / members.sum(-2)[..., None].clamp_min(1)
    mean = torch.einsum("ntg,...ngc->...ntc", members, group_means)
    return keys * weight, (values - mean + mean * weight) * real[..., None], 1.0


def output_scale(weight, how):
    """What is left to multiply the image attention's output by after scale_keys_values."""
    return weight if how == "V only" else 1.0

"""Masked Shared Attention (SynCD; docs/ARCHITECTURE.md, Masked Shared Attention) with key
compaction.

A reading row attends to [its own tokens | the foreground tokens of every reference] of the same
self-attention layer. The mask depends only on the key, so instead of a masked attention over
all reference tokens (a bias of -inf on the background), the foreground keys/values are gathered
once per layer call and one unmasked fused `scaled_dot_product_attention` runs over the shorter
key sequence: the same softmax, at (1 + K x foreground fraction) x the cost of plain attention.
Plain torch; no host import.
"""
import struct

import torch
import torch.nn.functional as F

from .routing import merged_reference_attention

# How the reference rows (the references' own pass) are conditioned:
#   syncd: SynCD's reference pass (syncd method/sample.py, pipeline.py __call__, data.py
#     DummyDataset): each reference reads the text reference_prompt(its phrase) in the branch with
#     text, the negative text in the image-only branch, and the adapter's image attention at
#     REFERENCE_IP_SCALE with its OWN image tokens; its LoRA stays off.
#   target_text: the rows reuse the first target row's text and get no image attention.
REFERENCE_CONDITIONINGS = ("syncd", "target_text")
REFERENCE_IP_SCALE = 1.0  # SynCD's reference pass: change_ipadapter_scale(1.0)


class MaskShapeError(ValueError):
    """A mask cannot be placed on the grid it was given for; the message names the fix."""


def resize_mask_values(masks, height, width):
    """(R, H, W) reference masks -> (R, height * width) float values, nearest resampling.
    A token of value m > 0 is foreground; soft values weigh it (reference_bias)."""
    if masks.ndim != 3:
        raise MaskShapeError(f"masks must be (rows, height, width), got {tuple(masks.shape)}")
    return F.interpolate(masks[:, None].float(), size=(height, width), mode="nearest")[:, 0].flatten(1)


def resize_masks(masks, height, width):
    """(R, H, W) masks (any dtype, 1 = foreground) -> (R, height * width) bool, nearest
    resampling (a foreground token stays a whole token, as SynCD's per-layer downsampling)."""
    return resize_mask_values(masks, height, width) > 0.5


def foreground_index(fg):
    """(R, N) bool foreground -> flat indices into the (R * N) reference tokens, reference after
    reference. Computed once per mask and grid (it syncs the device), then reused every step."""
    return fg.reshape(-1).nonzero().squeeze(1)


def gather_foreground(x, index):
    """(R, N, C) reference keys or values -> (M, C): the foreground tokens only."""
    return x.reshape(-1, x.shape[-1]).index_select(0, index)


def _split_heads(x, heads):
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)


def shared_attention(q, k, v, k_fg, v_fg, heads, fg_bias=None):
    """Every row of q (B, N, C) attends to [its own k, v | k_fg, v_fg] with one unmasked fused
    attention. k_fg, v_fg: (M, C) shared by all rows, or (B, M, C) one set per row.
    fg_bias: optional (M,) logit offsets of the foreground tokens, log(weight) of the reference
    each token comes from: a token of a reference with weight w counts as w tokens in the
    softmax. Only then does the attention carry a (broadcast) bias."""
    b, n, c = q.shape
    if k_fg.ndim == 2:
        k_fg, v_fg = k_fg.expand(b, -1, -1), v_fg.expand(b, -1, -1)
    keys = torch.cat([k, k_fg.to(k.dtype)], dim=1)
    values = torch.cat([v, v_fg.to(v.dtype)], dim=1)
    bias = None
    if fg_bias is not None:
        bias = torch.cat([fg_bias.new_zeros(k.shape[1]), fg_bias]).to(q.dtype)[None, None, None]
    out = F.scaled_dot_product_attention(_split_heads(q, heads), _split_heads(keys, heads),
                                         _split_heads(values, heads), attn_mask=bias)
    return out.transpose(1, 2).reshape(b, n, c)


def reference_bias(row_weights, tokens_per_row, index, mask_values=None):
    """(R,) weights of the reference rows -> (M,) log-weight of each foreground token picked by
    `index` (foreground_index over rows of `tokens_per_row` tokens); None when every weight is 1
    and every picked token's mask value is 1 (the unbiased fused attention).
    mask_values: optional (R * tokens_per_row,) mask value m of every reference token; a token
    counts e^(m - 1) times (SynCD adds the mask to the logits, its target tokens getting 1)."""
    bias = None
    if not bool((row_weights == 1).all()):
        bias = row_weights.log().repeat_interleave(tokens_per_row).index_select(0, index)
    if mask_values is not None:
        picked = mask_values.index_select(0, index)
        if not bool((picked == 1).all()):
            bias = picked - 1 if bias is None else bias + (picked - 1)
    return bias


def batch_shared_attention(q, k, v, fg, heads):
    """The images of one batch share their foreground with each other (SynCD's consistent
    multi-image generation): row i attends to [its own tokens | the foreground tokens of every
    other row]. fg: (B, N) bool. Each row has its own key set, so rows run one by one."""
    b = q.shape[0]
    if b < 2:
        return shared_attention(q, k, v, k[0, :0], v[0, :0], heads)
    outs = []
    for i in range(b):
        others = [j for j in range(b) if j != i]
        index = foreground_index(fg[others])
        k_fg, v_fg = gather_foreground(k[others], index), gather_foreground(v[others], index)
        outs.append(shared_attention(q[i:i + 1], k[i:i + 1], v[i:i + 1], k_fg, v_fg, heads))
    return torch.cat(outs, dim=0)


def blend(plain, shared, strength):
    """Strength 0 returns the plain tensor itself (bit-identical), 1 the shared result; in
    between a linear blend of the two attention outputs."""
    if strength == 0.0:
        return plain
    if strength == 1.0:
        return shared
    return torch.lerp(plain, shared.to(plain.dtype), strength)


def step_noise(shape, sigma, seed=0):
    """Fresh noise for the reference latents at one step, reproducible: seeded by the step's
    sigma, so every UNet call of the same step (the host may split cond and uncond into two
    calls) re-noises the references identically and a rerun gives the same image."""
    sigma_bits = struct.unpack("<q", struct.pack("<d", float(sigma)))[0]
    generator = torch.Generator().manual_seed((seed * 1_000_003 + sigma_bits) % (2 ** 63))
    return torch.randn(shape, generator=generator)


def fit_to_grid(latents, masks, height, width):
    """Reference latents (V, C, h, w) and masks (V, h, w) brought to the target's latent grid, so
    the reference rows can ride in the target's batch: latents bilinear (antialiased when
    shrinking), masks nearest."""
    if tuple(latents.shape[-2:]) == (height, width):
        return latents, masks
    latents = F.interpolate(latents.float(), size=(height, width), mode="bilinear",
                            antialias=True, align_corners=False).to(latents.dtype)
    if masks is not None:
        masks = F.interpolate(masks[:, None].float(), size=(height, width), mode="nearest")[:, 0]
    return latents, masks


def otsu_threshold(values, bins=256):
    """Otsu's threshold of a 1-D tensor: the histogram cut that maximizes the between-class
    variance w0 * w1 * (m0 - m1)^2; values >= the threshold are the upper class."""
    values = values.float().flatten()
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return low  # a flat map locates nothing: everything is the upper class
    hist = torch.histc(values, bins, low, high).double()
    width = (high - low) / bins
    centers = low + width * (torch.arange(bins, dtype=torch.float64) + 0.5)
    w0 = hist.cumsum(0)[:-1]
    w1 = hist.sum() - w0
    mass0 = (hist * centers).cumsum(0)[:-1]
    m0 = mass0 / w0.clamp(min=1)
    m1 = ((hist * centers).sum() - mass0) / w1.clamp(min=1)
    between = torch.where((w0 > 0) & (w1 > 0), w0 * w1 * (m0 - m1) ** 2, -1.0)
    return low + width * (int(between.argmax()) + 1)


def phrase_masks(maps, dilation=1):
    """(B, H, W) cross-attention maps of an object's phrase -> (B, H, W) float {0, 1} foreground:
    Otsu threshold per image, then grown by `dilation` cells (SynCD's data generation: Otsu,
    then a 3x3 dilation)."""
    masks = torch.stack([(m >= otsu_threshold(m)).float() for m in maps])
    if dilation > 0:
        size = 2 * dilation + 1
        masks = F.max_pool2d(masks[:, None], size, stride=1, padding=dilation)[:, 0]
    return masks


def reference_prompt(phrase):
    """The text a reference is conditioned on in SynCD's sampling ("photo of a {category}")."""
    return f"photo of a {phrase}"


def repeat_to_length(context, length):
    """(R, L, C) text tokens repeated to `length` tokens, so they batch with a longer prompt.
    Exact: attention over every key repeated n times equals attention over the keys once."""
    if length % context.shape[1]:
        raise ValueError(f"the reference text has {context.shape[1]} tokens and the prompt "
                         f"{length}; no whole repetition fits (prompts are made of 77-token "
                         "chunks: encode the prompt with the model's own text encoder)")
    return context.repeat(1, length // context.shape[1], 1)


def with_pooled(adm, pooled):
    """(R, A) SDXL adm vectors with their leading pooled-text part replaced by `pooled` (R or 1,
    P):
    the reference rows keep the target's size conditioning and read their own text's pooled
    embedding (SDXL's adm is [pooled text | size embeddings])."""
    return torch.cat([pooled.to(adm).expand(adm.shape[0], -1), adm[:, pooled.shape[-1]:]], dim=1)


def reference_image_attention(q, text_out, ip_keys, ip_values, heads):
    """A reference row's cross-attention in SynCD's reference pass: its text attention plus
    REFERENCE_IP_SCALE x plain IP-Adapter attention over its own image tokens.
    q, text_out: (R, N, C); ip_keys, ip_values: (R, T, C) projected tokens, one set per row."""
    image = merged_reference_attention(q, ip_keys[:, None], ip_values[:, None], heads, None)
    return text_out + REFERENCE_IP_SCALE * image

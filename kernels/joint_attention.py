"""Masked Shared Attention in a joint text+image sequence (Flux / MM-DiT). Plain torch.

q, k, v are (B, H, L, D) after RoPE, the sequence [text (T) | image (N) | ...], as the host's
joint attention gets them; outputs are (B, H, L, D) in the same order.

Two forms, both by key compaction (the background keys are dropped before one unmasked, or
log-weight-biased, fused attention per query group; no L x L mask is built):
- `reading_rows_attention`: reference tokens come from other rows of the batch (gathered,
  foreground only, positions shifted by kernels/rope_positions.py). The image queries read
  [own text | own image | reference foreground]; the text queries read their own row only.
- `kontext_attention`: the references are already in the sequence after the target (core
  ReferenceLatent). Target image queries read [text | target | references' foreground] with a
  per-reference log-weight; text queries read everything (unchanged); reference queries read
  [text | references], the target too unless `block_reference_to_target`.
"""
import torch
import torch.nn.functional as F


def _attend(q, keys, values, bias=None):
    """bias: (K,) logit offsets of the keys, the same for every query (broadcast)."""
    mask = None if bias is None else bias.to(q.dtype)[None, None, None]
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)


def _with_bias(own_keys, fg_bias):
    """(K_own + M,) logit offsets: 0 on the own keys, fg_bias on the foreground ones."""
    if fg_bias is None:
        return None
    return torch.cat([fg_bias.new_zeros(own_keys), fg_bias])


def reading_rows_attention(q, k, v, text_len, k_fg, v_fg, fg_bias=None):
    """Rows of q read their own sequence; their image queries also read k_fg, v_fg
    ((B, H, M, D) or (H, M, D) shared by all rows). fg_bias: (M,) log-weights or None."""
    b = q.shape[0]
    if k_fg.ndim == 3:
        k_fg, v_fg = k_fg.expand(b, -1, -1, -1), v_fg.expand(b, -1, -1, -1)
    text = _attend(q[:, :, :text_len], k, v)
    keys = torch.cat([k, k_fg.to(k.dtype)], dim=2)
    values = torch.cat([v, v_fg.to(v.dtype)], dim=2)
    image = _attend(q[:, :, text_len:], keys, values, _with_bias(k.shape[2], fg_bias))
    return torch.cat([text, image], dim=2)


def kontext_bias(reference_lens, foreground, weights):
    """Index of the kept reference keys (into the reference part of the sequence) and their
    log-weights (None when every kept weight is 1). foreground: (sum(reference_lens),) bool;
    weights: one per reference, > 0."""
    weights = torch.as_tensor(weights, dtype=torch.float64)
    if bool((weights <= 0).any()):
        raise ValueError("reference weights must be > 0 (leave a reference out instead)")
    index = foreground.nonzero().squeeze(1)
    per_token = weights.repeat_interleave(torch.as_tensor(reference_lens))
    bias = None if bool((weights == 1).all()) else per_token.log().index_select(0, index)
    return index, bias


def restricts(foreground, weights, block_reference_to_target):
    """False when kontext_attention would equal plain joint attention: every reference token is
    foreground, every weight is 1 and references may read the target. The caller then runs the
    host's attention unchanged (exactly core ReferenceLatent)."""
    return block_reference_to_target or not bool(foreground.all()) or any(w != 1 for w in weights)


def kontext_attention(q, k, v, text_len, target_len, reference_lens, foreground, weights,
                      block_reference_to_target=True):
    """Joint attention over [text | target | references...] with the target's image queries
    restricted to the references' foreground (log-weighted per reference) and, optionally, the
    references kept from reading the target."""
    split = text_len + target_len
    if q.shape[2] != split + sum(reference_lens):
        raise ValueError(f"sequence of {q.shape[2]} tokens is not text {text_len} + target "
                         f"{target_len} + references {list(reference_lens)}")
    index, fg_bias = kontext_bias(reference_lens, foreground, weights)
    text = _attend(q[:, :, :text_len], k, v)
    k_fg = k[:, :, split:].index_select(2, index)
    v_fg = v[:, :, split:].index_select(2, index)
    target = _attend(q[:, :, text_len:split], torch.cat([k[:, :, :split], k_fg], dim=2),
                     torch.cat([v[:, :, :split], v_fg], dim=2), _with_bias(split, fg_bias))
    if block_reference_to_target:
        keep = torch.cat([torch.arange(text_len), torch.arange(split, q.shape[2])]).to(q.device)
        references = _attend(q[:, :, split:], k.index_select(2, keep), v.index_select(2, keep))
    else:
        references = _attend(q[:, :, split:], k, v)
    return torch.cat([text, target, references], dim=2)

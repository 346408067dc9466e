"""Masked Shared Attention (SynCD) as one technique, run by the sampling patch (nodes/msa.py) and
by the trainer (training/blocks.py) alike: what a self-attention layer does to its rows.

  * the target rows' q, k, v (and the output projection) get the adapter's self-attention LoRA
    (`with_lora`, `lora_output`); the reference rows' own attention does not (SynCD's reference
    pass runs without it);
  * a reading row attends to [its own tokens | the foreground tokens of its references at the
    same layer] (`read_references`), the references' keys/values projected with the LoRA on
    (SynCD's target pass projects the cached reference inputs with it: that LoRA is what trains).

`lora` is a mapping {to_q, to_k, to_v, to_out: delta(x)} (a LoRA delta in x's dtype) or None.
The math (key compaction, the weight bias) is kernels/msa.py.
"""
import torch

from ..kernels import joint_attention, msa, rope_positions


def with_lora(q, k, v, n, lora, rows):
    """q, k, v of one self-attention call with the LoRA deltas of its input n added on the first
    `rows` rows (the target rows; reference rows come after them)."""
    if lora is None:
        return q, k, v
    n = n[:rows]
    return tuple(_add_to_rows(x, lora[name](n), rows)
                 for x, name in ((q, "to_q"), (k, "to_k"), (v, "to_v")))


def _add_to_rows(x, delta, rows):
    """x with delta added to its first `rows` rows (no copy of the rest when it is all rows)."""
    if rows == x.shape[0]:
        return x + delta.to(x.dtype)
    return torch.cat([x[:rows] + delta.to(x.dtype), x[rows:]])


def lora_output(projected, attention_out, lora, rows):
    """The output projection's result with the to_out LoRA delta of the first `rows` rows."""
    if lora is None:
        return projected
    return _add_to_rows(projected, lora["to_out"](attention_out[:rows]), rows)


def read_references(q, k, v, heads, ref_k, ref_v, index, bias=None, lora=None, ref_n=None):
    """Masked Shared Attention of reading rows q, k, v (B, L, C): each attends to [its own
    tokens | the foreground tokens of the reference rows ref_k, ref_v (R, L_ref, C), picked by
    `index` (kernels.msa.foreground_index)]. bias: the foreground tokens' log-weights or None.
    With a LoRA, ref_k/ref_v are the references' projections without it and ref_n their
    self-attention inputs: the LoRA deltas of the gathered inputs are added."""
    k_fg, v_fg = msa.gather_foreground(ref_k, index), msa.gather_foreground(ref_v, index)
    if lora is not None:
        n_fg = msa.gather_foreground(ref_n, index)
        k_fg = k_fg + lora["to_k"](n_fg).to(k_fg.dtype)
        v_fg = v_fg + lora["to_v"](n_fg).to(v_fg.dtype)
    return msa.shared_attention(q, k, v, k_fg, v_fg, heads, bias)


def plain_attention(q, k, v, heads):
    """Self-attention with no reference: the shared attention over an empty foreground."""
    return msa.shared_attention(q, k, v, k[:, :0], v[:, :0], heads)


def read_references_joint(q, k, v, text_len, ref_k, ref_v, index, bias=None, ref_angles=None):
    """Masked Shared Attention in a joint [text | image] sequence (Flux), q, k, v (B, H, L, D)
    after RoPE: each row's image queries read [its own sequence | the foreground image tokens of
    the reference rows]; its text queries read their own row only. ref_k, ref_v (R, H, N, D):
    the reference rows' image keys/values at their own positions; ref_angles (R, 1, 1, D / 2)
    moves each row's keys to where it does not collide with the target
    (kernels.rope_positions); index picks the foreground of the (R * N) reference tokens, bias
    their log-weights or None."""
    if ref_angles is not None:
        ref_k = rope_positions.rotate(ref_k, ref_angles)
    heads, dim = ref_k.shape[1], ref_k.shape[-1]
    k_fg = ref_k.transpose(0, 1).reshape(heads, -1, dim).index_select(1, index)
    v_fg = ref_v.transpose(0, 1).reshape(heads, -1, dim).index_select(1, index)
    return joint_attention.reading_rows_attention(q, k, v, text_len, k_fg, v_fg, bias)

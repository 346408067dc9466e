"""LoRA on self-attention: creating trainable sets and applying them to a projection.

The update itself, delta(x) = up(down(x)) * alpha / rank, is `adapter.LoRAPair` (the layer the
adapter files load into); this module only creates fresh sets for training and applies them.
A fresh set has `up` at zero (down: PyTorch's Kaiming-uniform default), so it leaves the model's
output bit for bit unchanged until it has trained. The delta stays a separate module, never merged
into the base weight: SynCD runs its reference pass with the LoRA off and its target pass with it
on, which needs the base projection and the delta apart.
"""
from torch import nn

from .adapter import SELF_ATTENTION_PROJECTIONS, LoRAPair


def new_self_attention_lora(query_dim, inner_dim, rank, alpha=None):
    """{to_q, to_k, to_v, to_out: LoRAPair} for one self-attention layer (fp32, up = 0)."""
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
    shapes = {"to_q": (query_dim, inner_dim), "to_k": (query_dim, inner_dim),
              "to_v": (query_dim, inner_dim), "to_out": (inner_dim, query_dim)}
    pairs = nn.ModuleDict()
    for name in SELF_ATTENTION_PROJECTIONS:
        pair = LoRAPair(*shapes[name], rank, rank if alpha is None else alpha)
        nn.init.zeros_(pair.up.weight)
        pairs[name] = pair
    return pairs


def deltas(pairs):
    """{projection: delta(x)} of a LoRA set (techniques.msa's LoRA mapping): each delta computed
    in the LoRA's own dtype (the trainer keeps it in fp32 under bf16 autocast), returned in x's."""
    return {name: (lambda x, pair=pair: pair(x.to(pair.down.weight.dtype)).to(x.dtype))
            for name, pair in pairs.items()}

"""SigLIP's attention-pooling head (the "MAP" head), which turns the vision tower's last hidden
states into its pooled output. Plain torch; no host import.

ComfyUI's SigLIP vision model stops at the post-layernorm hidden states (its "image_embeds" is
the whole sequence) and drops the head's weights when it loads a file, but the InstantX Flux
adapter reads SigLIP's pooled output. The head, as published in SigLIP checkpoints
(google/siglip-so400m-patch14-384, keys under `vision_model.head.`):
  probe (1, 1, C)                          one learned query
  attention.in_proj_weight (3C, C), attention.in_proj_bias (3C,)
                                           the query / key / value projections stacked
  attention.out_proj.{weight,bias}         multi-head attention output projection
  layernorm.{weight,bias}                  LayerNorm (eps 1e-6)
  mlp.fc1.{weight,bias}, mlp.fc2.{weight,bias}
                                           MLP with tanh-approximated GELU
pooled = h + mlp(layernorm(h)), h = attention(probe, hidden, hidden) over `heads` heads.
"""
import os

import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from .weights_files import CheckpointError

PREFIX = "vision_model.head."
KEYS = ("probe", "attention.in_proj_weight", "attention.in_proj_bias",
        "attention.out_proj.weight", "attention.out_proj.bias", "layernorm.weight",
        "layernorm.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias")
LAYER_NORM_EPS = 1e-6


class AttentionPoolingHead(nn.Module):
    """hidden states (B, L, C) -> pooled (B, C)."""

    def __init__(self, tensors, heads):
        super().__init__()
        width = tensors["probe"].shape[-1]
        if width % heads:
            raise CheckpointError(f"SigLIP head: width {width} does not split into {heads} heads")
        self.heads = heads
        for name in KEYS:
            self.register_buffer(name.replace(".", "_"), tensors[name].detach().clone())

    @property
    def width(self):
        return self.probe.shape[-1]

    def forward(self, hidden):
        x = hidden.to(self.probe.dtype)
        q, k, v = self.attention_in_proj_weight.chunk(3)
        qb, kb, vb = self.attention_in_proj_bias.chunk(3)
        split = lambda t: t.unflatten(-1, (self.heads, -1)).transpose(1, 2)
        query = split(F.linear(self.probe.expand(x.shape[0], -1, -1), q, qb))
        out = F.scaled_dot_product_attention(query, split(F.linear(x, k, kb)),
                                             split(F.linear(x, v, vb)))
        h = F.linear(out.transpose(1, 2).flatten(2), self.attention_out_proj_weight,
                     self.attention_out_proj_bias)
        normed = F.layer_norm(h, (self.width,), self.layernorm_weight, self.layernorm_bias,
                              LAYER_NORM_EPS)
        mlp = F.linear(F.gelu(F.linear(normed, self.mlp_fc1_weight, self.mlp_fc1_bias),
                              approximate="tanh"), self.mlp_fc2_weight, self.mlp_fc2_bias)
        return (h + mlp)[:, 0]


def head_tensors(tensors, source):
    """The head's tensors (names without the prefix) from a SigLIP file's flat tensors, or a
    named error saying which keys the file lacks."""
    missing = [PREFIX + name for name in KEYS if PREFIX + name not in tensors]
    if missing:
        raise CheckpointError(
            f"{source}: has no SigLIP attention-pooling head ({', '.join(missing[:3])}"
            f"{'...' if len(missing) > 3 else ''} missing); pick a SigLIP file that keeps "
            "vision_model.head (google/siglip-so400m-patch14-384's model.safetensors does)")
    return {name: tensors[PREFIX + name] for name in KEYS}


def load_head(path, heads):
    """The head from a SigLIP .safetensors file, reading only its own tensors (the file holds
    the whole vision tower, or the text tower too)."""
    name = os.path.basename(path)
    if not path.lower().endswith(".safetensors"):
        raise CheckpointError(f"siglip_head: {name} is not a .safetensors file; pick the SigLIP "
                              "model.safetensors")
    with safe_open(path, framework="pt") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys() if key.startswith(PREFIX)}
    return AttentionPoolingHead(head_tensors(tensors, name), heads)

"""Tiny Flux image-adapter files written at test time with the exact key names, nesting and file
formats of the published ones, shrunk to the tiny Flux of families/tiny_dit_models.py (hidden 32,
text width 16, 2 double + 2 single blocks) and a 24-wide image embedding. Weights are random.

  InstantX / Shakker-Labs ip-adapter.bin: torch.save({"image_proj": {"proj.0.weight", ...,
    "norm.bias"}, "ip_adapter": {"0.to_k_ip.weight", "0.to_v_ip.weight", ...}}), the layers
    numbered over the double then the single blocks;
  XLabs flux-ip-adapter ip_adapter.safetensors: flat "ip_adapter_proj_model.{proj,norm}.*" and
    "double_blocks.{i}.processor.ip_adapter_double_stream_{k,v}_proj.{weight,bias}".
"""
import os

import torch
from safetensors.torch import save_file

HIDDEN, CONTEXT, DOUBLE, SINGLE = 32, 16, 2, 2
EMBED = 24  # the tiny image encoder's embedding width (real: SigLIP 1152, CLIP-L 768)
INSTANTX_TOKENS, XLABS_TOKENS = 8, 4  # real: 128 and 4


def _rand(gen, *shape):
    return torch.randn(shape, generator=gen) / shape[-1] ** 0.5


def instantx_nested(seed=0, layers=DOUBLE + SINGLE):
    gen = torch.Generator().manual_seed(seed)
    image_proj = {"proj.0.weight": _rand(gen, 2 * EMBED, EMBED), "proj.0.bias": _rand(gen, 2 * EMBED),
                  "proj.2.weight": _rand(gen, INSTANTX_TOKENS * CONTEXT, 2 * EMBED),
                  "proj.2.bias": _rand(gen, INSTANTX_TOKENS * CONTEXT),
                  "norm.weight": 1 + _rand(gen, CONTEXT), "norm.bias": _rand(gen, CONTEXT)}
    ip_adapter = {}
    for n in range(layers):
        ip_adapter[f"{n}.to_k_ip.weight"] = _rand(gen, HIDDEN, CONTEXT)
        ip_adapter[f"{n}.to_v_ip.weight"] = _rand(gen, HIDDEN, CONTEXT)
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


def xlabs_flat(seed=0, layers=DOUBLE):
    gen = torch.Generator().manual_seed(seed)
    sd = {"ip_adapter_proj_model.proj.weight": _rand(gen, XLABS_TOKENS * CONTEXT, EMBED),
          "ip_adapter_proj_model.proj.bias": _rand(gen, XLABS_TOKENS * CONTEXT),
          "ip_adapter_proj_model.norm.weight": 1 + _rand(gen, CONTEXT),
          "ip_adapter_proj_model.norm.bias": _rand(gen, CONTEXT)}
    for i in range(layers):
        p = f"double_blocks.{i}.processor.ip_adapter_double_stream_"
        for kv in ("k", "v"):
            sd[f"{p}{kv}_proj.weight"] = _rand(gen, HIDDEN, CONTEXT)
            sd[f"{p}{kv}_proj.bias"] = _rand(gen, HIDDEN)
    return sd


def write_instantx(folder, name="ip-adapter.bin", **kwargs):
    nested = instantx_nested(**kwargs)
    path = os.path.join(folder, name)
    torch.save(nested, path)
    return path, nested


def write_xlabs(folder, name="ip_adapter.safetensors", **kwargs):
    flat = xlabs_flat(**kwargs)
    path = os.path.join(folder, name)
    save_file(flat, path)
    return path, flat

"""Tiny adapter checkpoints written at test time with the exact key names, nesting and file
formats of the published files, shrunk to the tiny host models (families/tiny_models.py):
context width 16 (SD1.5-like) / 48 (SDXL-like), CLIP vision hidden 32 / projection 24, and the
tiny UNet's seven transformer blocks. Only the weights are fake (random).

Published layouts reproduced:
  h94 IP-Adapter .bin: torch.save({"image_proj": {...}, "ip_adapter": {"1.to_k_ip.weight": ...}})
  h94 IP-Adapter .safetensors: the same, flattened ("image_proj.latents", "ip_adapter.1....")
  MIP-Adapter model_sdxl(_plus).bin: the h94 nesting plus "{N}.text_to_weight.weight" [1, inner]
  h94 ip-adapter-plus-face_*: the Plus layout (same keys and shapes; only the training differs)
  h94 ip-adapter-full-face_sd15: image_proj.proj.{0,2} Linear and proj.3 LayerNorm (MLPProjModel)
  Kwai-Kolors ip_adapter_plus_general.bin: the Plus layout with a Resampler as wide as its output
  h94 IP-Adapter-FaceID: image_proj.proj.{0,2} + image_proj.norm (a face-ID vector to 4 or 16
    tokens), Plus versions also image_proj.perceiver_resampler.*, and (except portrait files)
    LoRA keys "{n}.to_{q,k,v,out}_lora.{down,up}.weight" on every attention processor n
  SynCD sdxl_finetuned_20k.ckpt: a Lightning checkpoint {"state_dict": {"unet.<diffusers name>":
    ...}, "epoch", "global_step", ...} with PEFT LoRA on attn1 (lora_A/lora_B.default, and the
    wrapped base weights base_layer.weight), IP K/V under attn2.processor.attn_op.to_k_ip.0, and
    the Resampler in diffusers' IPAdapterPlusImageProjection names.
"""
import os

import torch
from safetensors.torch import save_file

CLIP_HIDDEN = 32  # tiny CLIP vision hidden width (Plus adapters read penultimate hidden states)
CLIP_PROJECTION = 24  # tiny CLIP vision image_embeds width (base adapters)
CONTEXT = {"sd15": 16, "sdxl": 48}
RESAMPLER_DIM, RESAMPLER_DEPTH, RESAMPLER_QUERIES, FF_MULT = 128, 4, 16, 4  # 2 heads of 64
LORA_RANK = 4

# The tiny UNet's transformer blocks in published (diffusers) order, with the diffusers module
# path of each and its attention width (model_channels 32, channel_mult [1, 2]).
TINY_BLOCKS = (
    ("down_blocks.0.attentions.0.transformer_blocks.0", ("input", 1, 0), 32),
    ("down_blocks.1.attentions.0.transformer_blocks.0", ("input", 3, 0), 64),
    ("up_blocks.0.attentions.0.transformer_blocks.0", ("output", 0, 0), 64),
    ("up_blocks.0.attentions.1.transformer_blocks.0", ("output", 1, 0), 64),
    ("up_blocks.1.attentions.0.transformer_blocks.0", ("output", 2, 0), 32),
    ("up_blocks.1.attentions.1.transformer_blocks.0", ("output", 3, 0), 32),
    ("mid_block.attentions.0.transformer_blocks.0", ("middle", 0, 0), 64),
)

PUBLISHED_NAMES = {
    ("ip_adapter", "sd15"): "ip-adapter_sd15",
    ("ip_adapter_plus", "sd15"): "ip-adapter-plus_sd15",
    ("ip_adapter", "sdxl"): "ip-adapter_sdxl_vit-h",
    ("ip_adapter_plus", "sdxl"): "ip-adapter-plus_sdxl_vit-h",
    ("mip_adapter", "sdxl"): "model_sdxl",
    ("mip_adapter_plus", "sdxl"): "model_sdxl_plus",
    ("syncd", "sdxl"): "sdxl_finetuned_20k",
    ("ip_adapter_plus_face", "sd15"): "ip-adapter-plus-face_sd15",
    ("ip_adapter_plus_face", "sdxl"): "ip-adapter-plus-face_sdxl_vit-h",
    ("ip_adapter_full_face", "sd15"): "ip-adapter-full-face_sd15",
    ("kolors_ip_adapter_plus", "sdxl"): "ip_adapter_plus_general",
    ("faceid", "sd15"): "ip-adapter-faceid_sd15",
    ("faceid_plusv2", "sdxl"): "ip-adapter-faceid-plusv2_sdxl",
    ("faceid_portrait", "sd15"): "ip-adapter-faceid-portrait-v11_sd15",
}
FACE_ID_WIDTH = 512  # InsightFace's face embedding


def full_face_weights(gen, context, dtype=torch.float16):
    return {"proj.0.weight": _rand(gen, CLIP_HIDDEN, CLIP_HIDDEN, dtype=dtype),
            "proj.0.bias": _rand(gen, CLIP_HIDDEN, dtype=dtype),
            "proj.2.weight": _rand(gen, context, CLIP_HIDDEN, dtype=dtype),
            "proj.2.bias": _rand(gen, context, dtype=dtype),
            "proj.3.weight": 1 + _rand(gen, context, dtype=dtype),
            "proj.3.bias": _rand(gen, context, dtype=dtype)}


def faceid_weights(gen, context, layout, tokens=4, dtype=torch.float16):
    """image_proj of a FaceID file (MLPProjModelFaceId / ProjModelFaceIdPlus names)."""
    sd = {"proj.0.weight": _rand(gen, 2 * FACE_ID_WIDTH, FACE_ID_WIDTH, dtype=dtype),
          "proj.0.bias": _rand(gen, 2 * FACE_ID_WIDTH, dtype=dtype),
          "proj.2.weight": _rand(gen, tokens * context, 2 * FACE_ID_WIDTH, dtype=dtype),
          "proj.2.bias": _rand(gen, tokens * context, dtype=dtype),
          "norm.weight": 1 + _rand(gen, context, dtype=dtype),
          "norm.bias": _rand(gen, context, dtype=dtype)}
    if layout == "faceid_plusv2":
        sd.update({f"perceiver_resampler.{k}": v for k, v in resampler_weights(gen, context, dtype).items()
                   if k != "latents"})
    return sd


def faceid_lora_weights(gen, inner_dims, rank=LORA_RANK, dtype=torch.float16):
    """LoRA of every attention processor (2i: self-attention, 2i+1: cross-attention)."""
    sd = {}
    for i, inner in enumerate(inner_dims):
        for n in (2 * i, 2 * i + 1):
            for name in ("to_q_lora", "to_k_lora", "to_v_lora", "to_out_lora"):
                sd[f"{n}.{name}.down.weight"] = _rand(gen, rank, inner, dtype=dtype)
                sd[f"{n}.{name}.up.weight"] = _rand(gen, inner, rank, dtype=dtype)
    return sd


def _rand(gen, *shape, dtype=torch.float16):
    return (torch.randn(shape, generator=gen) / shape[-1] ** 0.5).to(dtype)


def resampler_weights(gen, context, dtype=torch.float16, dim=RESAMPLER_DIM):
    """Published Resampler names (no prefix)."""
    d, inner = dim, RESAMPLER_DIM
    sd = {"latents": _rand(gen, 1, RESAMPLER_QUERIES, d, dtype=dtype),
          "proj_in.weight": _rand(gen, d, CLIP_HIDDEN, dtype=dtype),
          "proj_in.bias": _rand(gen, d, dtype=dtype),
          "proj_out.weight": _rand(gen, context, d, dtype=dtype),
          "proj_out.bias": _rand(gen, context, dtype=dtype),
          "norm_out.weight": 1 + _rand(gen, context, dtype=dtype),
          "norm_out.bias": _rand(gen, context, dtype=dtype)}
    for i in range(RESAMPLER_DEPTH):
        p = f"layers.{i}."
        for norm in ("0.norm1", "0.norm2", "1.0"):
            sd[f"{p}{norm}.weight"] = 1 + _rand(gen, d, dtype=dtype)
            sd[f"{p}{norm}.bias"] = _rand(gen, d, dtype=dtype)
        sd[f"{p}0.to_q.weight"] = _rand(gen, inner, d, dtype=dtype)
        sd[f"{p}0.to_kv.weight"] = _rand(gen, 2 * inner, d, dtype=dtype)
        sd[f"{p}0.to_out.weight"] = _rand(gen, d, inner, dtype=dtype)
        sd[f"{p}1.1.weight"] = _rand(gen, d * FF_MULT, d, dtype=dtype)
        sd[f"{p}1.3.weight"] = _rand(gen, d, d * FF_MULT, dtype=dtype)
    return sd


def linear_projection_weights(gen, context, tokens=4, dtype=torch.float16):
    return {"proj.weight": _rand(gen, tokens * context, CLIP_PROJECTION, dtype=dtype),
            "proj.bias": _rand(gen, tokens * context, dtype=dtype),
            "norm.weight": 1 + _rand(gen, context, dtype=dtype),
            "norm.bias": _rand(gen, context, dtype=dtype)}


def ip_layer_weights(gen, context, inner_dims, text_to_weight, dtype=torch.float16):
    """Published per-layer names without the `ip_adapter.` prefix ("1.to_k_ip.weight", ...)."""
    sd = {}
    for i, inner in enumerate(inner_dims):
        n = 2 * i + 1
        sd[f"{n}.to_k_ip.weight"] = _rand(gen, inner, context, dtype=dtype)
        sd[f"{n}.to_v_ip.weight"] = _rand(gen, inner, context, dtype=dtype)
        if text_to_weight:
            sd[f"{n}.text_to_weight.weight"] = _rand(gen, 1, inner, dtype=dtype)
    return sd


def resampler_to_diffusers(sd):
    """Published Resampler names -> diffusers IPAdapterPlusImageProjection names (as SynCD's
    pipeline holds it after `load_ip_adapter`), written key by key."""
    out = {}
    for key, value in sd.items():
        parts = key.split(".")
        if parts[0] != "layers":
            out[key] = value
            continue
        i, sub, rest = parts[1], ".".join(parts[2:4]), ".".join(parts[4:])
        if sub == "0.to_kv":
            k, v = value.chunk(2, dim=0)
            out[f"layers.{i}.attn.to_k.{rest}"] = k
            out[f"layers.{i}.attn.to_v.{rest}"] = v
            continue
        target = {"0.norm1": "ln0", "0.norm2": "ln1", "0.to_q": "attn.to_q",
                  "0.to_out": "attn.to_out.0", "1.0": "ff.0", "1.1": "ff.1.net.0.proj",
                  "1.3": "ff.1.net.2"}[sub]
        out[f"layers.{i}.{target}.{rest}"] = value
    return out


def canonical(layout, family, seed=0, blocks=TINY_BLOCKS):
    """The tensors of a tiny adapter under the pack's canonical flat names."""
    gen = torch.Generator().manual_seed(seed)
    context = CONTEXT[family]
    inner_dims = [inner for _, _, inner in blocks]
    if layout.startswith("faceid"):
        proj = faceid_weights(gen, context, layout, tokens=4 if layout == "faceid" else 16)
    elif layout == "ip_adapter_full_face":
        proj = full_face_weights(gen, context)
    elif layout == "kolors_ip_adapter_plus":
        proj = resampler_weights(gen, context, dim=context)
    elif layout in ("ip_adapter_plus", "ip_adapter_plus_face", "mip_adapter_plus", "syncd"):
        proj = resampler_weights(gen, context)
    else:
        proj = linear_projection_weights(gen, context)
    out = {f"image_proj.{k}": v for k, v in proj.items()}
    layers = ip_layer_weights(gen, context, inner_dims, text_to_weight=layout.startswith("mip"))
    if layout in ("faceid", "faceid_plusv2"):
        layers.update(faceid_lora_weights(gen, inner_dims))
    out.update({f"ip_adapter.{k}": v for k, v in layers.items()})
    if layout == "syncd":
        for i, inner in enumerate(inner_dims):
            for name in ("to_q", "to_k", "to_v", "to_out"):
                out[f"self_attn_lora.{2 * i}.{name}.down.weight"] = _rand(gen, LORA_RANK, inner)
                out[f"self_attn_lora.{2 * i}.{name}.up.weight"] = _rand(gen, inner, LORA_RANK)
    return out


def published_nested(tensors):
    nested = {"image_proj": {}, "ip_adapter": {}}
    for key, value in tensors.items():
        group, rest = key.split(".", 1)
        nested[group][rest] = value
    return nested


def syncd_state_dict(tensors, blocks=TINY_BLOCKS, seed=1):
    """The Lightning `state_dict` SynCD saves, from canonical tensors."""
    gen = torch.Generator().manual_seed(seed)
    sd = {"vae.encoder.conv_in.weight": _rand(gen, 4, 3, 3, 3),  # other modules ride along
          "unet.conv_in.weight": _rand(gen, 4, 4, 3, 3)}
    for i, (path, _, inner) in enumerate(blocks):
        base = f"unet.{path}."
        for name, peft in (("to_q", "to_q"), ("to_k", "to_k"), ("to_v", "to_v"), ("to_out", "to_out.0")):
            sd[f"{base}attn1.{peft}.base_layer.weight"] = _rand(gen, inner, inner)
            sd[f"{base}attn1.{peft}.lora_A.default.weight"] = tensors[f"self_attn_lora.{2 * i}.{name}.down.weight"]
            sd[f"{base}attn1.{peft}.lora_B.default.weight"] = tensors[f"self_attn_lora.{2 * i}.{name}.up.weight"]
        for name in ("to_k_ip", "to_v_ip"):
            sd[f"{base}attn2.processor.attn_op.{name}.0.weight"] = tensors[f"ip_adapter.{2 * i + 1}.{name}.weight"]
        sd[f"{base}attn2.to_k.weight"] = _rand(gen, inner, CONTEXT["sdxl"])
    proj = {k[len("image_proj."):]: v for k, v in tensors.items() if k.startswith("image_proj.")}
    sd.update({f"unet.encoder_hid_proj.image_projection_layers.0.{k}": v
               for k, v in resampler_to_diffusers(proj).items()})
    return sd


def write_checkpoint(folder, layout, family, file_format=None, seed=0, blocks=TINY_BLOCKS, name=None):
    """Write one tiny published-layout file; returns (path, canonical tensors)."""
    tensors = canonical(layout, family, seed, blocks)
    file_format = file_format or ("ckpt" if layout == "syncd" else "bin")
    name = name or f"{PUBLISHED_NAMES[(layout, family)]}.{file_format}"
    path = os.path.join(folder, name)
    if layout == "syncd":
        torch.save({"epoch": 19, "global_step": 20000, "pytorch-lightning_version": "2.2.1",
                    "state_dict": syncd_state_dict(tensors, blocks),
                    "hyper_parameters": {"rank": 128, "trainkeys": "lora+to_k_ip+to_v_ip"}}, path)
    elif file_format == "safetensors":
        save_file({k: v.contiguous() for k, v in tensors.items()}, path)
    else:
        torch.save(published_nested(tensors), path)
    return path, tensors


def fusion_weights(gen, context, layers, dtype=torch.float16):
    """A feature fusion section as a trained one looks (kernels/feature_fusion.py's layout):
    experts with random (non-zero) Resampler weights, a random router."""
    tensors = {"fusion.layers": torch.tensor(layers, dtype=torch.int64),
               "fusion.router.weight": _rand(gen, 3, 3 * CLIP_HIDDEN, dtype=dtype),
               "fusion.router.bias": _rand(gen, 3, dtype=dtype)}
    for level in ("low", "mid", "high"):
        tensors.update({f"fusion.experts.{level}.{k}": v
                        for k, v in resampler_weights(gen, context, dtype).items()})
    return tensors


# Files trained with feature fusion that the shipped workflows name, by their base family.
FUSION_NAMES = {"multiref_fusion_adapter": "sdxl"}


def write_fusion_checkpoint(folder, family, name, seed=0, layers=(0, 1, 2)):
    """A trained-looking fused Plus adapter in the pack's format (the trainer's layout, written
    from the key layout here); layers: the tiny CLIP vision's levels. Returns (path, tensors)."""
    tensors = canonical("ip_adapter_plus", family, seed)
    tensors.update(fusion_weights(torch.Generator().manual_seed(seed + 7), CONTEXT[family], layers))
    path = os.path.join(folder, name)
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata={
        "format": "multiref-adapter", "format_version": "1", "family": family, "kind": "multiref"})
    return path, tensors

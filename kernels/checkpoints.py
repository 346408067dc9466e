"""Adapter checkpoint files: read them safely, detect the layout by keys, convert every supported
layout to one set of tensor names, map the published layer numbering to ComfyUI attention
locations, and write/read the pack's own safetensors format. Plain torch, no ComfyUI import.

Canonical names (those of the h94 IP-Adapter files, plus LoRA):
  image_proj.*                               image projection (Resampler, MLP or linear)
  ip_adapter.{2i+1}.to_k_ip.weight / to_v_ip.weight / text_to_weight.weight (MIP only)
  self_attn_lora.{2i}.{to_q,to_k,to_v,to_out}.{down,up}.weight   (SynCD / trained by the pack)
i = index of the cross-attention layer in diffusers attention order: down blocks, up blocks, mid
block (the order of `UNet2DConditionModel.attn_processors`, in which attn1 of block i is 2i and
attn2 is 2i+1: hence the odd published numbers).
"""
import os
import re
from dataclasses import replace

import torch

from . import cls_text, feature_fusion, flux_adapters, weights_files
from .adapter import UNCOND_CONVENTIONS, AdapterMismatchError, build_adapter
from .weights_files import CheckpointError  # noqa: F401  (the error of every file problem)

PACK_FORMAT = "multiref-adapter"
LORA_FORMAT = "multiref-lora"  # the trainer's self-attention LoRA alone (trained without an adapter)
PACK_FORMAT_VERSION = "1"
# Cross-attention context width -> base family. 16 / 48: the pack's tiny demo models
# (families/tiny_models.py), so a machine without downloads can run the whole path.
FAMILY_BY_CONTEXT_DIM = {768: "sd15", 2048: "sdxl", 16: "sd15", 48: "sdxl"}
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")
ADAPTER_SUFFIXES = (".safetensors",) + PICKLE_SUFFIXES

# Where the published files come from (for "missing file" messages).
DOWNLOADS = (
    "h94/IP-Adapter (huggingface.co/h94/IP-Adapter): models/ip-adapter_sd15.bin, "
    "models/ip-adapter-plus_sd15.bin, models/ip-adapter-plus-face_sd15.bin, "
    "models/ip-adapter-full-face_sd15.bin, sdxl_models/ip-adapter_sdxl_vit-h.bin, "
    "sdxl_models/ip-adapter-plus_sdxl_vit-h.bin, sdxl_models/ip-adapter-plus-face_sdxl_vit-h.bin "
    "(or their .safetensors)",
    "MIP-Adapter (huggingface.co/hqhQAQ/MIP-Adapter): model_sdxl.bin, model_sdxl_plus.bin",
    "SynCD (www.cs.cmu.edu/~syncd-project/assets/sdxl_finetuned_20k.ckpt): sdxl_finetuned_20k.ckpt",
)

FILES_BY_FAMILY = {
    "sd15": "ip-adapter-plus_sd15.bin or ip-adapter_sd15.bin (h94/IP-Adapter, models/)",
    "sdxl": "ip-adapter-plus_sdxl_vit-h.bin (h94/IP-Adapter, sdxl_models/), model_sdxl_plus.bin "
            "(hqhQAQ/MIP-Adapter) or sdxl_finetuned_20k.ckpt (SynCD)",
}


# ---------------------------------------------------------------------------------------------
# ComfyUI attention locations of a UNet (their published numbering: adapter.published_order)

def unet_transformer_blocks(diffusion_model):
    """[(location, transformer_block)] of a ComfyUI UNetModel, in execution order (input,
    middle, output), found by walking its structure: each SpatialTransformer's blocks."""
    sections = (("input", diffusion_model.input_blocks), ("middle", [diffusion_model.middle_block]),
                ("output", diffusion_model.output_blocks))
    found = []
    for section, blocks in sections:
        for block_id, block in enumerate(blocks):
            for layer in block:
                for index, transformer in enumerate(getattr(layer, "transformer_blocks", ())):
                    found.append(((section, block_id, index), transformer))
    return found


def cross_attention_dims(diffusion_model):
    """{location: (context_dim, inner_dim)} of every cross-attention (attn2) of a UNet."""
    return {loc: (block.attn2.to_k.in_features, block.attn2.to_k.out_features)
            for loc, block in unet_transformer_blocks(diffusion_model)}


def base_family(diffusion_model):
    """sd15 or sdxl by the width every cross-attention reads (one width, a known one); else
    None."""
    contexts = {context for context, _ in cross_attention_dims(diffusion_model).values()}
    return FAMILY_BY_CONTEXT_DIM.get(contexts.pop()) if len(contexts) == 1 else None


def bind_to_unet(adapter, diffusion_model):
    """The adapter tied to a UNet's attention locations, after checking base family, layer count
    and every layer's widths (so no mismatch reaches a matmul)."""
    dims = cross_attention_dims(diffusion_model)
    contexts = sorted({context for context, _ in dims.values()})
    model_family = base_family(diffusion_model)
    if model_family != adapter.family:
        raise AdapterMismatchError(
            f"{adapter.describe()} is made for {adapter.family.upper()} but the model is "
            f"{(model_family or 'an unsupported base').upper()} (cross-attention context width "
            f"{', '.join(map(str, contexts))}); use an adapter made for this model's base family"
            f"{' such as ' + FILES_BY_FAMILY[model_family] if model_family in FILES_BY_FAMILY else ''}"
            ", or a model of the adapter's family")
    return adapter.bind(dims.keys(), dims)


# ---------------------------------------------------------------------------------------------
# Reading files

def read_checkpoint(path):
    """(flat {name: tensor}, metadata dict) of an adapter or LoRA file (.safetensors, or a pickle
    read weights-only: weights_files)."""
    obj, metadata = weights_files.read(path, "adapter")
    if metadata:
        return obj, metadata
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # a Lightning checkpoint: the module's weights are in here
    return flatten(obj), {}


def flatten(obj, prefix=""):
    """Nested dicts of tensors -> {"a.b.c": tensor}; anything that is not a tensor is skipped."""
    out = {}
    if isinstance(obj, torch.Tensor):
        out[prefix[:-1]] = obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            out.update(flatten(value, f"{prefix}{key}."))
    return out


# ---------------------------------------------------------------------------------------------
# Layout detection

_PLUS_PROJ = ("image_proj.latents", "image_proj.proj_in.weight", "image_proj.proj_out.weight",
              "image_proj.norm_out.weight", "image_proj.layers.{L}.0.norm1.weight",
              "image_proj.layers.{L}.0.norm2.weight", "image_proj.layers.{L}.0.to_q.weight",
              "image_proj.layers.{L}.0.to_kv.weight", "image_proj.layers.{L}.0.to_out.weight",
              "image_proj.layers.{L}.1.0.weight", "image_proj.layers.{L}.1.1.weight",
              "image_proj.layers.{L}.1.3.weight")
_BASE_PROJ = ("image_proj.proj.weight", "image_proj.proj.bias", "image_proj.norm.weight",
              "image_proj.norm.bias")
_FULL_FACE_PROJ = ("image_proj.proj.0.weight", "image_proj.proj.0.bias", "image_proj.proj.2.weight",
                   "image_proj.proj.2.bias", "image_proj.proj.3.weight", "image_proj.proj.3.bias")
_IP = ("ip_adapter.{N}.to_k_ip.weight", "ip_adapter.{N}.to_v_ip.weight")
_MIP = ("ip_adapter.{N}.text_to_weight.weight",)
_SYNCD_BLOCK = "unet.{BLOCK}.attentions.{N}.transformer_blocks.{N}."
_SYNCD_PROJ = "unet.encoder_hid_proj.image_projection_layers.0."
_SYNCD = (_SYNCD_BLOCK + "attn2.processor.attn_op.to_k_ip.0.weight",
          _SYNCD_BLOCK + "attn2.processor.attn_op.to_v_ip.0.weight",
          _SYNCD_BLOCK + "attn1.to_q.lora_A.default.weight",
          _SYNCD_BLOCK + "attn1.to_q.lora_B.default.weight",
          _SYNCD_PROJ + "latents", _SYNCD_PROJ + "proj_in.weight",
          _SYNCD_PROJ + "layers.{L}.attn.to_k.weight")

LAYOUTS = {  # kind -> key patterns that must all be present
    "ip_adapter": _BASE_PROJ + _IP,
    "ip_adapter_plus": _PLUS_PROJ + _IP,
    "ip_adapter_full_face": _FULL_FACE_PROJ + _IP,
    "mip_adapter": _BASE_PROJ + _IP + _MIP,
    "mip_adapter_plus": _PLUS_PROJ + _IP + _MIP,
    "syncd": _SYNCD,
}


def _pattern_regex(pattern):
    regex = re.escape(pattern).replace(r"\{N\}", r"\d+").replace(r"\{L\}", r"\d+")
    return re.compile("^" + regex.replace(r"\{BLOCK\}", r"(down_blocks\.\d+|up_blocks\.\d+|mid_block)") + "$")


def _matched(pattern, keys):
    regex = _pattern_regex(pattern)
    return any(regex.match(k) for k in keys)


FACEID_FIX = ("use ComfyUI_IPAdapter_plus's FaceID nodes for this file, or an adapter that reads "
              "the image alone, such as ip-adapter-plus-face_sd15 / "
              "ip-adapter-plus-face_sdxl_vit-h (h94/IP-Adapter)")


def refuse_unsupported(tensors, source="checkpoint"):
    """A CheckpointError for the published adapters the pack recognises but cannot run,
    saying what is missing (nothing for any other file)."""
    keys = list(tensors)
    lora = [k for k in keys if re.match(r"^ip_adapter\.\d+\.to_q_lora\.", k)]
    portrait = ("image_proj.proj.0.weight" in tensors and "image_proj.norm.weight" in tensors
                and "image_proj.proj.3.weight" not in tensors)
    if lora or portrait or any(k.startswith("image_proj.perceiver_resampler.") for k in keys):
        what = ("its image projection reads a face-identity vector (with CLIP hidden states "
                "in the Plus versions)" + (" and it carries a LoRA for the UNet's attention "
                f"({lora[0]}, ...) that its own LoRA file completes" if lora else ""))
        raise CheckpointError(
            f"{source}: an IP-Adapter FaceID file (h94/IP-Adapter-FaceID or Kolors FaceID): "
            f"{what}. That vector is the 512-value embedding of InsightFace's face recognition "
            "model (buffalo_l, antelopev2 for Kolors) of a detected, aligned face; the pack "
            f"has no InsightFace face detector or recognition model, so it cannot feed it: {FACEID_FIX}")
    latents, proj_out = tensors.get("image_proj.latents"), tensors.get("image_proj.proj_out.weight")
    to_k = tensors.get("ip_adapter.1.to_k_ip.weight")
    if latents is not None and proj_out is not None and to_k is not None and \
            FAMILY_BY_CONTEXT_DIM.get(to_k.shape[1]) == "sdxl" and latents.shape[-1] == proj_out.shape[0]:
        raise CheckpointError(
            f"{source}: a Kolors IP-Adapter Plus file (Kwai-Kolors/Kolors-IP-Adapter-Plus, a "
            f"{latents.shape[-1]}-wide Resampler reading CLIP ViT-L/14-336; SDXL Plus files have a "
            "1280-wide one). It is made for Kolors base models, whose ChatGLM text encoder gives "
            "4096-wide text that the UNet projects to 2048 before cross-attention; the pack runs "
            "SD1.5 and SDXL base models only (its routing encodes each phrase through the model's "
            "text encoder at the cross-attention width, which a Kolors text encoder does not "
            "give). Use this file with ComfyUI_IPAdapter_plus on a Kolors model, or "
            "ip-adapter-plus_sdxl_vit-h (h94/IP-Adapter) with an SDXL model")


def detect_layout(keys, source="checkpoint"):
    """The kind whose key patterns are all present (the most specific one); otherwise a
    CheckpointError naming the closest layout and the patterns it misses."""
    keys = list(keys)
    scores = {}
    for kind, patterns in LAYOUTS.items():
        missing = [p for p in patterns if not _matched(p, keys)]
        scores[kind] = (1 - len(missing) / len(patterns), len(patterns), missing)
    complete = [kind for kind, (score, _, _) in scores.items() if score == 1]
    if complete:
        return max(complete, key=lambda kind: scores[kind][1])
    closest = max(scores, key=lambda kind: scores[kind][:2])
    sample = ", ".join(sorted(keys)[:5]) or "no tensors at all"
    raise CheckpointError(
        f"{source}: unknown key layout (first keys: {sample}). Closest known layout: {closest}, "
        f"which also needs keys like: {', '.join(scores[closest][2][:4])}. Supported: h94 "
        "IP-Adapter base/Plus/Plus-face/full-face (SD1.5, SDXL), MIP-Adapter, SynCD sdxl_finetuned_20k.ckpt, and files "
        "saved by this pack")


# ---------------------------------------------------------------------------------------------
# Conversion to canonical names

_SYNCD_KEY = re.compile(r"^unet\.(down_blocks\.(\d+)|up_blocks\.(\d+)|mid_block)\.attentions\.(\d+)"
                        r"\.transformer_blocks\.(\d+)\.(.+)$")
_SYNCD_LORA = re.compile(r"^attn1\.(to_q|to_k|to_v|to_out\.0)\.lora_([AB])\.default\.weight$")
_SYNCD_IP = re.compile(r"^attn2\.processor\.attn_op\.(to_k_ip|to_v_ip)\.0\.weight$")


def _syncd_block_order(match):
    down, up = match.group(2), match.group(3)
    section = (0, int(down)) if down is not None else (1, int(up)) if up is not None else (2, 0)
    return section + (int(match.group(4)), int(match.group(5)))


def _diffusers_resampler_to_published(sd):
    """diffusers IPAdapterPlusImageProjection names -> published Resampler names."""
    out = {}
    renames = (("ln0.", "0.norm1."), ("ln1.", "0.norm2."), ("attn.to_q.", "0.to_q."),
               ("attn.to_out.0.", "0.to_out."), ("ff.0.", "1.0."), ("ff.1.net.0.proj.", "1.1."),
               ("ff.1.net.2.", "1.3."))
    for key, value in sd.items():
        if not key.startswith("layers."):
            out[key] = value
            continue
        _, index, rest = key.split(".", 2)
        if rest.startswith("attn.to_k."):
            suffix = rest[len("attn.to_k."):]
            out[f"layers.{index}.0.to_kv.{suffix}"] = torch.cat(
                [value, sd[f"layers.{index}.attn.to_v.{suffix}"]], dim=0)
            continue
        if rest.startswith("attn.to_v."):
            continue
        for old, new in renames:
            if rest.startswith(old):
                out[f"layers.{index}.{new}{rest[len(old):]}"] = value
                break
        else:
            raise CheckpointError(f"unexpected image-projection key layers.{index}.{rest}")
    return out


def syncd_to_canonical(tensors):
    """SynCD Lightning state dict (keys `unet.*`) -> canonical names. Its LoRA (PEFT, adapter
    `default`) sits on attn1 of every block; alpha = rank as published (scale 1)."""
    blocks = {}
    for key, value in tensors.items():
        match = _SYNCD_KEY.match(key)
        if match:
            blocks.setdefault(_syncd_block_order(match), {})[match.group(6)] = value
    out = {}
    for i, order in enumerate(sorted(b for b in blocks if any(_SYNCD_IP.match(k) for k in blocks[b]))):
        for rest, value in blocks[order].items():
            ip, lora = _SYNCD_IP.match(rest), _SYNCD_LORA.match(rest)
            if ip:
                out[f"ip_adapter.{2 * i + 1}.{ip.group(1)}.weight"] = value
            elif lora:
                name = lora.group(1).replace("to_out.0", "to_out")
                out[f"self_attn_lora.{2 * i}.{name}.{'down' if lora.group(2) == 'A' else 'up'}.weight"] = value
    proj = {k[len(_SYNCD_PROJ):]: v for k, v in tensors.items() if k.startswith(_SYNCD_PROJ)}
    out.update({f"image_proj.{k}": v for k, v in _diffusers_resampler_to_published(proj).items()})
    return out


def _check_numbering(tensors, source):
    numbers = sorted({int(k.split(".")[1]) for k in tensors if k.startswith("ip_adapter.")})
    expected = list(range(1, 2 * len(numbers), 2))
    if numbers != expected:
        raise CheckpointError(f"{source}: ip_adapter layer numbers {numbers[:6]}... are not the "
                              f"published 1, 3, 5, ...; the file is damaged or of another layout")
    for n in numbers:
        for part in ("to_k_ip", "to_v_ip"):
            if f"ip_adapter.{n}.{part}.weight" not in tensors:
                raise CheckpointError(f"{source}: layer ip_adapter.{n} has no {part}.weight; the "
                                      "file is incomplete (download it again)")


def family_of(tensors, source):
    context_dim = tensors["ip_adapter.1.to_k_ip.weight"].shape[1]
    proj_dim = next(tensors[k] for k in ("image_proj.proj_out.weight", "image_proj.norm.weight",
                                         "image_proj.proj.3.weight") if k in tensors).shape[0]
    if context_dim != proj_dim:
        raise CheckpointError(f"{source}: the image projection makes {proj_dim}-wide tokens but the "
                              f"layers read {context_dim}-wide ones; the file is inconsistent")
    if context_dim not in FAMILY_BY_CONTEXT_DIM:
        raise CheckpointError(f"{source}: cross-attention width {context_dim} matches no supported "
                              "base model (SD1.5: 768, SDXL: 2048)")
    return FAMILY_BY_CONTEXT_DIM[context_dim]


def load_adapter(path):
    """Read, detect, convert and build a LoadedAdapter from any supported file."""
    source = os.path.basename(path)
    tensors, metadata = read_checkpoint(path)
    if cls_text.is_cls_text(tensors):  # its own loader: it feeds the text encoder, not the UNet
        raise CheckpointError(f"{source}: a CLS text fusion file (cls_text.* tensors, "
                              "kernels/cls_text.py): load it with MultiRef CLS Fusion Loader "
                              "and connect it to MultiRef CLS Text Encode")
    if flux_adapters.detect_flux_adapter(tensors):  # the Flux layouts: kernels/flux_adapters.py
        return flux_adapters.load_flux_adapter(tensors, source)
    if metadata.get("format") == LORA_FORMAT:
        return _load_lora_only(tensors, metadata, source)
    if metadata.get("format") == PACK_FORMAT:
        _check_version(metadata, source)
        kind, canonical, alpha = metadata["kind"], tensors, metadata.get("lora_alpha")
        alpha = float(alpha) if alpha else None
        uncond = metadata.get("uncond", "")
    else:
        refuse_unsupported(tensors, source)
        kind = detect_layout(tensors.keys(), source)
        canonical = syncd_to_canonical(tensors) if kind == "syncd" else {
            k: v for k, v in tensors.items() if k.startswith(("image_proj.", "ip_adapter."))}
        alpha = None  # published LoRA: alpha = rank
        uncond = ""
    _check_numbering(canonical, source)
    family = family_of(canonical, source)
    if metadata.get("family") and metadata["family"] != family:
        raise CheckpointError(f"{source}: metadata says family {metadata['family']} but the "
                              f"tensors are shaped for {family}; the file is inconsistent")
    if uncond and uncond not in UNCOND_CONVENTIONS:
        raise CheckpointError(f"{source}: unknown uncond convention {uncond!r} in its metadata; "
                              "update the pack")
    adapter = replace(build_adapter(kind, family, canonical, source=source, lora_alpha=alpha),
                      uncond_from=uncond)
    return with_fusion(adapter, tensors, source)


def with_fusion(adapter, tensors, source):
    """The adapter with the feature fusion its `fusion.*` keys hold (kernels/feature_fusion.py),
    or unchanged when there are none."""
    try:
        fusion = feature_fusion.fusion_from_tensors(tensors, adapter.image_proj, source)
    except feature_fusion.FusionError as exc:
        raise CheckpointError(str(exc)) from None
    return adapter if fusion is None else replace(adapter, fusion=fusion, fingerprint="")


def _load_lora_only(tensors, metadata, source):
    """The trainer's LoRA file: an adapter without image layers (Masked Shared Attention only)."""
    _check_version(metadata, source)
    if metadata.get("family") not in set(FAMILY_BY_CONTEXT_DIM.values()):
        raise CheckpointError(f"{source}: LoRA file without a valid family in its metadata "
                              f"({metadata.get('family')!r}); the file is damaged: train it again")
    unexpected = sorted(k for k in tensors if not k.startswith("self_attn_lora."))
    if unexpected or not tensors:
        raise CheckpointError(f"{source}: a LoRA file holds only self_attn_lora.* tensors; found "
                              f"{unexpected[:3] or 'none'}; the file is damaged: train it again")
    alpha = metadata.get("lora_alpha")
    return build_adapter("multiref", metadata["family"], tensors, source=source,
                         lora_alpha=float(alpha) if alpha else None)


def _check_version(metadata, source):
    version = metadata.get("format_version")
    if version != PACK_FORMAT_VERSION:
        raise CheckpointError(f"{source}: pack file format version {version}; this version of "
                              f"the pack reads version {PACK_FORMAT_VERSION}: update the pack")


def contents_of(adapter):
    parts = ["image_proj", "ip_adapter"] if adapter.has_image_layers else []
    if adapter.has_text_to_weight:
        parts.append("text_to_weight")
    if adapter.has_self_attn_lora:
        parts.append("self_attn_lora")
    if adapter.fusion is not None:
        parts.append("fusion")
    return ",".join(parts)


def save_adapter(adapter, path):
    """Write the pack's own safetensors file (atomic: temp file + rename)."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in adapter.state_dict().items()}
    metadata = {"format": PACK_FORMAT, "format_version": PACK_FORMAT_VERSION,
                "family": adapter.family, "kind": adapter.kind, "contents": contents_of(adapter),
                "layers": str(len(adapter.layers))}
    alpha = adapter.lora_alpha()
    if alpha is not None:
        metadata["lora_alpha"] = repr(alpha)
    if adapter.has_image_layers:
        metadata["uncond"] = adapter.uncond_convention
    return weights_files.write_safetensors(path, tensors, metadata)

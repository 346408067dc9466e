"""The published Flux image adapters, detected by their keys and loaded into plain torch modules,
and their per-block attention math. Plain torch; no host import.

Layouts (as the files are published; nested pickles flattened with dots by the caller):
  InstantX / Shakker-Labs `ip-adapter.bin` (FLUX.1-dev-IP-Adapter):
    image_proj.proj.0.{weight,bias}, image_proj.proj.2.{weight,bias}, image_proj.norm.{weight,bias}
      an MLP (Linear, GELU, Linear) from the SigLIP so400m pooled embedding (1152 wide) to
      `tokens` (128) tokens of the text-context width (4096), then a LayerNorm per token;
    ip_adapter.{n}.to_k_ip.weight, ip_adapter.{n}.to_v_ip.weight (no bias), n = 0.. over the
      double blocks then the single blocks (19 + 38); keys and values are RMS-normalized per head
      (no learned scale).
  XLabs `flux-ip-adapter` (ip_adapter.safetensors):
    ip_adapter_proj_model.proj.{weight,bias}, ip_adapter_proj_model.norm.{weight,bias}
      a Linear from the CLIP-L image embedding (768) to 4 tokens of width 4096, then a LayerNorm;
    double_blocks.{i}.processor.ip_adapter_double_stream_{k,v}_proj.{weight,bias}: the double
      blocks only, with bias, no normalization.
In every block the image queries (after the block's QK-norm) attend to the adapter's keys and
values of the image tokens, head by head; the result (B, N, H*D) times the scale is what the
adapter adds (where it is added is the host glue's business).
"""
import re
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .adapter import AdapterMismatchError, fingerprint_of
from .weights_files import CheckpointError

INSTANTX = "instantx_flux"
XLABS = "xlabs_flux"
FAMILY = "flux"
RMS_EPS = 1e-5  # InstantX's key/value RMSNorm

IMAGE_ENCODERS = {
    INSTANTX: "SigLIP so400m (google/siglip-so400m-patch14-384), its pooled output",
    XLABS: "CLIP ViT-L/14 (openai/clip-vit-large-patch14), its image_embeds",
}

_LAYOUTS = {
    INSTANTX: ("image_proj.proj.0.weight", "image_proj.proj.0.bias", "image_proj.proj.2.weight",
               "image_proj.proj.2.bias", "image_proj.norm.weight", "image_proj.norm.bias",
               "ip_adapter.0.to_k_ip.weight", "ip_adapter.0.to_v_ip.weight"),
    XLABS: ("ip_adapter_proj_model.proj.weight", "ip_adapter_proj_model.proj.bias",
            "ip_adapter_proj_model.norm.weight", "ip_adapter_proj_model.norm.bias",
            "double_blocks.0.processor.ip_adapter_double_stream_k_proj.weight",
            "double_blocks.0.processor.ip_adapter_double_stream_k_proj.bias",
            "double_blocks.0.processor.ip_adapter_double_stream_v_proj.weight",
            "double_blocks.0.processor.ip_adapter_double_stream_v_proj.bias"),
}
_INSTANTX_LAYER = re.compile(r"^ip_adapter\.(\d+)\.(to_k_ip|to_v_ip)\.weight$")
_XLABS_LAYER = re.compile(r"^double_blocks\.(\d+)\.processor\.ip_adapter_double_stream_([kv])_proj"
                          r"\.(weight|bias)$")


def detect_flux_adapter(keys):
    """The Flux adapter kind whose keys are all present, or None (not a Flux adapter)."""
    keys = set(keys)
    for kind, required in _LAYOUTS.items():
        if keys.issuperset(required):
            return kind
    return None


class TokenProjection(nn.Module):
    """Image embedding (B, E) -> (B, tokens, width): InstantX's MLP or XLabs' linear map,
    then a LayerNorm per token."""

    def __init__(self, linears, width):
        super().__init__()
        self.linears = nn.ModuleList(linears)
        self.norm = nn.LayerNorm(width)

    @property
    def input_width(self):
        return self.linears[0].in_features

    @property
    def tokens(self):
        return self.linears[-1].out_features // self.norm.normalized_shape[0]

    def forward(self, embeds):
        x = embeds
        for i, linear in enumerate(self.linears):
            x = linear(F.gelu(x) if i else x)
        return self.norm(x.reshape(x.shape[0], self.tokens, -1))


class BlockKV(nn.Module):
    """One block's image keys and values from the projected tokens."""

    def __init__(self, to_k, to_v, rms_norm):
        super().__init__()
        self.to_k, self.to_v, self.rms_norm = to_k, to_v, rms_norm

    def forward(self, tokens, heads):
        """(B, M, C) tokens -> keys, values (B, H, M, D), in the tokens' device and dtype (the
        weights are cast for the call; the loaded adapter stays where it is)."""
        k, v = (F.linear(tokens, p.weight.to(tokens), None if p.bias is None else p.bias.to(tokens))
                .unflatten(-1, (heads, -1)).transpose(1, 2) for p in (self.to_k, self.to_v))
        if self.rms_norm:
            k, v = rms_normalize(k), rms_normalize(v)
        return k, v


def rms_normalize(x):
    return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + RMS_EPS).to(x.dtype)


def _linear(weight, bias=None):
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


@dataclass
class FluxAdapter:
    """A loaded Flux image adapter (ComfyUI type MULTIREF_ADAPTER, like the UNet adapters).
    layers: BlockKV in the file's order (XLabs: the double blocks; InstantX: the double blocks
    then the single blocks, split by the model's count in `block_layers`)."""
    kind: str
    projection: TokenProjection
    layers: list
    source: str = ""
    family: str = FAMILY
    fingerprint: str = ""
    pooling: Optional[nn.Module] = None  # SigLIP's attention-pooling head (InstantX), if given

    def __post_init__(self):
        if not self.fingerprint:
            named = dict(self.projection.state_dict(prefix="projection."))
            for n, layer in enumerate(self.layers):
                named.update(layer.state_dict(prefix=f"layers.{n}."))
            self.fingerprint = fingerprint_of(named)

    def require_image_layers(self, where):
        """Every Flux adapter file has image layers (the UNet adapters' LoRA-only files have
        none): nothing to refuse."""

    @property
    def clip_input(self):
        """The image encoder output it reads (a pooled embedding per image)."""
        return "image_embeds"

    fusion = None  # no feature fusion of CLIP layers (kernels/feature_fusion.py) for Flux

    def project(self, output, fusion_weights=None):
        """(B, tokens, C) from an image encoder's output (ComfyUI's encode_image dict).
        fusion_weights: a feature fusion's override, always None here (no fusion)."""
        embeds = output["image_embeds"]
        if embeds.ndim == 3 and self.pooling is not None:
            embeds = self.pooling(embeds)
        if embeds.ndim != 2:
            raise AdapterMismatchError(
                f"{self.describe()} reads one pooled {self.projection.input_width}-wide embedding "
                f"per image from {self.image_encoder}, but the image encoder gives a sequence of "
                f"{tuple(embeds.shape[1:])}: ComfyUI's SigLIP returns its last hidden states "
                "without the attention-pooling head that gives SigLIP's pooled output; pick the "
                "SigLIP file in MultiRef Encode References' siglip_head (the pack reads the head "
                "from it)")
        self.check_image_embeds(embeds.shape[-1])
        weight = self.projection.linears[0].weight
        return self.projection(embeds.to(weight.device, weight.dtype))

    def uncond_tokens(self, encode_pixels, image_size, mean, std, fusion_weights=None):
        """(1, tokens, C) the "no image" tokens: the projection of a black image's embedding (the
        negative image of XLabs' pipeline; InstantX publishes none, and gets the same).
        fusion_weights: always None (no feature fusion)."""
        pixels = ((0.0 - torch.tensor(mean)) / torch.tensor(std))[None, :, None, None]
        return self.project(encode_pixels(pixels.expand(1, 3, image_size, image_size)))

    @property
    def context_dim(self):
        return self.projection.norm.normalized_shape[0]

    @property
    def inner_dim(self):
        return self.layers[0].to_k.out_features

    @property
    def image_encoder(self):
        return IMAGE_ENCODERS[self.kind]

    def describe(self):
        name = {INSTANTX: "InstantX Flux IP-Adapter", XLABS: "XLabs Flux IP-Adapter"}[self.kind]
        return f"{name} {self.source}".strip()

    def check_image_embeds(self, width):
        if width != self.projection.input_width:
            raise AdapterMismatchError(
                f"{self.describe()} reads {self.projection.input_width}-wide image embeddings of "
                f"{self.image_encoder}, but the image encoder gives {width}-wide ones; use that "
                "encoder")

    def block_layers(self, double_blocks, single_blocks, hidden_size, context_dim):
        """(double-block layers, single-block layers) for a Flux model of these sizes; refuses
        a model the adapter was not made for, naming both sides."""
        covered = double_blocks + (single_blocks if self.kind == INSTANTX else 0)
        mine = (len(self.layers), self.inner_dim, self.context_dim)
        model = (covered, hidden_size, context_dim)
        if mine != model:
            blocks = "double + single" if self.kind == INSTANTX else "double"
            raise AdapterMismatchError(
                f"{self.describe()} has {mine[0]} block layers of width {mine[1]} reading "
                f"{mine[2]}-wide tokens; the model has {model[0]} {blocks} blocks of width "
                f"{model[1]} and {model[2]}-wide text: use a FLUX.1 model (dev, Kontext or a "
                "fine-tune of them) or an adapter made for this one")
        return self.layers[:double_blocks], self.layers[double_blocks:]


def check_adapter_for_flux(adapter):
    """A UNet adapter (SD1.5 / SDXL) handed to a Flux model: a named error."""
    if getattr(adapter, "family", None) != FAMILY:
        raise AdapterMismatchError(
            f"{adapter.describe()} is made for {str(adapter.family).upper()} but the model is "
            "FLUX; use a Flux adapter (InstantX ip-adapter.bin or XLabs flux-ip-adapter)")
    return adapter


def load_flux_adapter(tensors, source="checkpoint"):
    """A FluxAdapter from flat tensors (detect_flux_adapter(tensors) must not be None)."""
    kind = detect_flux_adapter(tensors)
    if kind == INSTANTX:
        projection = TokenProjection([_linear(tensors["image_proj.proj.0.weight"],
                                              tensors["image_proj.proj.0.bias"]),
                                      _linear(tensors["image_proj.proj.2.weight"],
                                              tensors["image_proj.proj.2.bias"])],
                                     tensors["image_proj.norm.weight"].shape[0])
        _load_norm(projection, tensors, "image_proj.norm.")
        numbers = _numbers(tensors, _INSTANTX_LAYER, source)
        blocks = [BlockKV(_linear(tensors[f"ip_adapter.{n}.to_k_ip.weight"]),
                          _linear(tensors[f"ip_adapter.{n}.to_v_ip.weight"]), rms_norm=True)
                  for n in numbers]
        return FluxAdapter(kind, projection, blocks, source)
    if kind == XLABS:
        prefix = "ip_adapter_proj_model."
        projection = TokenProjection([_linear(tensors[prefix + "proj.weight"],
                                              tensors[prefix + "proj.bias"])],
                                     tensors[prefix + "norm.weight"].shape[0])
        _load_norm(projection, tensors, prefix + "norm.")
        blocks = []
        for n in _numbers(tensors, _XLABS_LAYER, source):
            p = f"double_blocks.{n}.processor.ip_adapter_double_stream_"
            blocks.append(BlockKV(_linear(tensors[p + "k_proj.weight"], tensors[p + "k_proj.bias"]),
                                  _linear(tensors[p + "v_proj.weight"], tensors[p + "v_proj.bias"]),
                                  rms_norm=False))
        return FluxAdapter(kind, projection, blocks, source)
    raise CheckpointError(f"{source}: not a Flux adapter (InstantX ip-adapter.bin or XLabs "
                          "flux-ip-adapter key layout)")


def _load_norm(projection, tensors, prefix):
    with torch.no_grad():
        projection.norm.weight.copy_(tensors[prefix + "weight"])
        projection.norm.bias.copy_(tensors[prefix + "bias"])


def _numbers(tensors, pattern, source):
    """The block numbers of the file, checked to be 0, 1, 2, ... with every tensor present."""
    found = {}
    for key in tensors:
        match = pattern.match(key)
        if match:
            found.setdefault(int(match.group(1)), set()).add(match.groups()[1:])
    numbers = sorted(found)
    complete = max(len(parts) for parts in found.values())
    if numbers != list(range(len(numbers))) or any(len(p) != complete for p in found.values()):
        raise CheckpointError(f"{source}: its per-block image layers are numbered {numbers[:6]}... "
                              "or incomplete; the file is damaged (download it again)")
    return numbers


def image_attention(q, keys, values):
    """Image queries q (B, H, N, D) attend to one reference's adapter keys/values (B, H, M, D):
    (B, N, H * D)."""
    out = F.scaled_dot_product_attention(q, keys.to(q.dtype), values.to(q.dtype))
    return out.transpose(1, 2).flatten(2)


def sequence_injection(q, keys, values, text_len, decouple_text=True):
    """The adapter's addition for a whole [text; image] sequence q (B, H, T + N, D), as InstantX
    adds it in the single blocks: every query reads the adapter's tokens. Dynamic Decoupling
    (DynaIP) keeps the image features off the text tokens: their rows get 0 and only the image
    queries are computed."""
    if not decouple_text:
        return image_attention(q, keys, values)
    image = image_attention(q[:, :, text_len:], keys, values)
    return torch.cat([image.new_zeros(image.shape[0], text_len, image.shape[2]), image], dim=1)

"""IP-Adapter modules in the published h94 layout, and the loaded-adapter object the pack passes
around (ComfyUI type MULTIREF_ADAPTER). Plain torch, no ComfyUI import.

Module names mirror the published state-dict keys, so `state_dict()` of these modules gives the
published names (`image_proj.latents`, `image_proj.layers.0.0.to_q.weight`, ...).
"""
import hashlib
from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

# Every published Plus Resampler uses 64-wide heads (SD1.5: 12 heads of 768; SDXL: 20 of 1280);
# the head count is not stored in the files, so it is derived from this.
RESAMPLER_DIM_HEAD = 64
PLUS_INPUT = "penultimate_hidden_states"  # CLIP vision output a Plus adapter reads
BASE_INPUT = "image_embeds"  # CLIP vision output a base adapter reads
# CLIP vision output key of the hidden states a feature fusion reads: {hidden-state number: tensor}
HIDDEN_STATES = "multiref_hidden_states"

# What each checkpoint family's own code projects for "no image" (the unconditional branch and
# dropped images in training). Base adapters, all families: an all-zero image_embeds vector.
# Plus adapters read CLIP hidden states, so the "no image" is a pixel tensor:
UNCOND_ZERO_EMBEDS = "zero-image-embeds"
UNCOND_ZERO_PIXELS = "zero-normalized-pixels"  # h94, MIP: zero AFTER CLIP normalization
UNCOND_GRAY_PIXELS = "gray-pixels"  # SynCD: zeros of its [-1, 1] images = mid-gray 0.5
UNCOND_CONVENTIONS = (UNCOND_ZERO_EMBEDS, UNCOND_ZERO_PIXELS, UNCOND_GRAY_PIXELS)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's pixel normalization
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# The published files number their layers in diffusers' order: down, up, mid.
SECTION_ORDER = {"input": 0, "output": 1, "middle": 2}


def published_order(locations):
    """ComfyUI locations (block_name, block_id, transformer_index) sorted into the published
    layer order: input blocks (= diffusers down blocks), output blocks (= up), middle (= mid)."""
    return sorted((tuple(loc) for loc in locations),
                  key=lambda loc: (SECTION_ORDER[loc[0]], loc[1], loc[2]))


class AdapterMismatchError(ValueError):
    """Two parts do not fit (adapter vs CLIP vision vs base model); names both sides."""


class PerceiverAttention(nn.Module):
    """Latent queries attend to [image features | latents] (IP-Adapter Plus layout)."""

    def __init__(self, dim, heads, dim_head):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        inner = heads * dim_head
        self.norm1 = nn.LayerNorm(dim)  # image features
        self.norm2 = nn.LayerNorm(dim)  # latents
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, features, latents):
        x, lat = self.norm1(features), self.norm2(latents)
        q = self.to_q(lat)
        k, v = self.to_kv(torch.cat([x, lat], dim=1)).chunk(2, dim=-1)
        b = q.shape[0]
        q, k, v = (t.reshape(b, t.shape[1], self.heads, self.dim_head).transpose(1, 2)
                   for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, -1, self.heads * self.dim_head))


def feed_forward(dim, mult):
    # Sequential indices 0, 1, 3 are the published key names `layers.{i}.1.{0,1,3}`.
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * mult, bias=False), nn.GELU(),
                         nn.Linear(dim * mult, dim, bias=False))


class Resampler(nn.Module):
    """IP-Adapter Plus image projection: learned queries read CLIP penultimate hidden states.

    Published configs: SD1.5 dim 768, 12 heads, output 768; SDXL dim 1280, 20 heads, output 2048;
    both depth 4, 16 queries, input 1280 (CLIP ViT-H), ff_mult 4.
    """
    clip_input = PLUS_INPUT

    def __init__(self, dim, depth, heads, num_queries, embedding_dim, output_dim, ff_mult=4,
                 dim_head=RESAMPLER_DIM_HEAD):
        super().__init__()
        self.latents = nn.Parameter(torch.zeros(1, num_queries, dim))
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, heads, dim_head), feed_forward(dim, ff_mult)])
            for _ in range(depth))

    @classmethod
    def from_state_dict(cls, sd):
        """Build from published keys (without the `image_proj.` prefix); dims read from shapes."""
        depth = len({k.split(".")[1] for k in sd if k.startswith("layers.")})
        dim = sd["latents"].shape[2]
        inner = sd["layers.0.0.to_q.weight"].shape[0]
        with torch.device("meta"):  # no random init: the file's tensors become the parameters
            module = cls(dim=dim, depth=depth, heads=inner // RESAMPLER_DIM_HEAD,
                         num_queries=sd["latents"].shape[1],
                         embedding_dim=sd["proj_in.weight"].shape[1],
                         output_dim=sd["proj_out.weight"].shape[0],
                         ff_mult=sd["layers.0.1.1.weight"].shape[0] // dim)
        module.load_state_dict(sd, assign=True)
        return module

    @property
    def input_width(self):
        return self.proj_in.in_features

    @property
    def output_dim(self):
        return self.proj_out.out_features

    @property
    def tokens(self):
        return self.latents.shape[1]

    def forward(self, features):
        latents = self.latents.expand(features.shape[0], -1, -1)
        x = self.proj_in(features)
        for attention, ff in self.layers:
            latents = attention(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


class LinearProjection(nn.Module):
    """Base IP-Adapter image projection: CLIP image_embeds -> T tokens (4 published)."""
    clip_input = BASE_INPUT

    def __init__(self, embedding_dim, output_dim, tokens=4):
        super().__init__()
        self.proj = nn.Linear(embedding_dim, tokens * output_dim)
        self.norm = nn.LayerNorm(output_dim)

    @classmethod
    def from_state_dict(cls, sd):
        output_dim = sd["norm.weight"].shape[0]
        with torch.device("meta"):
            module = cls(sd["proj.weight"].shape[1], output_dim, sd["proj.weight"].shape[0] // output_dim)
        module.load_state_dict(sd, assign=True)
        return module

    @property
    def input_width(self):
        return self.proj.in_features

    @property
    def output_dim(self):
        return self.norm.normalized_shape[0]

    @property
    def tokens(self):
        return self.proj.out_features // self.output_dim

    def forward(self, embeds):
        return self.norm(self.proj(embeds).reshape(embeds.shape[0], self.tokens, self.output_dim))


class MLPProjection(nn.Module):
    """Full-face IP-Adapter image projection (h94 ip-adapter-full-face_sd15): each CLIP
    penultimate hidden state (257 tokens for ViT-H at 224 px: the class token and 16x16 patches)
    goes on its own through Linear -> GELU -> Linear -> LayerNorm (published keys proj.0, proj.2,
    proj.3), so the adapter gives one token per CLIP token."""
    clip_input = PLUS_INPUT
    tokens = None  # as many as the CLIP vision model gives

    def __init__(self, embedding_dim, output_dim):
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(embedding_dim, embedding_dim), nn.GELU(),
                                  nn.Linear(embedding_dim, output_dim), nn.LayerNorm(output_dim))

    @classmethod
    def from_state_dict(cls, sd):
        with torch.device("meta"):
            module = cls(sd["proj.0.weight"].shape[1], sd["proj.2.weight"].shape[0])
        module.load_state_dict(sd, assign=True)
        return module

    @property
    def input_width(self):
        return self.proj[0].in_features

    @property
    def output_dim(self):
        return self.proj[2].out_features

    def forward(self, hidden_states):
        return self.proj(hidden_states)


def uncond_pixel_values(convention, size=224, mean=CLIP_MEAN, std=CLIP_STD):
    """(1, 3, size, size) CLIP input (already normalized) of a Plus adapter's "no image"."""
    if convention == UNCOND_ZERO_PIXELS:
        return torch.zeros(1, 3, size, size)
    if convention == UNCOND_GRAY_PIXELS:
        gray = (0.5 - torch.tensor(mean, dtype=torch.float32)) / torch.tensor(std, dtype=torch.float32)
        return gray.reshape(1, 3, 1, 1).expand(1, 3, size, size).contiguous()
    raise ValueError(f"no pixel input for the uncond convention {convention!r}")


def image_projection_from_state_dict(sd):
    """`sd` without the `image_proj.` prefix; the layout says which projection it is."""
    if "latents" in sd:
        return Resampler.from_state_dict(sd)
    return (MLPProjection if "proj.3.weight" in sd else LinearProjection).from_state_dict(sd)


class LoRAPair(nn.Module):
    """A low-rank update of one projection: delta(x) = up(down(x)) * alpha / rank."""

    def __init__(self, in_features, out_features, rank, alpha):
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=False)
        self.alpha = float(alpha)

    @property
    def scale(self):
        return self.alpha / self.down.out_features

    def forward(self, x):
        return self.up(self.down(x)) * self.scale


SELF_ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out")


class AdapterLayer(nn.Module):
    """What one transformer block's cross-attention gets from the adapter.

    to_k_ip, to_v_ip: Linear(C_ctx -> inner, no bias), project image tokens to keys / values;
        None in a LoRA-only file (see LoadedAdapter).
    text_to_weight: Linear(inner -> 1, no bias) of MIP-Adapter (routing gate on the text-attention
        output before to_out), or None.
    self_attn_lora: ModuleDict {to_q, to_k, to_v, to_out: LoRAPair} on the same block's
        self-attention (SynCD), or None.
    """

    def __init__(self, to_k_ip, to_v_ip, text_to_weight=None, self_attn_lora=None):
        super().__init__()
        self.to_k_ip, self.to_v_ip = to_k_ip, to_v_ip
        self.text_to_weight = text_to_weight
        self.self_attn_lora = self_attn_lora

    @property
    def context_dim(self):
        return self.to_k_ip.in_features

    @property
    def inner_dim(self):
        return self.to_k_ip.out_features


def linear_from_weight(weight):
    with torch.device("meta"):
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    layer.load_state_dict({"weight": weight}, assign=True)
    return layer


def fingerprint_of(named_tensors):
    """Identifies a set of weights: names, shapes and a sample of each tensor's values (a digest
    of every byte would cost seconds on a 1 GB file for no practical gain)."""
    digest = hashlib.sha256()
    for name in sorted(named_tensors):
        t = named_tensors[name].detach()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        digest.update(t.reshape(-1)[:4096].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


@dataclass(frozen=True, eq=False)  # tensors inside: compare fields explicitly
class LoadedAdapter:
    """A loaded adapter (ComfyUI type MULTIREF_ADAPTER). Treat it as immutable: patches read it.

    kind: "ip_adapter" | "ip_adapter_plus" | "mip_adapter" | "mip_adapter_plus" | "syncd" |
        "multiref" (trained by this pack), as detected from the keys or the pack's metadata.
    family: base model family, "sd15" or "sdxl".
    image_proj: Resampler (Plus: 16 tokens from CLIP penultimate hidden states),
        MLPProjection (full-face: one token per CLIP hidden state) or LinearProjection (base: 4
        tokens from CLIP image_embeds); None in a LoRA-only file (the
        trainer's self-attention LoRA without an adapter: it serves Masked Shared Attention only).
    layers: AdapterLayer per cross-attention layer, in the published order (diffusers attention
        order: down blocks, up blocks, mid block); published key `ip_adapter.{2*i+1}` is layers[i].
    locations: the ComfyUI attention location (block_name, block_id, transformer_index) of each
        layer, same order; None until `bind` matched the adapter to a UNet.
    source: the file it came from (for messages).
    fingerprint: identifies the weights; encoded references carry it.
    uncond_from: for files this pack trained, the "no image" convention of the adapter training
        started from (UNCOND_*; kept in the file's metadata); "" = decided by `kind`.
    fusion: a kernels.feature_fusion.FeatureFusion adding experts of several CLIP layers to the
        image projection's tokens, or None (the tokens are the projection's alone).
    Weights keep the file's dtype (often fp16) on the CPU; callers cast them to their inputs'
    device and dtype when they use them.
    """
    kind: str
    family: str
    image_proj: Optional[nn.Module]
    layers: tuple
    source: str = ""
    locations: Optional[tuple] = None
    fingerprint: str = ""
    uncond_from: str = ""
    fusion: Optional[nn.Module] = None

    def __post_init__(self):
        if not self.fingerprint:
            object.__setattr__(self, "fingerprint", fingerprint_of(self.state_dict()))

    # -- shapes ---------------------------------------------------------------------------------
    @property
    def has_image_layers(self):
        return self.image_proj is not None

    def require_image_layers(self, where):
        """Raise a clear error when a LoRA-only file reaches a use that needs image layers."""
        if not self.has_image_layers:
            raise AdapterMismatchError(
                f"{where}: {self.describe()} holds only a self-attention LoRA (trained without an "
                "adapter), no image layers; connect it to MultiRef Apply MSA's adapter input, and "
                "load an IP-Adapter or MIP-Adapter file here")

    @property
    def tokens(self):
        """Image tokens per view (16 Plus, 4 base; None for full-face: one per CLIP token)."""
        return self.image_proj.tokens

    @property
    def context_dim(self):
        """Width of the image tokens = the UNet's cross-attention context width it was made for."""
        return self.image_proj.output_dim

    @property
    def clip_input(self):
        """Which CLIP vision output it reads: 'penultimate_hidden_states' or 'image_embeds'."""
        return self.image_proj.clip_input

    @property
    def clip_width(self):
        return self.image_proj.input_width

    @property
    def has_text_to_weight(self):
        return all(layer.text_to_weight is not None for layer in self.layers)

    @property
    def has_self_attn_lora(self):
        return any(layer.self_attn_lora is not None for layer in self.layers)

    @property
    def uncond_convention(self):
        """How this adapter's family computes its "no image" tokens (UNCOND_*): a base adapter
        projects zero image_embeds (h94 ip_adapter.py get_image_embeds, MIP, SynCD sample.py,
        ComfyUI_IPAdapter_plus); a Plus adapter encodes a pixel tensor that is zero after CLIP
        normalization (h94 / MIP IPAdapterPlus*.get_image_embeds and their training drop), SynCD
        a mid-gray image (its [-1, 1] zeros, in sampling and in training)."""
        if self.clip_input == BASE_INPUT:
            return UNCOND_ZERO_EMBEDS
        if self.uncond_from:
            return self.uncond_from
        return UNCOND_GRAY_PIXELS if self.kind == "syncd" else UNCOND_ZERO_PIXELS

    def uncond_tokens(self, encode_pixels, size=224, mean=CLIP_MEAN, std=CLIP_STD,
                      fusion_weights=None):
        """(1, T, C_ctx) "no image" tokens as the family's own code computes them.
        encode_pixels(normalized pixel values (1, 3, size, size)) -> the CLIP vision outputs
        (a mapping with the host's keys); size, mean, std: that CLIP vision model's input;
        fusion_weights: as `project`'s."""
        convention = self.uncond_convention
        if convention == UNCOND_ZERO_EMBEDS:
            param = next(self.image_proj.parameters())
            return self.project({BASE_INPUT: torch.zeros(1, self.clip_width, device=param.device)})
        return self.project(encode_pixels(uncond_pixel_values(convention, size, mean, std)),
                            fusion_weights)

    def describe(self):
        contents = "self-attention LoRA only"
        if self.has_image_layers:
            count = "one token per CLIP token" if self.tokens is None else f"{self.tokens} tokens"
            contents = f"{count} of width {self.context_dim}"
        if self.fusion is not None:
            contents += f", feature fusion of CLIP hidden states {list(self.fusion.layers)}"
        return f"{self.source or 'adapter'} ({self.kind}, {self.family}, {len(self.layers)} layers, {contents})"

    # -- use ------------------------------------------------------------------------------------
    def project(self, clip_vision_output, fusion_weights=None):
        """CLIP vision output (a mapping with the host's keys) -> (B, T, C_ctx) image tokens.
        With a feature fusion the output also needs its HIDDEN_STATES; fusion_weights: None =
        the fusion's router, or the user's (w_low, w_mid, w_high)."""
        self.require_image_layers("encoding reference images")
        try:
            features = clip_vision_output[self.clip_input]
        except (KeyError, AttributeError):
            raise AdapterMismatchError(f"the CLIP vision output has no {self.clip_input}, which "
                                       f"{self.describe()} reads; connect a CLIP vision model "
                                       "(CLIP_VISION)") from None
        if features.shape[-1] != self.clip_width:
            raise AdapterMismatchError(
                f"CLIP vision gives {self.clip_input} of width {features.shape[-1]} but "
                f"{self.describe()} expects width {self.clip_width}; load the CLIP vision model "
                f"this adapter was trained with: {clip_model_hint(self.clip_input, self.clip_width)}")
        tokens = run_frozen(self.image_proj, features)
        if self.fusion is None:
            return tokens
        try:
            hidden_states = clip_vision_output[HIDDEN_STATES]
        except (KeyError, AttributeError):
            raise AdapterMismatchError(f"{self.describe()} fuses several CLIP vision layers, but "
                                       f"the CLIP vision output has no {HIDDEN_STATES}") from None
        return run_frozen(self.fusion, tokens, hidden_states, fusion_weights)

    def bind(self, unet_locations, attention_dims=None):
        """A copy whose layers are tied to a UNet's attention locations.

        unet_locations: the UNet's transformer-block locations (any order). attention_dims:
        optional {location: (context_dim, inner_dim)} of each block's cross-attention, checked
        against the adapter before anything runs.
        """
        ordered = tuple(published_order(unet_locations))
        if len(ordered) != len(self.layers):
            raise AdapterMismatchError(
                f"{self.describe()} has {len(self.layers)} cross-attention layers but the model "
                f"has {len(ordered)}; use an adapter made for this base model")
        for index, location in enumerate(ordered if attention_dims and self.has_image_layers else ()):
            context_dim, inner_dim = attention_dims[location]
            layer = self.layers[index]
            if (context_dim, inner_dim) != (layer.context_dim, layer.inner_dim):
                raise AdapterMismatchError(
                    f"layer ip_adapter.{2 * index + 1} of {self.describe()} maps context "
                    f"{layer.context_dim} -> {layer.inner_dim} but the model's cross-attention at "
                    f"{location} maps {context_dim} -> {inner_dim}; use an adapter made for this "
                    "base model")
        return replace(self, locations=ordered)

    def layer(self, location):
        """The AdapterLayer at a ComfyUI attention location (needs `bind` first)."""
        if self.locations is None:
            raise RuntimeError("LoadedAdapter.layer: bind the adapter to a model first "
                               "(adapter.bind(locations))")
        try:
            return self.layers[self.locations.index(tuple(location))]
        except ValueError:
            raise KeyError(f"{self.describe()} has no layer at {location}") from None

    def state_dict(self):
        """Flat tensors under the published names (plus `self_attn_lora.{2*i}.*` for LoRA)."""
        out = {f"image_proj.{k}": v for k, v in
               (self.image_proj.state_dict() if self.has_image_layers else {}).items()}
        if self.fusion is not None:
            out.update(self.fusion.state_dict_flat())
        for i, layer in enumerate(self.layers):
            number = 2 * i + 1
            if layer.to_k_ip is not None:
                out[f"ip_adapter.{number}.to_k_ip.weight"] = layer.to_k_ip.weight
                out[f"ip_adapter.{number}.to_v_ip.weight"] = layer.to_v_ip.weight
            if layer.text_to_weight is not None:
                out[f"ip_adapter.{number}.text_to_weight.weight"] = layer.text_to_weight.weight
            for name, pair in (layer.self_attn_lora or {}).items():
                out[f"self_attn_lora.{number - 1}.{name}.down.weight"] = pair.down.weight
                out[f"self_attn_lora.{number - 1}.{name}.up.weight"] = pair.up.weight
        return out

    def lora_alpha(self):
        alphas = {pair.alpha for layer in self.layers for pair in (layer.self_attn_lora or {}).values()}
        return alphas.pop() if len(alphas) == 1 else None


def run_frozen(module, *inputs):
    """module(*inputs) without gradient, on the module's device and in its dtype; half-precision
    weights on the CPU run in float32 (CPU fp16 is slow and less exact). Tensors of `inputs`
    (also inside a dict) are moved; None passes."""
    param = next(module.parameters())
    half_on_cpu = param.device.type == "cpu" and param.dtype != torch.float32
    dtype = torch.float32 if half_on_cpu else param.dtype

    def moved(x):
        if isinstance(x, dict):
            return {k: moved(v) for k, v in x.items()}
        return x.to(param.device, dtype) if isinstance(x, torch.Tensor) else x
    inputs = tuple(moved(x) for x in inputs)
    with torch.no_grad():
        if not half_on_cpu:
            return module(*inputs)
        weights = {k: v.float() for k, v in module.state_dict().items()}
        return torch.func.functional_call(module, weights, inputs)


def clip_model_hint(clip_input, width):
    known = {(PLUS_INPUT, 1280): "CLIP ViT-H/14 (CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors)",
             (BASE_INPUT, 1024): "CLIP ViT-H/14 (CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors)",
             (BASE_INPUT, 1280): "CLIP ViT-bigG/14 (CLIP-ViT-bigG-14-laion2B-39B-b160k.safetensors)"}
    return known.get((clip_input, width), f"one whose {clip_input} are {width} wide")


def build_adapter(kind, family, tensors, source="", lora_alpha=None):
    """A LoadedAdapter from flat tensors under the names `state_dict()` writes (a LoRA-only set,
    `self_attn_lora.*` alone, gives an adapter without image layers)."""
    proj = {k[len("image_proj."):]: v for k, v in tensors.items() if k.startswith("image_proj.")}
    count = len([k for k in tensors if k.startswith("ip_adapter.") and k.endswith(".to_k_ip.weight")]
                or [k for k in tensors if k.startswith("self_attn_lora.") and k.endswith(".to_q.down.weight")])
    layers = []
    for i in range(count):
        number = 2 * i + 1
        gate = tensors.get(f"ip_adapter.{number}.text_to_weight.weight")
        lora = None
        if f"self_attn_lora.{number - 1}.to_q.down.weight" in tensors:
            lora = nn.ModuleDict()
            for name in SELF_ATTENTION_PROJECTIONS:
                down = tensors[f"self_attn_lora.{number - 1}.{name}.down.weight"]
                up = tensors[f"self_attn_lora.{number - 1}.{name}.up.weight"]
                with torch.device("meta"):
                    pair = LoRAPair(down.shape[1], up.shape[0], down.shape[0],
                                    down.shape[0] if lora_alpha is None else lora_alpha)
                pair.load_state_dict({"down.weight": down, "up.weight": up}, assign=True)
                lora[name] = pair
        to_k, to_v = (tensors.get(f"ip_adapter.{number}.{name}.weight") for name in ("to_k_ip", "to_v_ip"))
        layers.append(AdapterLayer(None if to_k is None else linear_from_weight(to_k),
                                   None if to_v is None else linear_from_weight(to_v),
                                   None if gate is None else linear_from_weight(gate), lora))
    return LoadedAdapter(kind=kind, family=family,
                         image_proj=image_projection_from_state_dict(proj) if proj else None,
                         layers=tuple(layers), source=source)

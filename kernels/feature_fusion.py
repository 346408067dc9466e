"""Hierarchical mixture-of-experts fusion of CLIP vision features (DynaIP's feature fusion
module), on top of an adapter's own image projection. Plain torch, no ComfyUI import.

Three levels of the CLIP vision encoder feed one expert each (low: fine detail, mid, high: the
coarse likeness the adapter already reads). The image tokens are

    tokens = P(h_a) + sum_e w_e * E_e(h_e),   e in (low, mid, high),  w = softmax(router)

P: the adapter's own image projection of the hidden states h_a it reads (the penultimate ones),
E_e: an expert, a projection of the same class and shape as P reading level e's hidden states,
w: the router's weights (one triple per image, summing to 1), or the user's override.
Since the weights sum to 1 this is the convex mix of the level experts P(h_a) + E_e(h_e). Each
expert starts as a copy of P whose output LayerNorm gain and shift are zero, so it gives exactly
zero: before training the tokens equal the adapter's own for any router weights, and training
moves each expert away from zero from the first step (the gain's gradient is the normalized
projection, not zero). The router is a linear map of the class tokens of the three levels,
starting at zero weight and a bias that puts most weight on the high level.

Which hidden states: "hidden state k" is the input of encoder layer k (0-based), i.e. the output
of layer k-1, hidden state 0 being the embeddings after the pre-layer norm (the numbering of the
`hidden_states` of transformers' CLIP). For an encoder of n layers the levels are
    low = floor(10 n / 32), mid = floor(17 n / 32), high = n - 1 (the penultimate hidden state)
which gives DynaIP's layers 10 and 17 for ViT-H/14 (32 layers), 7 / 12 / 23 for ViT-L (24),
15 / 25 / 47 for ViT-bigG (48) and 0 / 1 / 2 for the pack's 3-layer tiny CLIP vision; the three
are distinct for every n >= 3.

File layout (its own section of the pack's safetensors format, detected by these keys):
    fusion.layers                 int64 (3,): the hidden-state numbers of low, mid, high
    fusion.router.weight, .bias   (3, 3 W), (3,): W = the CLIP vision width
    fusion.experts.{low,mid,high}.<the image projection's own keys (image_proj.* without it)>
"""
import copy

import torch
from torch import nn

from .adapter import (HIDDEN_STATES, PLUS_INPUT, MLPProjection, Resampler,
                      image_projection_from_state_dict)

LEVELS = ("low", "mid", "high")
PREFIX = "fusion."
# DynaIP's low and mid layers for ViT-H/14, whose encoder has 32 layers.
REFERENCE_DEPTH, REFERENCE_LOW, REFERENCE_MID = 32, 10, 17
# Router weights at the start of training: most on the level the adapter already reads.
INITIAL_WEIGHTS = (0.1, 0.1, 0.8)


class FusionError(ValueError):
    """A fusion module, its file or its input does not fit; names the part and the fix."""


def fusion_layers(depth):
    """(low, mid, high) hidden-state numbers for a CLIP vision encoder of `depth` layers."""
    if depth < 3:
        raise FusionError(f"feature fusion needs a CLIP vision encoder of at least 3 layers (three "
                          f"distinct levels); this one has {depth}")
    return (depth * REFERENCE_LOW // REFERENCE_DEPTH, depth * REFERENCE_MID // REFERENCE_DEPTH,
            depth - 1)


def granularity_weights(granularity):
    """The user's slider, 0 = fine detail .. 1 = coarse likeness, as (w_low, w_mid, w_high):
    piecewise linear through (1, 0, 0) at 0, (0, 1, 0) at 0.5 and (0, 0, 1) at 1, so two
    neighbouring levels share the weight in between and the three always sum to 1."""
    g = float(granularity)
    if not 0.0 <= g <= 1.0:
        raise FusionError(f"granularity: {g} is outside 0 (fine detail) .. 1 (coarse likeness); "
                          "use a value in that range, or a negative one for the router's own weights")
    return torch.tensor([max(0.0, 1 - 2 * g), 1 - abs(2 * g - 1), max(0.0, 2 * g - 1)])


def output_norm(projection):
    """The LayerNorm that ends an image projection (its gain and shift set the output)."""
    if isinstance(projection, Resampler):
        return projection.norm_out
    if isinstance(projection, MLPProjection):
        return projection.proj[3]
    raise FusionError(f"feature fusion reads CLIP hidden states, so it needs an adapter whose image "
                      f"projection reads {PLUS_INPUT} (IP-Adapter Plus, Plus-face, full-face, "
                      f"MIP-Adapter Plus, SynCD); this one is a {type(projection).__name__} reading "
                      "image_embeds")


class FeatureFusion(nn.Module):
    """experts: {level: projection}; layers: (low, mid, high) hidden-state numbers; router:
    Linear(3 W -> 3) of the three levels' class tokens."""

    def __init__(self, experts, layers, router):
        super().__init__()
        self.experts = nn.ModuleDict({level: experts[level] for level in LEVELS})
        self.layers = tuple(int(k) for k in layers)
        self.router = router

    @classmethod
    def from_projection(cls, projection, depth):
        """Experts copied from the adapter's image projection (float32), each giving zero; the
        router at INITIAL_WEIGHTS for every image."""
        experts = {}
        for level in LEVELS:
            expert = copy.deepcopy(projection).float()
            norm = output_norm(expert)
            with torch.no_grad():
                norm.weight.zero_()
                norm.bias.zero_()
            experts[level] = expert
        # Built on the meta device and filled: no draw from the global random stream.
        router = nn.Linear(len(LEVELS) * projection.input_width, len(LEVELS), device="meta")
        router.to_empty(device=next(experts["high"].parameters()).device)
        with torch.no_grad():
            router.weight.zero_()
            router.bias.copy_(torch.tensor(INITIAL_WEIGHTS).log())
        return cls(experts, fusion_layers(int(depth)), router)

    @property
    def input_width(self):
        return self.router.in_features // len(LEVELS)

    def router_weights(self, hidden_states):
        """(B, 3) softmax weights of each image, from the class tokens (index 0) of its levels."""
        cls_tokens = torch.cat([hidden_states[k][:, 0] for k in self.layers], dim=-1)
        return torch.softmax(self.router(cls_tokens.to(self.router.weight.dtype)), dim=-1)

    def forward(self, base_tokens, hidden_states, weights=None):
        """base_tokens: (B, T, C) the adapter's own tokens; hidden_states: {number: (B, S, W)};
        weights: None = the router's, or (3,) / (B, 3) the user's. -> (B, T, C)."""
        missing = [k for k in self.layers if k not in hidden_states]
        if missing:
            raise FusionError(f"the CLIP vision output's {HIDDEN_STATES} lack hidden states "
                              f"{missing} that the feature fusion reads")
        if weights is None:
            weights = self.router_weights(hidden_states)
        weights = weights.to(base_tokens).reshape(-1, len(LEVELS)).expand(base_tokens.shape[0], -1)
        out = base_tokens
        for index, (level, layer) in enumerate(zip(LEVELS, self.layers)):
            expert = self.experts[level](hidden_states[layer].to(base_tokens.dtype))
            out = out + weights[:, index, None, None] * expert
        return out

    def state_dict_flat(self):
        """Tensors under the file's names (PREFIX included)."""
        out = {f"{PREFIX}layers": torch.tensor(self.layers, dtype=torch.int64),
               f"{PREFIX}router.weight": self.router.weight, f"{PREFIX}router.bias": self.router.bias}
        for level in LEVELS:
            out.update({f"{PREFIX}experts.{level}.{k}": v
                        for k, v in self.experts[level].state_dict().items()})
        return out


REQUIRED_KEYS = (f"{PREFIX}layers", f"{PREFIX}router.weight", f"{PREFIX}router.bias")


def has_fusion(tensors):
    return any(k.startswith(PREFIX) for k in tensors)


def fusion_from_tensors(tensors, image_proj, source="checkpoint"):
    """The FeatureFusion in a file's tensors (None when it has no `fusion.*` key), checked
    against the adapter's image projection it adds to."""
    if not has_fusion(tensors):
        return None
    missing = [k for k in REQUIRED_KEYS if k not in tensors] + [
        f"{PREFIX}experts.{level}.*" for level in LEVELS
        if not any(k.startswith(f"{PREFIX}experts.{level}.") for k in tensors)]
    if missing:
        raise FusionError(f"{source}: its feature fusion section is incomplete (no {', '.join(missing)}); "
                          "the file is damaged: save or train it again")
    if image_proj is None:
        raise FusionError(f"{source}: a feature fusion section without an image projection "
                          "(image_proj.*) to add to; the file is damaged: train it again")
    try:
        output_norm(image_proj)  # a projection of hidden states
    except FusionError as exc:
        raise FusionError(f"{source}: {exc}") from None
    layers = tensors[f"{PREFIX}layers"]
    if layers.shape != (len(LEVELS),) or layers.is_floating_point() or \
            not bool((layers[1:] > layers[:-1]).all()) or int(layers[0]) < 0:
        raise FusionError(f"{source}: fusion.layers {layers.tolist()} are not three increasing "
                          "hidden-state numbers; the file is damaged: train it again")
    experts = {}
    for level in LEVELS:
        start = f"{PREFIX}experts.{level}."
        sub = {k[len(start):]: v for k, v in tensors.items() if k.startswith(start)}
        try:
            expert = image_projection_from_state_dict(sub)
        except (KeyError, RuntimeError) as exc:
            raise FusionError(f"{source}: the {level}-level expert is not an image projection "
                              f"({exc}); the file is damaged: train it again") from None
        if type(expert) is not type(image_proj) or expert.input_width != image_proj.input_width \
                or expert.output_dim != image_proj.output_dim:
            raise FusionError(f"{source}: the {level}-level expert ({type(expert).__name__}, "
                              f"{expert.input_width} -> {expert.output_dim}) does not match the "
                              f"adapter's image projection ({type(image_proj).__name__}, "
                              f"{image_proj.input_width} -> {image_proj.output_dim}); the file is "
                              "inconsistent: train it again")
        experts[level] = expert
    weight, bias = tensors[f"{PREFIX}router.weight"], tensors[f"{PREFIX}router.bias"]
    if tuple(weight.shape) != (len(LEVELS), len(LEVELS) * image_proj.input_width) or \
            tuple(bias.shape) != (len(LEVELS),):
        raise FusionError(f"{source}: fusion.router is {tuple(weight.shape)} but the CLIP vision "
                          f"width {image_proj.input_width} needs (3, {3 * image_proj.input_width}); "
                          "the file is inconsistent: train it again")
    with torch.device("meta"):
        router = nn.Linear(weight.shape[1], weight.shape[0])
    router.load_state_dict({"weight": weight, "bias": bias}, assign=True)
    return FeatureFusion(experts, layers.tolist(), router)

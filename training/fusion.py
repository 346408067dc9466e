"""Training an adapter's feature fusion (kernels/feature_fusion.py) next to its IP layers: the
setting `train_fusion`. The adapter's image projection stays frozen; its tokens and the hidden
states of the three CLIP levels are encoded once with the dataset (the hidden states kept in
float16: 3 x 257 x 1280 values, about 2 MB, per ViT-H reference), and the fusion runs in each
step, so its experts and router get gradients. It starts from the adapter's own fusion when the
file has one, else from the adapter's projection (experts giving zero: the first step sees the
adapter's own tokens)."""
import copy
from dataclasses import replace

import torch

from ..kernels.adapter import PLUS_INPUT
from ..kernels.feature_fusion import FeatureFusion, FusionError, fusion_layers
from .config import TrainConfigError

HIDDEN_DTYPE = torch.float16


def check(config, models):
    """A clear error before any encoding when `train_fusion` cannot run."""
    if not config.train_fusion:
        return
    if models.adapter is None or models.clip_vision is None:
        raise TrainConfigError("train_fusion needs an adapter (its image projection starts the "
                               "fusion's experts) and the CLIP vision model it reads (adapter, "
                               "clip_vision)")
    models.adapter.require_image_layers("train_fusion")
    if models.adapter.clip_input != PLUS_INPUT:
        raise TrainConfigError(f"train_fusion: {models.adapter.describe()} reads image_embeds; "
                               "feature fusion reads CLIP hidden states: train it from a Plus "
                               "adapter (ip-adapter-plus_*, MIP-Adapter Plus, SynCD)")


def levels(models):
    """The hidden-state numbers the fusion reads: the adapter's fusion's, else the rule's for
    this CLIP vision model (feature_fusion.fusion_layers)."""
    if models.adapter.fusion is not None:
        return models.adapter.fusion.layers
    from ..families.vision import encoder_layers
    try:
        return fusion_layers(len(encoder_layers(models.clip_vision)))
    except FusionError as exc:
        raise TrainConfigError(f"train_fusion: {exc}") from None


def initial_fusion(models):
    """A trainable float32 fusion, not shared with the loaded adapter."""
    adapter = models.adapter
    if adapter.fusion is not None:
        fusion = copy.deepcopy(adapter.fusion).float()
    else:
        from ..families.vision import encoder_layers
        fusion = FeatureFusion.from_projection(adapter.image_proj, len(encoder_layers(models.clip_vision)))
    for param in fusion.parameters():
        param.requires_grad_(True)
    return fusion


def stacked(hidden_states, numbers):
    """{number: (B, S, W)} -> (B, 3, S, W) in HIDDEN_DTYPE on the CPU (the cache's layout)."""
    return torch.stack([hidden_states[n] for n in numbers], dim=1).to("cpu", HIDDEN_DTYPE)


def encode_references(adapter, clip_vision, pixels, numbers):
    """(tokens (K, T, C) of the adapter's projection alone, hidden states (K, 3, S, W))."""
    from ..families.vision import with_levels
    from ..kernels.adapter import HIDDEN_STATES
    output = with_levels(clip_vision, numbers, lambda: clip_vision.encode_image(pixels))
    tokens = replace(adapter, fusion=None).project(output).float().cpu()
    return tokens, stacked(output[HIDDEN_STATES], numbers)


def encode_uncond(adapter, clip_vision, numbers):
    """{"tokens": (T, C), "hidden": (3, S, W)}: the adapter's "no image" input, as
    `encode_references` gives a reference's."""
    from ..families.vision import captured_hidden_states, unconditional_tokens
    with captured_hidden_states(clip_vision, numbers) as hidden:
        tokens = unconditional_tokens(replace(adapter, fusion=None), clip_vision)[0].cpu()
    return {"tokens": tokens, "hidden": stacked(hidden, numbers)[0]}


def fused_tokens(fusion, tokens, hidden):
    """(B, K, T, C) projection tokens and (B, K, 3, S, W) hidden states -> the fused tokens,
    with gradients into the fusion (its router's own weights)."""
    states = {n: hidden[:, :, i].flatten(0, 1).float() for i, n in enumerate(fusion.layers)}
    fused = fusion(tokens.flatten(0, 1).float(), states)
    return fused.reshape(tokens.shape).to(tokens.dtype)

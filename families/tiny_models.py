"""Tiny models built from the host's own classes, with random weights.

They exist so that a machine with no downloaded models can still run the whole path (the demo
workflow, the tests): the host's real UNetModel, text encoder, CLIP vision model and VAE, only
with small configurations. Their outputs are noise-like pictures; they prove wiring, not quality.
The shapes follow the real families: SD1.5-like (one text context) and SDXL-like (two text
encoders concatenated into the context, pooled text + size embeddings as `adm` conditioning).
"""
import inspect
import json
import os
import tempfile

import torch

import comfy.clip_vision
import comfy.model_patcher
import comfy.sd
import comfy.sd1_clip
import comfy.sdxl_clip
import comfy.supported_models
import comfy.supported_models_base

CPU = torch.device("cpu")

# Text encoder widths. SD1.5-like context = L; SDXL-like context = L + G, pooled = G.
TEXT_L_WIDTH = 16
TEXT_G_WIDTH = 32
SD15_CONTEXT = TEXT_L_WIDTH
SDXL_CONTEXT = TEXT_L_WIDTH + TEXT_G_WIDTH
SDXL_ADM = TEXT_G_WIDTH + 6 * 256  # pooled text + six 256-wide size/crop embeddings, as SDXL
CLIP_VISION_WIDTH = 32
CLIP_VISION_PROJECTION = 24

_UNET_COMMON = {
    "in_channels": 4, "out_channels": 4, "image_size": 32, "model_channels": 32,
    "num_res_blocks": [1, 1], "channel_mult": [1, 2], "transformer_depth": [1, 1],
    "transformer_depth_output": [1, 1, 1, 1], "transformer_depth_middle": 1,
    "num_head_channels": 8, "num_heads": -1, "use_spatial_transformer": True,
    "use_temporal_attention": False, "use_temporal_resblock": False,
}


class TinySD15(comfy.supported_models.SD15):
    unet_config = dict(_UNET_COMMON, context_dim=SD15_CONTEXT, use_linear_in_transformer=False,
                       adm_in_channels=None)
    unet_extra_config = {}


class TinySDXL(comfy.supported_models.SDXL):
    unet_config = dict(_UNET_COMMON, context_dim=SDXL_CONTEXT, use_linear_in_transformer=True,
                       adm_in_channels=SDXL_ADM, num_classes="sequential")
    unet_extra_config = {}


def randomize_(module, seed):
    """Seeded weights: the host's layers skip initialization (their memory is uninitialized)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.ndim >= 2:
                fan_in = param[0].numel()
                param.copy_(torch.randn(param.shape, generator=gen) / fan_in ** 0.5)
            elif name.endswith("weight"):
                param.fill_(1.0)
            else:
                param.zero_()
    return module


def tiny_unet(family="sd15", seed=0):
    """A ModelPatcher around the host's BaseModel/SDXL with a tiny UNetModel."""
    config_cls = {"sd15": TinySD15, "sdxl": TinySDXL}[family]
    config = config_cls(dict(config_cls.unet_config))
    model = config.get_model({})
    randomize_(model.diffusion_model, seed)
    # A small output layer keeps the random model's predictions in a sane range.
    with torch.no_grad():
        model.diffusion_model.out[-1].weight.mul_(0.1)
    return comfy.model_patcher.ModelPatcher(model, load_device=CPU, offload_device=CPU)


# The host's older model classes read their config from a file. The files live in a folder of
# this process, removed when it exits (the system temp folder keeps nothing).
_CONFIG_FOLDER = []


def _write_json(name, data):
    if not _CONFIG_FOLDER:
        _CONFIG_FOLDER.append(tempfile.TemporaryDirectory(prefix="multiref_tiny_configs_"))
    path = os.path.join(_CONFIG_FOLDER[0].name, name)
    with open(path, "w") as f:
        json.dump(data, f)
    return path


def _text_config(width, projection):
    return {"hidden_act": "quick_gelu", "hidden_size": width, "intermediate_size": 2 * width,
            "num_attention_heads": 2, "num_hidden_layers": 3, "max_position_embeddings": 77,
            "layer_norm_eps": 1e-5, "projection_dim": projection, "vocab_size": 49408,
            "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1, "model_type": "clip_text_model"}


def _host_kwargs(cls, kwargs):
    """Pass only the constructor arguments this host's class accepts (they differ by version)."""
    accepted = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in kwargs.items() if k in accepted}


# Current ComfyUI (since late 2024) builds its text encoders from the stock config with per-
# encoder overrides read from model_options ("clip_l_model_config", ...), and its wrappers no
# longer pass a config file down; the installable host (June 2024) takes a config file instead.
_HOST_TAKES_CONFIG_OVERRIDES = "model_options" in inspect.signature(
    comfy.sd1_clip.SDClipModel.__init__).parameters


class _TinySD1Text(comfy.sd1_clip.SD1ClipModel):
    """For hosts that take a config file: the stock SD1.5 text encoder with a tiny config."""

    def __init__(self, **kwargs):
        config = _write_json("text_l.json", _text_config(TEXT_L_WIDTH, TEXT_L_WIDTH))
        super().__init__(textmodel_json_config=config,
                         **_host_kwargs(comfy.sd1_clip.SD1ClipModel, kwargs))


class _TinySDXLText(comfy.sdxl_clip.SDXLClipModel):
    """For hosts that take a config file: SDXL's two text encoders (L and G), tiny configs."""

    def __init__(self, **kwargs):
        torch.nn.Module.__init__(self)
        sd_kwargs = _host_kwargs(comfy.sd1_clip.SDClipModel, kwargs)
        self.clip_l = comfy.sd1_clip.SDClipModel(
            layer="hidden", layer_idx=-2, layer_norm_hidden_state=False,
            textmodel_json_config=_write_json("text_l.json", _text_config(TEXT_L_WIDTH, TEXT_L_WIDTH)),
            **sd_kwargs)
        self.clip_g = comfy.sdxl_clip.SDXLClipG(
            textmodel_json_config=_write_json("text_g.json", _text_config(TEXT_G_WIDTH, TEXT_G_WIDTH)),
            **_host_kwargs(comfy.sdxl_clip.SDXLClipG, kwargs))
        self.dtypes = {kwargs.get("dtype")}


def tiny_text_encoder(family="sd15", seed=1):
    """The host's CLIP wrapper (real tokenizer, real text transformer class) with tiny widths."""
    tokenizer = {"sd15": comfy.sd1_clip.SD1Tokenizer, "sdxl": comfy.sdxl_clip.SDXLTokenizer}[family]
    with torch.no_grad():  # the host's text model writes its projection in place when built
        if _HOST_TAKES_CONFIG_OVERRIDES:
            model = {"sd15": comfy.sd1_clip.SD1ClipModel,
                     "sdxl": comfy.sdxl_clip.SDXLClipModel}[family]
            overrides = {"clip_l_model_config": _text_config(TEXT_L_WIDTH, TEXT_L_WIDTH),
                         "clip_g_model_config": _text_config(TEXT_G_WIDTH, TEXT_G_WIDTH)}
            clip = comfy.sd.CLIP(comfy.supported_models_base.ClipTarget(tokenizer, model),
                                 model_options=overrides)
        else:
            model = {"sd15": _TinySD1Text, "sdxl": _TinySDXLText}[family]
            clip = comfy.sd.CLIP(comfy.supported_models_base.ClipTarget(tokenizer, model))
    randomize_(clip.cond_stage_model, seed)
    return clip


def tiny_clip_vision(seed=2):
    """The host's ClipVisionModel (224px input, as the real one) with a tiny ViT."""
    config = _write_json("vision.json", {
        "attention_dropout": 0.0, "dropout": 0.0, "hidden_act": "gelu",
        "hidden_size": CLIP_VISION_WIDTH, "image_size": 224, "initializer_factor": 1.0,
        "initializer_range": 0.02, "intermediate_size": 2 * CLIP_VISION_WIDTH,
        "layer_norm_eps": 1e-5, "model_type": "clip_vision_model", "num_attention_heads": 2,
        "num_channels": 3, "num_hidden_layers": 3, "patch_size": 32,
        "projection_dim": CLIP_VISION_PROJECTION, "torch_dtype": "float32"})
    vision = comfy.clip_vision.ClipVisionModel(config)
    randomize_(vision.model, seed)
    return vision


TINY_VAE_CONFIG = {"params": {"embed_dim": 4, "ddconfig": {
    "double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3, "out_ch": 3, "ch": 32,
    "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}}}


def tiny_vae(seed=3):
    """The host's VAE wrapper around its AutoencoderKL: 8x downscale, 4 latent channels, as SD."""
    from comfy.ldm.models.autoencoder import AutoencoderKL
    weights = randomize_(AutoencoderKL(**TINY_VAE_CONFIG["params"]), seed).state_dict()
    return comfy.sd.VAE(sd=weights, config=TINY_VAE_CONFIG)


# The published SDXL UNet layout, for benchmarks at real shapes (random weights, no download).
SDXL_UNET = dict(_UNET_COMMON, model_channels=320, num_res_blocks=[2, 2, 2], channel_mult=[1, 2, 4],
                 transformer_depth=[0, 0, 2, 2, 10, 10], transformer_depth_middle=10,
                 transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], num_head_channels=64,
                 use_linear_in_transformer=True, context_dim=2048, adm_in_channels=2816,
                 num_classes="sequential")


def sdxl_shaped_unet(device, dtype=torch.float16, seed=0):
    """The host's SDXL model class with the real SDXL UNet configuration and random weights
    (on the meta device: shapes only, for memory estimates)."""
    config = comfy.supported_models.SDXL(dict(SDXL_UNET))
    config.set_inference_dtype(dtype, None)
    model = config.get_model({}, device=device)
    if torch.device(device).type != "meta":
        randomize_(model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)


def tiny_adapter(model, seed=4, tokens=4):
    """A base IP-Adapter (linear image projection to `tokens` tokens, image key/value
    projections in every cross-attention) with random weights, shaped for `model`'s UNet and
    for the tiny CLIP vision model's image embeddings."""
    from ..kernels.adapter import build_adapter, published_order
    from ..kernels.checkpoints import FAMILY_BY_CONTEXT_DIM, cross_attention_dims
    dims = cross_attention_dims(model.model.diffusion_model)
    context = next(iter(dims.values()))[0]
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(shape, generator=gen) / shape[-1] ** 0.5

    tensors = {"image_proj.proj.weight": rand(tokens * context, CLIP_VISION_PROJECTION),
               "image_proj.proj.bias": torch.zeros(tokens * context),
               "image_proj.norm.weight": torch.ones(context),
               "image_proj.norm.bias": torch.zeros(context)}
    for i, location in enumerate(published_order(dims)):  # the published layer numbering
        inner = dims[location][1]
        tensors[f"ip_adapter.{2 * i + 1}.to_k_ip.weight"] = rand(inner, context)
        tensors[f"ip_adapter.{2 * i + 1}.to_v_ip.weight"] = rand(inner, context)
    return build_adapter("ip_adapter", FAMILY_BY_CONTEXT_DIM[context], tensors,
                         source="tiny demo adapter (random weights)")

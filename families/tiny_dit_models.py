"""Tiny diffusion transformers (Flux, SD3) built from the host's own classes, random weights.

The companions of families/tiny_models.py for the transformer families: the host's real Flux /
MMDiT model classes, its Flux and SD3 text encoders (tokenizers included) and its AutoencoderKL
with a 16-channel latent, only with tiny widths. They exist for the demo node and the tests.
Only a current ComfyUI has them (Flux arrived in August 2024, per-encoder config overrides in
late 2024); on an older host `require_dit_host` says so.

Shapes follow the real models where it matters to the pack:
- Flux: T5 context (padded to 256 tokens as Flux's tokenizer does), CLIP-L pooled vector, text
  tokens first in the joint sequence, RoPE over 3 axes, double then single blocks, the guidance
  embedding (flux; not flux_schnell).
- SD3: CLIP-L + CLIP-G context padded to 4096 wide (the host's SD3 encoder pads to that width),
  pooled L + G as the `y` vector, joint blocks. T5 is left out (SD3 runs without it) because
  the host's SD3 encoder concatenates T5 tokens only at T5-XXL's width.
"""
import importlib.util

import torch

import comfy.model_patcher
import comfy.sd
import comfy.supported_models
import comfy.supported_models_base

from .tiny_models import (CPU, TEXT_G_WIDTH, TEXT_L_WIDTH, _HOST_TAKES_CONFIG_OVERRIDES,
                          _text_config, randomize_)

FAMILIES = ("flux", "flux_schnell", "sd3")
T5_WIDTH = 16
SD3_CONTEXT_WIDTH = 4096  # the host's SD3 text encoder pads CLIP-L + CLIP-G to this width
SD3_POOLED = TEXT_L_WIDTH + TEXT_G_WIDTH  # CLIP-L pooled (unprojected) + CLIP-G projected
LATENT_CHANNELS = 16

FLUX_CONFIG = dict(image_model="flux", in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
                   vec_in_dim=TEXT_L_WIDTH, context_in_dim=T5_WIDTH, hidden_size=32, num_heads=2,
                   mlp_ratio=2.0, depth=2, depth_single_blocks=2, axes_dim=[4, 6, 6],
                   theta=10000, patch_size=2, qkv_bias=True)
SD3_CONFIG = dict(in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, patch_size=2,
                  depth=2, num_blocks=2, input_size=None, adm_in_channels=SD3_POOLED,
                  context_embedder_config={"target": "torch.nn.Linear", "params": {
                      "in_features": SD3_CONTEXT_WIDTH, "out_features": 128}},
                  num_patches=32 * 32, pos_embed_max_size=32, pos_embed_scaling_factor=None,
                  qk_norm="rms", x_block_self_attn_layers=[])
T5_CONFIG = {"d_ff": 2 * T5_WIDTH, "d_kv": T5_WIDTH // 2, "d_model": T5_WIDTH, "num_heads": 2,
             "num_layers": 2, "num_decoder_layers": 2}


class DitHostError(RuntimeError):
    """The running ComfyUI lacks what a tiny transformer model needs."""


def require_dit_host(family):
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if importlib.util.find_spec("comfy.ldm.flux") is None or not _HOST_TAKES_CONFIG_OVERRIDES:
        raise DitHostError(
            f"family {family!r}: this ComfyUI has no Flux/SD3 model classes with configurable "
            "text encoders (ComfyUI from late 2024 on has them); update ComfyUI, or pick family "
            "sd15 or sdxl")


def _config_class(family):
    """The host's supported-model class of the family with the tiny transformer config (made
    here, not at import: an older host has no Flux class to derive from)."""
    base = {"flux": "Flux", "flux_schnell": "FluxSchnell", "sd3": "SD3"}[family]
    config = SD3_CONFIG if family == "sd3" else dict(FLUX_CONFIG,
                                                     guidance_embed=family == "flux")
    return type(f"Tiny{base}", (getattr(comfy.supported_models, base),),
                {"unet_config": dict(config)})


def tiny_dit(family="flux", seed=0):
    """A ModelPatcher around the host's model_base.Flux / SD3 with a tiny transformer."""
    require_dit_host(family)
    config_cls = _config_class(family)
    config = config_cls(dict(config_cls.unet_config))
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({})
    diffusion_model = randomize_(model.diffusion_model, seed)
    with torch.no_grad():
        # A small output layer keeps the random predictions in a sane range.
        diffusion_model.final_layer.linear.weight.mul_(0.1)
        # Flux's q/k RMSNorm gains are named `scale` (randomize_ zeroes them as if biases, which
        # would make every q and k zero and every attention uniform): 1, as a fresh norm.
        for name, param in diffusion_model.named_parameters():
            if name.endswith(".scale"):
                param.fill_(1.0)
        # SD3's position table is a buffer (the host loads it from the file): seeded values too.
        if getattr(diffusion_model, "pos_embed", None) is not None:
            gen = torch.Generator().manual_seed(seed)
            diffusion_model.pos_embed.copy_(0.1 * torch.randn(diffusion_model.pos_embed.shape,
                                                              generator=gen))
    return comfy.model_patcher.ModelPatcher(model, load_device=CPU, offload_device=CPU)


def tiny_dit_text_encoder(family="flux", seed=1):
    """The host's Flux (CLIP-L + T5) or SD3 (CLIP-L + CLIP-G) text encoder, tiny widths, with
    the real tokenizers."""
    require_dit_host(family)
    import comfy.text_encoders.flux
    import comfy.text_encoders.sd3_clip
    overrides = {"clip_l_model_config": _text_config(TEXT_L_WIDTH, TEXT_L_WIDTH),
                 "clip_g_model_config": _text_config(TEXT_G_WIDTH, TEXT_G_WIDTH),
                 "t5xxl_model_config": T5_CONFIG}
    if family == "sd3":
        target = comfy.supported_models_base.ClipTarget(
            comfy.text_encoders.sd3_clip.SD3Tokenizer,
            comfy.text_encoders.sd3_clip.sd3_clip(clip_l=True, clip_g=True, t5=False))
    else:
        target = comfy.supported_models_base.ClipTarget(comfy.text_encoders.flux.FluxTokenizer,
                                                        comfy.text_encoders.flux.flux_clip())
    with torch.no_grad():
        clip = comfy.sd.CLIP(target, model_options=overrides)
    randomize_(clip.cond_stage_model, seed)
    return clip


TINY_VAE16_CONFIG = {"params": {"embed_dim": LATENT_CHANNELS, "ddconfig": {
    "double_z": True, "z_channels": LATENT_CHANNELS, "resolution": 64, "in_channels": 3,
    "out_ch": 3, "ch": 32, "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [],
    "dropout": 0.0}}}


def tiny_vae16(seed=3):
    """The host's VAE around its AutoencoderKL: 8x downscale, 16 latent channels (Flux, SD3)."""
    from comfy.ldm.models.autoencoder import AutoencoderKL
    weights = randomize_(AutoencoderKL(**TINY_VAE16_CONFIG["params"]), seed).state_dict()
    vae = comfy.sd.VAE(sd=weights, config=TINY_VAE16_CONFIG)
    vae.latent_channels = LATENT_CHANNELS  # the wrapper assumes 4 when handed a config
    return vae

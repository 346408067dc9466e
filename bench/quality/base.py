"""The base text-to-image model, trained from scratch on the world with the host's own classes.

- UNet: the host's UNetModel (in the host's SD1.5 model class, v-prediction) with a small
  config: 32 latent pixels, channels 32 x (1, 2, 2), attention only at the coarsest level (8x8)
  and the middle: attention at 16x16 as well cost half of a training step on CPU.
- Text encoder: the host's SD1.5 CLIP text model at width 16 (MultiRef Tiny Demo Models, fixed
  seed), trained with the UNet from its random weights (`text_encoder=True`, every scale). Frozen
  at random weights, the four single-object captions differed from their mean by only 7.5% of
  their norm and the base hardly read them (bench/RESULTS.md); trained, the shape words are set
  apart where the UNet's cross-attention looks. Its weights are saved beside the UNet's
  (`text_encoder.` keys) and loaded into the demo text encoder by `QualityModels`.
- Latent: an exact pixel latent (PixelLatentVAE): 8x8 block means of the 256x256 stored pictures,
  RGB in the first three channels scaled so that the model sees -1..1, the fourth channel 0.
- CLIP vision (for the adapter): the host's ClipVisionModel of the demo node, frozen, random.
The weights are written as safetensors; `QualityModels` (a node registered into the host by the
benchmark) builds the same host classes and loads them, so the shipped nodes run on them. The
host's CheckpointLoaderSimple cannot detect so small an architecture from a file."""
import json
import logging
import os
import time

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from . import world

log = logging.getLogger("multiref.quality")
SD15_LATENT_SCALE = 0.18215  # the SD1.5 latent format's scale factor (the model sees latent * it)
UNET_CONFIG = {
    "in_channels": 4, "out_channels": 4, "image_size": 32, "model_channels": 32,
    "num_res_blocks": [1, 1, 1], "channel_mult": [1, 2, 2], "transformer_depth": [0, 0, 1],
    "transformer_depth_output": [0, 0, 0, 0, 1, 1], "transformer_depth_middle": 1,
    "num_head_channels": 16, "num_heads": -1, "use_spatial_transformer": True,
    "use_temporal_attention": False, "use_temporal_resblock": False, "context_dim": 16,
    "use_linear_in_transformer": False, "adm_in_channels": None,
}
DEMO_SEED = 5  # seed of the demo node's text encoder and CLIP vision (frozen, random)


class PixelLatentVAE:
    """An exactly invertible 'VAE' for the world's pictures: encode = 8x8 block means, decode =
    nearest 8x upscale (pictures drawn at 32 and stored at 256 come back exactly)."""

    def __init__(self):
        self.first_stage_model = torch.nn.Module()  # no weights (the trainer fingerprints it)

    def encode(self, pixels):
        x = pixels[..., :3].movedim(-1, 1).float()
        x = torch.nn.functional.avg_pool2d(x, world.UPSCALE)
        latent = (2 * x - 1) / SD15_LATENT_SCALE
        return torch.cat([latent, torch.zeros_like(latent[:, :1])], dim=1)

    def decode(self, latent):
        x = (latent[:, :3].float() * SD15_LATENT_SCALE + 1) / 2
        x = x.repeat_interleave(world.UPSCALE, -1).repeat_interleave(world.UPSCALE, -2)
        return x.clamp(0, 1).movedim(1, -1)


def model_class(unet_config=None):
    import comfy.model_base
    import comfy.supported_models

    class WorldSD15(comfy.supported_models.SD15):
        """SD1.5's model class (latent format, CLIP handling) with the world's small UNet."""
        unet_extra_config = {}

        def model_type(self, state_dict, prefix=""):
            return comfy.model_base.ModelType.V_PREDICTION

    WorldSD15.unet_config = dict(unet_config or UNET_CONFIG)
    return WorldSD15


def build_unet(unet_config=None, weights=None, seed=0):
    """A ModelPatcher around the host's model class; fresh weights (PyTorch's default layer
    initialisation, output layers zero as in the ADM/SD recipe) or `weights`."""
    import comfy.model_patcher
    cls = model_class(unet_config)
    model = cls(dict(cls.unet_config)).get_model({})
    unet = model.diffusion_model
    if weights is None:
        torch.manual_seed(seed)
        layers = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.GroupNorm, torch.nn.LayerNorm)
        for module in unet.modules():
            for layer in layers:  # the host's subclasses skip it (uninitialised memory)
                if isinstance(module, layer):
                    layer.reset_parameters(module)
        with torch.no_grad():
            unet.out[-1].weight.zero_()
            unet.out[-1].bias.zero_()
    else:
        unet.load_state_dict(weights)
    import comfy.model_management
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=torch.device("cpu"))


def demo_encoders(host):
    """(CLIP, CLIP_VISION) of the pack's demo node, at a fixed seed."""
    demo = host.nodes["MultiRefTinyDemoModels"]()
    _, clip, _, clip_vision = getattr(demo, demo.FUNCTION)(family="sd15", seed=DEMO_SEED)
    return clip, clip_vision


def encode_captions(clip, captions):
    """{caption: (77, width) encoding} in one batched call of the text encoder (the host encodes
    a prompt's 77-token sections as one batch and joins them: one section per caption here);
    differentiable when the text encoder's weights require gradients (the host's encoder has no
    no_grad of its own)."""
    captions = list(captions)
    sections = {}
    for text in captions:
        for key, chunks in clip.tokenize(text).items():
            if len(chunks) != 1:
                raise ValueError(f"caption {text!r} is longer than one 77-token section")
            sections.setdefault(key, []).append(chunks[0])
    joined = clip.cond_stage_model.encode_token_weights(sections)[0][0].float()
    return dict(zip(captions, joined.reshape(len(captions), -1, joined.shape[-1])))


TEXT_PREFIX = "text_encoder."  # keys of the trained text encoder in base_unet.safetensors


# blocks that add their residuals in place (x += f(norm(x))) after a norm saved x for backward,
# and those norms: the UNet's transformer blocks and the CLIP text model's layers
IN_PLACE_RESIDUAL_NORMS = {"BasicTransformerBlock": ("norm1", "norm2", "norm3"),
                           "CLIPLayer": ("layer_norm1", "layer_norm2")}


def out_of_place_residuals(*modules):
    """The host's transformer blocks add their residuals in place after a norm saved their input
    for backward; feeding each of those norms a copy keeps autograd valid (same values). Returns
    the hook handles (remove them after training)."""
    handles = []
    for root in modules:
        for module in root.modules():
            for name in IN_PLACE_RESIDUAL_NORMS.get(type(module).__name__, ()):
                handles.append(getattr(module, name).register_forward_pre_hook(
                    lambda m, args: (args[0].clone(),) + args[1:]))
    return handles


def scene_pool(n, seed, two_object_share):
    """n training scenes from the training identities: (N, 4, 32, 32) in the sampler's space
    (latent x 0.18215 = pixels in -1..1, fourth channel 0), their captions, and the same
    captions with the objects' colours named."""
    rng = np.random.default_rng(seed)
    images, captions, named = [], [], []
    for i in range(n):
        s = world.random_scene(rng, 2 if rng.random() < two_object_share else 1)
        images.append(s["image"])
        captions.append(s["caption"])
        named.append(world.caption(s["shapes"], s["identities"]))
    x = torch.from_numpy(np.stack(images)).movedim(-1, 1) * 2 - 1
    return torch.cat([x, torch.zeros_like(x[:, :1])], dim=1), captions, named


def v_loss(model, x0, context, generator, min_snr=None):
    """Loss of one batch in the model's v-parameterisation, computed on its denoised output:
    |x0 - x0_hat|^2 (1 + sigma^2) / sigma^2 equals |v - v_hat|^2 (x_t = x0 + sigma * noise).
    min_snr=gamma weights it by min(SNR, gamma) / (SNR + 1) (Min-SNR-gamma for v, SNR =
    1 / sigma^2): the low-noise steps, which only polish, count less."""
    ms = model.model_sampling
    t = torch.randint(0, len(ms.sigmas), (x0.shape[0],), generator=generator)
    sigma = ms.sigmas[t.to(ms.sigmas.device)].float()
    noise = torch.randn(x0.shape, generator=generator).to(x0.device)
    s = sigma.view(-1, 1, 1, 1)
    denoised = model.apply_model(x0 + s * noise, sigma, c_crossattn=context)
    per_row = ((denoised - x0) ** 2).mean(dim=(1, 2, 3)) * (1 + sigma ** 2) / sigma ** 2
    if min_snr is not None:
        snr = 1 / sigma ** 2
        per_row = per_row * torch.clamp(snr, max=min_snr) / (snr + 1)
    return per_row.mean()


def train(host, steps, batch, lr, pool_size, seed=0, two_object_share=0.4, log_every=50,
          unet_config=None, ema=None, min_snr=None, ramp=False, cpu_seconds=None, text_encoder=False,
          colour_captions=0.0):
    """Train the base from scratch (on the host's torch device: a GPU when there is one).
    ema: decay of an exponential moving average of the weights, which the returned model
    carries (sampling from an average of the last few hundred steps is much less noisy than
    from the last one). min_snr: see v_loss. ramp: the share of two-object scenes grows from 0
    to two_object_share over the first half (single objects first). cpu_seconds: stop when
    this process has used that much CPU time (equal-cost comparisons on shared cores), the
    schedule counted in CPU time instead of steps. text_encoder: train the demo text encoder's
    weights with the UNet's (same optimizer and average) instead of keeping them frozen.
    colour_captions: the share of rows whose caption names their objects' colours. The
    benchmark's prompts never do; but a base that never saw a colour conditioned on anything
    has no path by which an adapter could steer colours (an identity token table trained into
    the frozen base's context changed its loss by < 0.1%, bench/RESULTS.md), whereas real
    bases learn colours from their captions and IP-Adapter reuses that path.
    Returns (patcher, curve: list of (step, mean loss, seconds, CPU seconds), text weights:
    the trained text encoder's state dict, or None when it stayed frozen)."""
    patcher = build_unet(unet_config, seed=seed)
    model = patcher.model
    device = patcher.load_device
    model.to(device)
    clip, _ = demo_encoders(host)
    pool, captions, named = scene_pool(pool_size, seed, two_object_share)
    pairs = torch.tensor([" and " in c for c in captions])
    singles_idx, pairs_idx = torch.nonzero(~pairs)[:, 0], torch.nonzero(pairs)[:, 0]
    text_model = clip.cond_stage_model
    if text_encoder:  # the host keeps text encoders in float16: Adam's moments need float32
        text_model.to(torch.float32)
    text_params = [p for p in text_model.parameters() if p.ndim > 0] if text_encoder else []
    for p in text_params:
        p.requires_grad_(True)
    gen = torch.Generator().manual_seed(seed)
    params = list(model.diffusion_model.parameters()) + text_params
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    averaged = [p.detach().clone() for p in params] if ema else None
    handles = out_of_place_residuals(model.diffusion_model, text_model)
    curve, losses, start, cpu_start = [], [], time.time(), time.process_time()
    model.train()
    try:
        step = 0
        while True:
            step += 1
            cpu = time.process_time() - cpu_start
            progress = cpu / cpu_seconds if cpu_seconds else (step - 1) / steps
            if progress >= 1:
                break
            share = two_object_share * min(1.0, 2 * progress) if ramp else two_object_share
            pick_pair = torch.rand(batch, generator=gen) < share
            pick = torch.where(pick_pair, pairs_idx[torch.randint(0, len(pairs_idx), (batch,), generator=gen)],
                               singles_idx[torch.randint(0, len(singles_idx), (batch,), generator=gen)]) \
                if len(pairs_idx) and len(singles_idx) else torch.randint(0, pool_size, (batch,), generator=gen)
            x0 = pool[pick].to(device)
            drop = torch.rand(batch, generator=gen) < 0.1  # unconditional rows, for guidance
            # drawn only when used: without colour captions the random stream is the one it was
            name = (torch.rand(batch, generator=gen) < colour_captions).tolist() if colour_captions else [False] * batch
            texts = ["" if d else (named if n else captions)[i] for i, d, n in zip(pick.tolist(), drop, name)]
            with torch.set_grad_enabled(bool(text_params)):
                contexts = encode_captions(clip, sorted(set(texts)))
            context = torch.stack([contexts[t] for t in texts]).to(device)
            lr_now = lr * min(1.0, step / 100)  # short warm-up
            for group in optimizer.param_groups:
                group["lr"] = lr_now
            loss = v_loss(model, x0, context, gen, min_snr)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            if averaged is not None:
                decay = min(ema, (1 + step) / (10 + step))  # short memory while the weights move fast
                with torch.no_grad():
                    torch._foreach_lerp_(averaged, [p.detach() for p in params], 1 - decay)
            losses.append(loss.item())
            if step % log_every == 0:
                _log(curve, step, losses, log_every, start, cpu_start, steps)
        if losses and (not curve or curve[-1][0] != len(losses)):
            _log(curve, len(losses), losses, log_every, start, cpu_start, steps)
    finally:
        for h in handles:
            h.remove()
        if averaged is not None:
            with torch.no_grad():
                for p, a in zip(params, averaged):
                    p.copy_(a)
        model.eval()
        model.to(patcher.offload_device)
        for p in text_params:
            p.requires_grad_(False)
    text_weights = {k: v.detach().clone() for k, v in text_model.state_dict().items()} if text_params else None
    return patcher, curve, text_weights


def _log(curve, step, losses, every, start, cpu_start, steps):
    curve.append((step, float(np.mean(losses[-every:])), time.time() - start, time.process_time() - cpu_start))
    log.info("base step %d/%s loss %.4f (%.0fs, CPU %.0fs)", step, steps, curve[-1][1], curve[-1][2], curve[-1][3])


def save(patcher, folder, curve, unet_config=None, text_weights=None, recipe=""):
    os.makedirs(folder, exist_ok=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in patcher.model.diffusion_model.state_dict().items()}
    weights.update({TEXT_PREFIX + k: v.cpu().contiguous() for k, v in (text_weights or {}).items()})
    meta = {"unet_config": json.dumps(unet_config or UNET_CONFIG), "curve": json.dumps(curve),
            "parameterization": "v", "demo_seed": str(DEMO_SEED), "recipe": recipe}
    tmp = os.path.join(folder, ".base_unet.safetensors.tmp")
    save_file(weights, tmp, metadata=meta)
    os.replace(tmp, os.path.join(folder, "base_unet.safetensors"))


def saved_metadata(folder):
    """The metadata of a saved base ({} when there is none)."""
    from safetensors import safe_open
    path = os.path.join(folder, "base_unet.safetensors")
    if not os.path.isfile(path):
        return {}
    with safe_open(path, "pt") as f:
        return f.metadata()


def saved_recipe(folder):
    """The settings a saved base was trained with (None when there is none): the benchmark's
    cache retrains when they differ from the scale's."""
    return saved_metadata(folder).get("recipe")


def saved_curve(folder):
    """A saved base's training curve: [(step, mean loss, seconds, CPU seconds)]."""
    return [tuple(c) for c in json.loads(saved_metadata(folder)["curve"])]


def load(folder):
    """(patcher, curve, text weights or None) from a saved base."""
    weights = load_file(os.path.join(folder, "base_unet.safetensors"))
    text = {k[len(TEXT_PREFIX):]: weights.pop(k) for k in list(weights) if k.startswith(TEXT_PREFIX)}
    patcher = build_unet(json.loads(saved_metadata(folder)["unet_config"]), weights=weights)
    return patcher, saved_curve(folder), text or None


class QualityModels:
    """Test-bench loader node: the trained base (folder of base_unet.safetensors), the demo text
    encoder and CLIP vision, and the pixel latent."""
    RETURN_TYPES = ("MODEL", "CLIP", "VAE", "CLIP_VISION")
    FUNCTION = "load"
    CATEGORY = "testing"
    HOST = []  # the booted host (for the demo node)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"folder": ("STRING", {})}}

    def load(self, folder):
        patcher, _, text_weights = load(folder)
        clip, clip_vision = demo_encoders(self.HOST[0])
        if text_weights is not None:
            clip.cond_stage_model.load_state_dict(text_weights)
        return patcher, clip, PixelLatentVAE(), clip_vision


def register(host):
    QualityModels.HOST[:] = [host]
    host.nodes["MultiRefQualityModels"] = QualityModels

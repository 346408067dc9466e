"""The training loop (docs/ARCHITECTURE.md, Training): LoRA on self-attention, Masked Shared
Attention against the group's references, one timestep per group, loss on the target only in the
model's own parameterization, condition dropout, AdamW, gradient accumulation, checkpoints, resume,
DDP.
What each micro-batch holds and its random draws: training/batches.py; the one-time encoding of
the dataset: training/encoding.py.
"""
import contextlib
import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..kernels.diffusion_objective import (euler_sample, output_scale_of,
                                           parameterization_loss)
from . import (attention_constraint, batches, blocks, checkpoint, cls_text, config as config_mod,
               dataset, encoding, fusion, manifest, plots, quality)

log = logging.getLogger("multiref")


@dataclass
class Models:
    """What the trainer needs from the host: the UNet (a ModelPatcher), the VAE and text encoder
    (for the one-time encoding), optionally CLIP vision; `family` is sd15 or sdxl."""
    patcher: object
    vae: object
    clip: object
    family: str
    clip_vision: Optional[object] = None
    adapter: Optional[object] = None   # a kernels.adapter.LoadedAdapter to train (IP layers)


@dataclass
class TrainResult:
    output_dir: str
    weights: str
    steps: int
    losses: list
    summary: dict
    lora_layers: dict
    adapter_layers: dict
    adapter_file: Optional[str] = None
    fusion: Optional[nn.Module] = None  # the trained feature fusion (train_fusion)
    cls_text_file: Optional[str] = None  # the trained CLS text fusion (cls_text on)


class TrainStep(nn.Module):
    """One micro-batch -> mean loss of its target rows. An nn.Module holding exactly the
    trainable parameters, so DistributedDataParallel can wrap it; the frozen model is held
    outside the module tree (DDP must not broadcast or hook it)."""

    def __init__(self, lora_layers, adapter_layers, patcher, state, feature_fusion=None,
                 cls_fusion=None, cls_rows=None):
        super().__init__()
        self.lora = nn.ModuleList(lora_layers.values())
        self.adapter = nn.ModuleList(adapter_layers.values())
        self.fusion = feature_fusion  # registered (and saved) only when trained
        self._frozen = (patcher, state)
        if cls_fusion is not None:  # only then: a run without it keeps its parameter names
            self.cls_fusion = cls_fusion
        self._cls_rows = cls_rows  # cls_text.ClsTextRows (holds a frozen text encoder copy)
        # The cross-attention map constraints (training/attention_constraint.py): None = off.
        self.map_settings, self.map_weights = None, (0.0, 0.0)
        self.last_maps, self.last_denoise = None, None  # of the last call, for measuring

    def forward(self, batch):
        patcher, state = self._frozen
        if self._cls_rows is not None and batch["cls_text"] is not None:
            batch = self._cls_rows.augment(batch, self.cls_fusion)
        base = patcher.model
        sampling = base.model_sampling
        options = dict(patcher.model_options.get("transformer_options", {}))
        sigma = batch["sigma"]
        x = sampling.noise_scaling(sigma.view(-1, 1, 1, 1), batch["noise"], batch["latent"])
        extra = {} if batch["adm"] is None else {"y": batch["adm"]}
        refs, maps = batch["ref_latents"], None
        ref_tokens = batch["ref_tokens"]
        if self.fusion is not None and ref_tokens is not None:
            ref_tokens = fusion.fused_tokens(self.fusion, ref_tokens, batch["ref_hidden"])
        if refs is not None:
            per_group = refs.shape[1]
            ref_sigma = sigma.repeat_interleave(per_group)
            xr = sampling.noise_scaling(ref_sigma.view(-1, 1, 1, 1), batch["ref_noise"].flatten(0, 1),
                                        refs.flatten(0, 1))
            ref_extra = {} if batch["ref_adm"] is None else {"y": batch["ref_adm"].flatten(0, 1)}
            syncd = state.reference_conditioning == "syncd" and ref_tokens is not None
            state.begin_reference(ref_tokens.flatten(0, 1) if syncd else None)
            with torch.no_grad():  # SynCD: the reference pass has no gradient and no LoRA
                base.apply_model(xr, ref_sigma, c_crossattn=batch["ref_context"].flatten(0, 1),
                                 transformer_options=dict(options, sigmas=ref_sigma), **ref_extra)
            image = None if ref_tokens is None else blocks.ImageCondition(
                ref_tokens, batch["ref_weights"], batch["phrases"])
            maps = None if self.map_settings is None else \
                attention_constraint.PassMaps.of_batch(self.map_settings, batch)
            state.begin_target(batch["ref_masks"], image, maps)
        try:
            denoised = base.apply_model(x, sigma, c_crossattn=batch["context"],
                                        transformer_options=dict(options, sigmas=sigma), **extra)
        finally:
            state.end()
        scale = output_scale_of(sampling.calculate_denoised, sigma, batch["latent"])
        loss = parameterization_loss(denoised.float(), batch["latent"].float(), scale).mean()
        if self.map_settings is None:
            return loss
        self.last_maps, self.last_denoise = maps, loss.detach()
        for weight, term in zip(self.map_weights, attention_constraint.pass_losses(maps)):
            if weight and term is not None:
                loss = loss + weight * term
        return loss


def distributed_context():
    """(rank, world size) from torch.distributed when it is initialized, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def prepare(config):
    """Everything that can fail before the first step: settings, output folder, device, the
    whole dataset (every problem reported). Returns (device, groups)."""
    device = config_mod.validate(config)
    return device, manifest.load(config.dataset, config.max_references)


class Run:
    """The pieces of a run that training and evaluation share: the encoded dataset, the LoRA,
    the patched clone and the loss module."""

    def __init__(self, config, models, device, encoded, lora_layers=None):
        """encoded: (encoded groups, empty text, uncond image tokens), see `encode`."""
        self.config, self.models, self.device = config, models, device
        base = models.patcher.model
        self.encoded, self.empty_text, uncond_tokens = encoded
        adapter_layers = {}
        if models.adapter is not None:
            adapter_layers, adapter_lora = adapter_training_layers(models.adapter, base.diffusion_model)
            if lora_layers is None and adapter_lora:
                lora_layers = adapter_lora  # continue the adapter's own LoRA (SynCD files)
        if lora_layers is None:
            torch.manual_seed(config.seed)  # the fresh LoRA's down matrices
            lora_layers = blocks.build_lora_layers(base.diffusion_model, config.lora_rank,
                                                   config.lora_alpha)
        self.lora_layers = {loc: pairs.to(device) for loc, pairs in lora_layers.items()}
        self.adapter_layers = {loc: layer.to(device) for loc, layer in adapter_layers.items()}
        self.fusion = fusion.initial_fusion(models).to(device) if config.train_fusion else None
        self.state = blocks.PassState(self.lora_layers, config.gradient_checkpointing,
                                      self.adapter_layers, config.ip_scale,
                                      config.reference_conditioning)
        self.patcher = blocks.install(models.patcher.clone(), self.state)
        self.cls_fusion, cls_rows = None, None
        if config.cls_text:
            if models.adapter is None or models.clip_vision is None:
                raise config_mod.TrainConfigError(
                    "cls_text: the CLS text fusion trains with an adapter and the CLIP vision "
                    "model it reads (their class embeddings); give adapter and clip_vision, or "
                    "turn cls_text off")
            self.cls_fusion = cls_text.new_fusion(models.clip, cls_text.image_width_of(
                self.encoded), config.seed).to(device)
            cls_rows = cls_text.ClsTextRows(models.clip, base, config.resolution, device)
        self.step_module = TrainStep(self.lora_layers, self.adapter_layers, self.patcher, self.state,
                                     self.fusion, self.cls_fusion, cls_rows)
        if config.image_map_weight > 0 and models.adapter is None:
            raise config_mod.TrainConfigError(attention_constraint.ADAPTER_NEEDED)
        self.step_module.map_settings = attention_constraint.settings_of(config)
        self.step_module.map_weights = (config.text_map_weight, config.image_map_weight)
        self.sampler = batches.Sampler(config, self.encoded, self.empty_text,
                               base.model_sampling.sigmas.detach().cpu(), uncond_tokens)
        self.model_dtype = base.get_dtype()

    def batch(self, micro, rows):
        return self.sampler.batch(micro, rows, self.device, self.model_dtype)


def adapter_training_layers(adapter, diffusion_model):
    """Trainable fp32 copies of an adapter's per-layer IP projections (+ routing gate), keyed
    by location, and of its self-attention LoRA if it has one ({} otherwise). Copies: the
    loaded adapter is shared with the rest of the graph and must not change."""
    from ..kernels.adapter import AdapterLayer, linear_from_weight
    from ..kernels.checkpoints import cross_attention_dims
    adapter.require_image_layers("adapter (to train)")
    dims = cross_attention_dims(diffusion_model)
    locations = list(dims)
    bound = adapter.bind(locations, dims)
    copy = lambda linear: linear_from_weight(linear.weight.detach().float().clone())
    layers, lora = {}, {}
    for location in locations:
        layer = bound.layer(location)
        layers[location] = AdapterLayer(copy(layer.to_k_ip), copy(layer.to_v_ip),
                                        None if layer.text_to_weight is None
                                        else copy(layer.text_to_weight))
        if layer.self_attn_lora is not None:
            pairs = nn.ModuleDict()
            for name, pair in layer.self_attn_lora.items():
                fresh = type(pair)(pair.down.in_features, pair.up.out_features,
                                   pair.down.out_features, pair.alpha)
                fresh.load_state_dict({k: v.detach().float().clone()
                                       for k, v in pair.state_dict().items()})
                pairs[name] = fresh
            lora[location] = pairs
    return layers, lora


def evaluation_loss(config, models, lora_layers=None, micro_batches=4):
    """Mean loss over the first `micro_batches` micro-batches of the run's fixed draws (same
    timesteps, noise and dropout every call), no gradient: comparable before and after training.
    lora_layers None = a fresh LoRA (the base model's own loss)."""
    device, groups = prepare(config)
    run = Run(config, models, device, encoding.encode(config, models, groups, distributed_context()[0]), lora_layers)
    rows = list(range(config.batch_size))
    with torch.no_grad():
        _load(run.patcher, device)
        try:
            return sum(float(run.step_module(run.batch(m, rows)))
                       for m in range(micro_batches)) / micro_batches
        finally:
            _unload(run.patcher)


def map_shares(config, models, trained=None, micro_batches=4):
    """On the dataset of `config` (held-out groups), no gradient, the run's fixed draws without
    condition dropout: {"denoise": mean denoising loss, "text": mean share of the phrases'
    attention inside their own masks, "image": the same of the references' image tokens (with
    an adapter)} over the first `micro_batches` micro-batches at the config's map_layers.
    trained: a TrainResult (its LoRA and adapter layers), or None for the untrained model."""
    config = dataclasses.replace(config, text_dropout=0.0, image_dropout=0.0, both_dropout=0.0,
                                 full_mask_probability=0.0)
    device, groups = prepare(config)
    encoded = encoding.encode(config, models, groups)
    run = Run(config, models, device, encoded, None if trained is None else trained.lora_layers)
    if trained is not None:
        for location, layer in run.adapter_layers.items():
            layer.load_state_dict(trained.adapter_layers[location].state_dict())
    step = run.step_module
    step.map_settings = attention_constraint.MapSettings(frozenset(config.map_layers), True,
                                                         models.adapter is not None)
    step.map_weights = (0.0, 0.0)
    rows = list(range(config.batch_size))
    denoise, sums = 0.0, {}
    with torch.no_grad():
        _load(run.patcher, device)
        try:
            for micro in range(micro_batches):
                denoise += float(step(run.batch(micro, rows)))
                shares = attention_constraint.pass_shares(step.last_maps)
                for kind, (total, count) in shares.items():
                    previous = sums.get(kind, (0.0, 0))
                    sums[kind] = (previous[0] + total, previous[1] + count)
        finally:
            _unload(run.patcher)
    out = {"denoise": denoise / micro_batches}
    out.update({kind: total / max(count, 1) for kind, (total, count) in sums.items()})
    return out


def train(config, models, on_step=None, check_interrupt=None):
    """Run (or resume) a training run. on_step(step, total, loss) after each optimizer step;
    check_interrupt() raises to stop (ComfyUI's cancel). Interrupted runs save a resumable state
    and re-raise."""
    device, groups = prepare(config)
    rank, world = distributed_context()
    if config.batch_size % world:
        raise config_mod.TrainConfigError(f"batch_size {config.batch_size} must be divisible by "
                                          f"the number of processes ({world})")
    identity = json.loads(json.dumps(config_mod.run_identity(
        config, models.family, models.adapter.fingerprint if models.adapter is not None else None)))
    if rank == 0:
        checkpoint.clean_interrupted_writes(config.output_dir)
        if not config.resume:
            checkpoint.set_aside(config.output_dir)
    resumed = checkpoint.load_latest(config.output_dir) if config.resume else None
    if resumed is not None:
        _check_resumable(config, identity, *resumed)
    bf16 = device.type == "cuda" and config.mixed_precision in ("auto", "bf16")
    run = Run(config, models, device, encoding.encode(config, models, groups, distributed_context()[0]))
    lora_layers, patcher, step_module = run.lora_layers, run.patcher, run.step_module
    base = models.patcher.model
    optimizer = config_mod.make_optimizer(config, list(step_module.parameters()))
    warmup = config.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    start, losses = 0, []
    if resumed is not None:
        start, saved = resumed
        try:
            step_module.load_state_dict(saved["trainable"])
        except RuntimeError as exc:
            raise config_mod.TrainConfigError(
                f"output_dir {config.output_dir}: the run saved at step {start} trained weights "
                f"of other shapes than this model and settings make "
                f"({str(exc).splitlines()[-1].strip()[:200]}); {_RESUME_FIX}") from None
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["rng"])
        losses = [(int(s), loss) for s, loss in saved["losses"].tolist()]
        log.info("resumed %s at step %d", config.output_dir, start)
    if rank == 0:
        checkpoint.write_json(os.path.join(config.output_dir, "config.json"), config.to_dict())
    per_rank = config.batch_size // world
    rows = list(range(rank * per_rank, (rank + 1) * per_rank))

    def save(step):
        if rank != 0:
            return None
        saved_state = {"trainable": step_module.state_dict(), "optimizer": optimizer.state_dict(),
                       "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state(),
                       "step": torch.tensor(step), "run_identity": json.dumps(identity),
                       "losses": torch.tensor(losses, dtype=torch.float64).reshape(-1, 2)}
        return checkpoint.save(config.output_dir, step, saved_state, lora_layers, models.family,
                               config.keep_last, models.adapter, run.adapter_layers, run.fusion,
                               run.cls_fusion)

    ddp = step_module
    if world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(
            step_module, device_ids=[device.index] if device.type == "cuda" else None)
    step, last_saved, started = start, start, time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _load(patcher, device)
    try:
        if config.quality_threshold > 0:
            _select_data(config, run, groups, models.clip, rank)
        while step < config.steps:
            optimizer.zero_grad(set_to_none=True)
            total = 0.0
            for a in range(config.grad_accumulation):
                micro = step * config.grad_accumulation + a
                batch = run.batch(micro, rows)
                sync = a == config.grad_accumulation - 1 or world == 1
                with (ddp.no_sync() if not sync else contextlib.nullcontext()), \
                        torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
                    loss = ddp(batch) / config.grad_accumulation
                loss.backward()
                total += float(loss.detach())
            if world > 1:
                reduced = torch.tensor(total, device=device)
                torch.distributed.all_reduce(reduced)
                total = float(reduced) / world
            optimizer.step()
            scheduler.step()
            step += 1
            losses.append((step, total))
            if on_step is not None:
                on_step(step, config.steps, total)
            if step % config.save_every == 0 or step == config.steps:
                save(step)
                last_saved = step
            if config.preview_every and step % config.preview_every == 0 and rank == 0:
                _preview(config, run, step)
            if check_interrupt is not None:
                check_interrupt()
    except BaseException:
        if step > last_saved:
            where = save(step)
            log.warning("training stopped at step %d; resumable state saved in %s", step, where)
        raise
    finally:
        _unload(patcher)
    elapsed = time.perf_counter() - started
    done = step - start
    timed = done > 0 and elapsed > 0
    # steps: where the run stands; the rates are of this session's steps (none after a resume at
    # the last step: the weights are written again, nothing is trained).
    summary = {"steps": step, "steps_this_session": done, "seconds": round(elapsed, 3),
               "steps_per_s": round(done / elapsed, 4) if timed else None,
               "images_per_s": round(done * config.batch_size * config.grad_accumulation / elapsed, 4)
               if timed else None,
               "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 3)
               if device.type == "cuda" else None}
    weights = os.path.join(config.output_dir, checkpoint.WEIGHTS_NAME)
    adapter_file = cls_text_file = None
    if rank == 0:
        checkpoint.write_weights(weights, lora_layers, models.family)
        if models.adapter is not None:
            adapter_file = checkpoint.write_adapter(
                os.path.join(config.output_dir, checkpoint.ADAPTER_NAME), models.adapter,
                lora_layers, run.adapter_layers, run.fusion)
        if run.cls_fusion is not None:
            cls_text_file = checkpoint.write_cls_text(
                os.path.join(config.output_dir, checkpoint.CLS_TEXT_NAME), run.cls_fusion)
        checkpoint.write_core_lora(os.path.join(config.output_dir, checkpoint.CORE_LORA_NAME),
                                   lora_layers, blocks.attention_paths(base.diffusion_model))
        checkpoint.write_json(os.path.join(config.output_dir, "loss.json"), losses)
        _save_png(os.path.join(config.output_dir, "loss.png"), plots.loss_curve(losses))
        checkpoint.write_json(os.path.join(config.output_dir, "summary.json"), summary)
        log.info("training done: %s", summary)
    return TrainResult(config.output_dir, weights, step, losses, summary, lora_layers,
                       run.adapter_layers, adapter_file, run.fusion, cls_text_file)


_RESUME_FIX = ("to continue that run, put its settings back; to start a fresh run in this "
               "folder, turn resume off (--no-resume, or resume false in the node; the earlier "
               "run is then moved to its replaced/ folder); or choose another output_dir")


def _check_resumable(config, identity, start, saved):
    """One message listing every setting the new run changes from the saved one."""
    if "run_identity" not in saved:  # saved by an earlier version of the trainer
        return
    changes = config_mod.identity_differences(json.loads(saved["run_identity"]), identity)
    if changes:
        raise config_mod.TrainConfigError(
            f"output_dir {config.output_dir} holds a run saved at step {start} with other "
            f"settings than this one ({len(changes)} difference(s)):\n  - " + "\n  - ".join(changes)
            + f"\n{_RESUME_FIX[0].upper()}{_RESUME_FIX[1:]}")


def _select_data(config, run, groups, clip, rank):
    """Score every group's objects, drop those under the threshold, report both."""
    scores = quality.score_groups(run, groups, clip, config.resolution, config.seed)
    dropped = quality.dropped_groups(scores, config.quality_threshold)
    if rank == 0:
        checkpoint.write_json(os.path.join(config.output_dir, "data_selection.json"), {
            "threshold": config.quality_threshold, "scores": scores, "dropped": dropped,
            "unscored": [g.name for g in groups if g.name not in scores]})
    keep = [i for i, g in enumerate(groups) if g.name not in dropped]
    if not keep:
        raise manifest.DatasetError(config.dataset, [
            f"every group scored under quality_threshold {config.quality_threshold} (see "
            "data_selection.json in the output folder); lower the threshold"])
    if dropped:
        log.warning("data selection dropped %d of %d groups under quality %.3f: %s", len(dropped),
                    len(groups), config.quality_threshold, sorted(dropped))
    run.sampler.groups = [run.encoded[i] for i in keep]


PREVIEW_STEPS = 12


def _preview(config, run, step):
    """previews/step-NNNNNN.png: the model with the LoRA as it is now (no reference), the
    preview prompt, a fixed seed, Euler over PREVIEW_STEPS of the model's own noise levels."""
    from PIL import Image
    base, models = run.patcher.model, run.models
    if models.vae is None:
        return
    with torch.no_grad():
        if config.preview_prompt:
            context, adm = dataset.TextEncoder(models.clip, base, config.resolution)(config.preview_prompt)
        else:
            context, adm = run.encoded[0].context, run.encoded[0].adm
        options = dict(run.patcher.model_options.get("transformer_options", {}))
        dtype = run.model_dtype
        extra = {} if adm is None else {"y": adm[None].to(run.device, dtype)}
        context = context[None].to(run.device, dtype)
        table = base.model_sampling.sigmas
        picks = torch.linspace(len(table) - 1, 0, PREVIEW_STEPS).round().long()
        sigmas = torch.cat([table[picks].float(), table.new_zeros(1).float()]).to(run.device)
        noise = torch.randn((1, *run.encoded[0].latent.shape),
                            generator=torch.Generator().manual_seed(config.seed)).to(run.device, dtype)
        latent = euler_sample(lambda x, s: base.apply_model(
            x, s, c_crossattn=context, transformer_options=dict(options, sigmas=s), **extra),
            noise, sigmas)
        pixels = models.vae.decode(base.process_latent_out(latent.float()))[0]
    folder = os.path.join(config.output_dir, "previews")
    os.makedirs(folder, exist_ok=True)
    img = Image.fromarray((pixels.clamp(0, 1).cpu().numpy() * 255).round().astype("uint8"))
    _save_png(os.path.join(folder, f"step-{step:06d}.png"), img)


def _save_png(path, img):
    checkpoint.atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


def _load(patcher, device):
    """Apply the clone's object patches (the training-safe path) and move it to `device`."""
    patcher.patch_model(device_to=device)


def _unload(patcher):
    patcher.unpatch_model(device_to=patcher.offload_device)

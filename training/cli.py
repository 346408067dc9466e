"""The trainer's command line (entered through `python -m training`, see training/__main__.py).

Settings: training/config.py; dataset manifest: training/manifest.py. Under torchrun (WORLD_SIZE
> 1) every process trains its share of each global batch with DistributedDataParallel (NCCL on
CUDA, gloo on CPU); process 0 writes the checkpoints.
"""
import argparse
import json
import logging
import os
import sys

import torch

from ..kernels import weights_files
from ..kernels.checkpoints import CheckpointError, base_family, cross_attention_dims
from . import config as config_mod, loop, manifest

log = logging.getLogger("multiref")


def load_models(config):
    """Models from the config: `model` is {"checkpoint": path} (a full SD1.5/SDXL checkpoint
    file) or {"tiny": "sd15" | "sdxl"} (the pack's tiny random-weight models); `adapter` and
    `clip_vision` (paths) add an adapter to train."""
    models = _base_models(config.model)
    if config.adapter:
        import comfy.clip_vision
        from ..kernels.checkpoints import load_adapter
        if not config.clip_vision or not os.path.isfile(config.clip_vision):
            raise config_mod.TrainConfigError(
                f"clip_vision {config.clip_vision!r}: training an adapter needs the path of the "
                "CLIP vision model it reads (e.g. CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors)")
        models.adapter = load_adapter(config.adapter)
        weights_files.check(config.clip_vision, "clip_vision")  # the host may unpickle unsafely
        models.clip_vision = comfy.clip_vision.load(config.clip_vision)
    return models


def _base_models(spec):
    if not isinstance(spec, dict) or len(spec) != 1 or not set(spec) & {"checkpoint", "tiny"}:
        raise config_mod.TrainConfigError('model must be {"checkpoint": "path/to/model.safetensors"}'
                                          ' or {"tiny": "sd15"} / {"tiny": "sdxl"}')
    if "tiny" in spec:
        from ..families import tiny_models
        if spec["tiny"] not in ("sd15", "sdxl"):
            raise config_mod.TrainConfigError(f"model.tiny must be sd15 or sdxl, got {spec['tiny']!r}")
        family = spec["tiny"]
        return loop.Models(tiny_models.tiny_unet(family), tiny_models.tiny_vae(),
                           tiny_models.tiny_text_encoder(family), family)
    import comfy.sd
    path = spec["checkpoint"]
    if not os.path.isfile(path):
        raise config_mod.TrainConfigError(f"model.checkpoint {path} does not exist; give the path "
                                          "of an SD1.5 or SDXL checkpoint (.safetensors)")
    weights_files.check(path, "model.checkpoint")  # the host may unpickle it unsafely
    model, clip, vae = comfy.sd.load_checkpoint_guess_config(path, output_vae=True,
                                                            output_clip=True)[:3]
    return loop.Models(model, vae, clip, family_of(model))


def family_of(patcher):
    """sd15 or sdxl, from the UNet's cross-attention width (kernels.checkpoints.base_family)."""
    unet = patcher.model.diffusion_model
    if not hasattr(unet, "input_blocks"):  # a diffusion transformer (Flux, SD3, ...)
        raise config_mod.TrainConfigError(
            f"the model is a diffusion transformer ({type(unet).__name__}), not a "
            "UNet: the trainer is UNet-only (SD1.5, SDXL); give an SD1.5 or SDXL checkpoint")
    family = base_family(unet)
    if family is None:
        widths = sorted({context for context, _ in cross_attention_dims(unet).values()})
        raise config_mod.TrainConfigError(f"the model's cross-attention width {widths} is neither "
                                          "SD1.5 (768) nor SDXL (2048): the trainer supports those")
    return family


def _init_distributed():
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world < 2:
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group(backend=backend)
    return True


def main(argv):
    parser = argparse.ArgumentParser(prog="python -m training",
                                     description="Train a MultiRef LoRA from a dataset manifest.")
    parser.add_argument("--config", required=True, help="training settings (JSON)")
    parser.add_argument("--comfyui", help="a ComfyUI checkout to load models with (default: the "
                        "installed comfyui package)")
    parser.add_argument("--no-resume", action="store_true",
                        help="start from scratch even if output_dir holds checkpoints")
    args = parser.parse_args(argv)
    # Progress lines are INFO records of the pack's logger; the host usually has a root handler
    # that prints them, else this command adds one for its duration.
    handler = None if logging.getLogger().handlers else logging.StreamHandler(sys.stderr)
    level = log.level
    if handler is not None:
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        return _run(args)
    finally:
        if handler is not None:
            log.removeHandler(handler)
        log.setLevel(level)


def _run(args):
    try:
        with open(args.config) as f:
            data = json.load(f)
        config = config_mod.TrainConfig.from_dict(data, os.path.dirname(os.path.abspath(args.config)))
        if args.no_resume:
            config.resume = False
        distributed = _init_distributed()
    except (OSError, json.JSONDecodeError, config_mod.TrainConfigError) as exc:
        log.error("error: %s", exc)
        return 2
    try:
        loop.prepare(config)  # every check before loading any model
        models = load_models(config)
        result = loop.train(config, models, on_step=_report)
        if loop.distributed_context()[0] == 0:
            log.info("weights: %s", result.adapter_file or result.weights)
        return 0
    except (manifest.DatasetError, config_mod.TrainConfigError, CheckpointError) as exc:
        log.error("error: %s", exc)
        return 2
    except KeyboardInterrupt:
        log.error("interrupted: the state was saved in %s; run the same command to resume",
                  config.output_dir)
        return 130
    finally:
        if distributed:
            torch.distributed.destroy_process_group()


def _report(step, total, loss):
    if step == 1 or step == total or step % 10 == 0:
        log.info("step %d/%d loss %.4f", step, total, loss)

"""Training settings: one JSON object (the CLI's --config file; the node builds the same object).

    {"dataset": "data/manifest.json", "output_dir": "runs/dog",
     "model": {"checkpoint": "/path/sd_xl_base_1.0.safetensors"},   # or {"tiny": "sd15"}
     "steps": 2000, "batch_size": 1, "grad_accumulation": 4, "learning_rate": 1e-4,
     "lora_rank": 128, "resolution": 1024, "save_every": 250, "keep_last": 3}

Every check that can fail runs before the first step: a bad value, an output folder that cannot
be written, a CUDA-only option on a machine without CUDA.
"""
import dataclasses
import importlib.util
import logging
import os
import tempfile
from dataclasses import dataclass, field
from typing import Optional

import torch

log = logging.getLogger("multiref")


class TrainConfigError(ValueError):
    """A training setting is unusable; the message names the setting and the fix."""


@dataclass
class TrainConfig:
    dataset: str
    output_dir: str
    model: dict = field(default_factory=lambda: {"tiny": "sd15"})
    steps: int = 1000
    batch_size: int = 1                 # global batch (all processes together)
    grad_accumulation: int = 1
    learning_rate: float = 1e-4
    warmup_steps: int = 0
    weight_decay: float = 1e-2
    optimizer: str = "adamw"            # adamw | adamw8bit (bitsandbytes; falls back to adamw)
    lora_rank: int = 16                  # on q, k, v and out of every self-attention
    lora_alpha: Optional[float] = None  # None = rank (scale 1)
    resolution: int = 512
    max_references: int = 3
    text_dropout: float = 0.05
    image_dropout: float = 0.05
    both_dropout: float = 0.05
    full_mask_probability: float = 0.10  # MSA masks replaced by all-ones (SynCD)
    seed: int = 0
    save_every: int = 250
    keep_last: int = 3
    resume: bool = True                  # continue from the newest checkpoint in output_dir
    gradient_checkpointing: bool = True
    mixed_precision: str = "auto"        # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    device: str = "auto"                 # auto | cpu | cuda
    adapter: Optional[str] = None        # CLI: an adapter file to train (its to_k_ip / to_v_ip /
    clip_vision: Optional[str] = None    # text_to_weight), with the CLIP vision model it reads
    ip_scale: float = 1.0                # strength of the image attention while training
    reference_conditioning: str = "syncd"  # the reference pass's conditioning, as MultiRef
                                         # Apply MSA's input of that name (kernels/msa.py)
    preview_every: int = 0               # a preview image every N steps (0 = none), of
    preview_prompt: str = ""             # this prompt (empty = the first caption)
    quality_threshold: float = 0.0       # drop groups whose object quality score is lower
                                         # (training/quality.py; 0 = keep all, no scoring)
    train_fusion: bool = False           # train the adapter's feature fusion of several CLIP
                                         # layers (training/fusion.py; needs a Plus adapter)
    cls_text: bool = False               # also train MM-Diff's CLS text fusion (kernels/
                                         # cls_text.py; needs an adapter and its clip_vision)
    text_map_weight: float = 0.0         # cross-attention map constraints (MM-Diff; training/
    image_map_weight: float = 0.0        # attention_constraint.py): weights of the phrase-token
                                         # and reference-token map losses (0 = off)
    map_layers: list = field(default_factory=lambda: ["input", "middle", "output"])
                                         # the layer groups whose maps are constrained

    @classmethod
    def from_dict(cls, data, base_dir="."):
        if not isinstance(data, dict):
            raise TrainConfigError("the training config must be a JSON object")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise TrainConfigError(f"unknown training setting(s) {unknown}; known: {sorted(known)}")
        missing = [k for k in ("dataset", "output_dir") if k not in data]
        if missing:
            raise TrainConfigError(f"the training config needs {missing}")
        data = dict(data)
        for key in ("dataset", "output_dir", "adapter", "clip_vision"):
            if data.get(key):
                data[key] = os.path.normpath(os.path.join(base_dir, data[key]))
        return cls(**data)

    def to_dict(self):
        return dataclasses.asdict(self)


# Settings a resumed run may change (how long, how often to save, how it runs); every other
# setting defines what is trained, and a resumed run must keep it.
RESUMABLE_CHANGES = ("output_dir", "steps", "save_every", "keep_last", "resume",
                     "gradient_checkpointing", "mixed_precision", "device", "preview_every",
                     "preview_prompt")
MAP_SETTINGS = ("text_map_weight", "image_map_weight", "map_layers")


# Settings added after runs were saved: at this default they stay out of a run's identity, so
# a run saved before them resumes.
ADDED_SETTINGS = {"train_fusion": False, "cls_text": False}


def run_identity(config, family, adapter_fingerprint):
    """What a checkpoint must share with the run that resumes it: the defining settings, the
    base model family and the adapter trained (its weights' fingerprint)."""
    identity = {k: v for k, v in config.to_dict().items() if k not in RESUMABLE_CHANGES
                and not (k in ADDED_SETTINGS and v == ADDED_SETTINGS[k])}
    if not (config.text_map_weight or config.image_map_weight):
        # Off, they change nothing: runs saved before these settings existed still resume.
        for key in MAP_SETTINGS:
            identity.pop(key, None)
    identity.update(base_family=family, adapter_weights=adapter_fingerprint)
    return identity


def identity_differences(saved, now):
    """['lora_rank: 16 in the saved run, 32 now', ...] for every key whose value differs."""
    value = lambda identity, key: identity.get(key, ADDED_SETTINGS.get(key))  # absent = default
    return [f"{key}: {value(saved, key)!r} in the saved run, {value(now, key)!r} now"
            for key in sorted(set(saved) | set(now)) if value(saved, key) != value(now, key)]


def resolve_device(config):
    """The torch device, or a clear error when a CUDA-only option meets a machine without CUDA."""
    cuda = torch.cuda.is_available()
    if config.device not in ("auto", "cpu", "cuda"):
        raise TrainConfigError(f"device must be auto, cpu or cuda, got {config.device!r}")
    if config.device == "cuda" and not cuda:
        raise TrainConfigError("device is 'cuda' but this machine has no CUDA GPU (or torch was "
                               "built without CUDA); set device to 'auto' or 'cpu'")
    if config.mixed_precision == "bf16" and not (cuda and config.device != "cpu"):
        raise TrainConfigError("mixed_precision 'bf16' needs a CUDA GPU; use 'auto' or 'fp32' "
                               "on this machine")
    return torch.device("cuda" if cuda and config.device != "cpu" else "cpu")


def validate(config):
    """Check every setting and the output folder; returns the torch device."""
    c = config
    positive = {"steps": c.steps, "batch_size": c.batch_size, "lora_rank": c.lora_rank,
                "grad_accumulation": c.grad_accumulation, "save_every": c.save_every,
                "keep_last": c.keep_last, "resolution": c.resolution,
                "max_references": c.max_references}
    for name, value in positive.items():
        if not isinstance(value, int) or value < 1:
            raise TrainConfigError(f"{name} must be a positive integer, got {value!r}")
    if c.resolution % 64:
        raise TrainConfigError(f"resolution must be a multiple of 64 (the UNet downsamples the "
                               f"latent three times), got {c.resolution}")
    if not c.learning_rate > 0:
        raise TrainConfigError(f"learning_rate must be > 0, got {c.learning_rate}")
    if c.optimizer not in ("adamw", "adamw8bit"):
        raise TrainConfigError(f"optimizer must be adamw or adamw8bit, got {c.optimizer!r}")
    if c.mixed_precision not in ("auto", "bf16", "fp32"):
        raise TrainConfigError(f"mixed_precision must be auto, bf16 or fp32, got {c.mixed_precision!r}")
    if not isinstance(c.preview_every, int) or c.preview_every < 0:
        raise TrainConfigError(f"preview_every must be 0 (off) or a positive integer, got "
                               f"{c.preview_every!r}")
    if not isinstance(c.train_fusion, bool):
        raise TrainConfigError(f"train_fusion must be true or false, got {c.train_fusion!r}")
    if not 0 <= c.quality_threshold <= 1:
        raise TrainConfigError(f"quality_threshold must be between 0 and 1 (a fraction of "
                               f"relevance mass), got {c.quality_threshold}")
    from ..kernels.msa import REFERENCE_CONDITIONINGS
    if c.reference_conditioning not in REFERENCE_CONDITIONINGS:
        raise TrainConfigError(f"reference_conditioning must be one of {REFERENCE_CONDITIONINGS}, "
                               f"got {c.reference_conditioning!r}")
    if not 0 <= c.full_mask_probability <= 1:
        raise TrainConfigError("full_mask_probability must be between 0 and 1")
    if min(c.text_dropout, c.image_dropout, c.both_dropout) < 0 or \
            c.text_dropout + c.image_dropout + c.both_dropout > 1:
        raise TrainConfigError("text_dropout, image_dropout and both_dropout must be >= 0 and sum "
                               "to at most 1")
    if not isinstance(c.cls_text, bool):
        raise TrainConfigError(f"cls_text must be true or false, got {c.cls_text!r}")
    from .attention_constraint import settings_problem
    problem = settings_problem(c)
    if problem:
        raise TrainConfigError(problem)
    device = resolve_device(c)
    check_writable(c.output_dir)
    return device


def check_writable(folder):
    """Create the output folder and prove a file can be written (and renamed) in it."""
    try:
        os.makedirs(folder, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write_test_", dir=folder)
        os.close(fd)
        os.remove(probe)
    except OSError as exc:
        raise TrainConfigError(f"output_dir {folder} is not writable ({exc.strerror or exc}); "
                               "choose a folder you can write to") from exc


def make_optimizer(config, params):
    """AdamW; the 8-bit AdamW of bitsandbytes when asked for and importable (else AdamW)."""
    kwargs = dict(lr=config.learning_rate, weight_decay=config.weight_decay)
    if config.optimizer == "adamw8bit":
        if importlib.util.find_spec("bitsandbytes") is not None:
            try:
                import bitsandbytes
                return bitsandbytes.optim.AdamW8bit(params, **kwargs)
            except Exception as exc:  # a broken CUDA setup raises many kinds; fall back
                log.warning("bitsandbytes AdamW8bit is not usable here (%s); using AdamW", exc)
        else:
            log.warning("optimizer adamw8bit asked for but bitsandbytes is not installed; "
                        "using AdamW (pip install bitsandbytes to save optimizer memory)")
    return torch.optim.AdamW(params, **kwargs)

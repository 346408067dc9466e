"""The dataset encoded once per run folder: latents, text and image embeddings, cached."""
import hashlib
import json
import logging
import os

import torch

from ..kernels import weights_files
from ..kernels.adapter import fingerprint_of
from . import checkpoint, config as config_mod, dataset, fusion

log = logging.getLogger("multiref")


def encode(config, models, groups, rank=0):
    """The dataset encoded once (dataset.encode_groups), reproducibly: the host's VAE samples
    its latent distribution, so it is seeded and every process and every resumed run gets the
    very same latents. Kept in <output_dir>/cache/ under a key of everything it depends on
    (groups, file sizes and times, resolution, seed, encoder weights), so a resumed run or a
    rerun on the same data never encodes again."""
    if models.adapter is not None and models.clip_vision is None:
        raise config_mod.TrainConfigError("training an adapter needs the CLIP vision model it "
                                          "reads (clip_vision)")
    fusion.check(config, models)
    path = os.path.join(config.output_dir, "cache", f"encoded-{cache_key(config, models, groups)}.pt")
    if os.path.isfile(path):
        log.info("using the cached encodings %s", path)
        cached, _ = weights_files.read(
            path, "cached encodings",
            unsafe_fix="the trainer writes weights-only caches, so this one was not written by it "
                       "(or was altered): delete it; the dataset is then encoded again",
            damaged_fix="delete it; the dataset is then encoded again")
        return dataset.from_tensors(cached)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        encoded = dataset.encode_groups(groups, config.resolution, models.vae, models.clip,
                                        models.patcher.model, models.clip_vision, models.adapter,
                                        fusion.levels(models) if config.train_fusion else None,
                                        config.cls_text)
    if rank == 0:  # one process writes the cache
        os.makedirs(os.path.dirname(path), exist_ok=True)
        checkpoint.atomic_write(path, lambda tmp: torch.save(dataset.to_tensors(encoded), tmp))
    return encoded


def cache_key(config, models, groups):
    files = sorted({p for g in groups for p in (g.target.image, g.target.mask, *(
        q for r in g.references for q in (r.view.image, r.view.mask, r.target_mask))) if p})
    stats = [(p, os.path.getsize(p), os.path.getmtime(p)) for p in files]
    encoders = [fingerprint_of(m.state_dict()) for m in (
        models.vae.first_stage_model, models.clip.cond_stage_model)]
    if models.adapter is not None:
        encoders += [models.adapter.fingerprint, models.adapter.uncond_convention,
                     fingerprint_of(models.clip_vision.model.state_dict())]
    # "reference prompts", "object places": caches of an older layout lack them and must not
    # be read.
    text = json.dumps([repr(groups), stats, config.resolution, config.seed, encoders,
                       "reference prompts", "object places"] + (  # a fusion run's cache holds hidden states too
        [["fusion levels", list(fusion.levels(models))]] if config.train_fusion else []) + (
        ["cls_text"] if config.cls_text else []))
    return hashlib.sha256(text.encode()).hexdigest()[:16]

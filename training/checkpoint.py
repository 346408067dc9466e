"""The run directory: checkpoints saved every N steps (keep the last K), atomically, and resume.

    <output_dir>/
      config.json                       the settings of the run
      checkpoints/step-000250/          one folder per saved step, renamed into place when complete
        multiref_lora.safetensors       the trained weights (pack format, see below)
        training_state.pt               everything resume needs: trainable tensors (fp32),
                                        optimizer, scheduler, step, RNG states
      multiref_lora.safetensors         the final weights
      multiref_adapter.safetensors      with an adapter: the trained adapter (adapter format)
      multiref_cls_text.safetensors     with cls_text: the CLS text fusion (kernels/cls_text.py)
      multiref_lora_core.safetensors    the same LoRA (kohya names) for core LoRA loaders (models/loras)
      loss.json, loss.png               (step, loss) of every step, and its curve
      summary.json                      steps/s, images/s, peak GPU memory
      cache/encoded-<key>.pt            the dataset's encodings (latents, text, image tokens)
      previews/step-NNNNNN.png          preview images (preview_every)
      data_selection.json               object quality scores and dropped groups (quality_threshold)
      replaced/<time>/                  an earlier run's files, moved aside when a fresh run
                                        (resume off) starts in the same folder

A run killed mid-write (kill -9, power loss) leaves only hidden temporary entries (`.step-*`
folders, `.multiref-*.tmp` files), never a half-written checkpoint; the next start removes them.

Weights file: safetensors, tensor names as the adapter files use them
(`self_attn_lora.{2i}.{to_q,to_k,to_v,to_out}.{down,up}.weight`, i = layer in the published
order; with a trained adapter also `image_proj.*`, `ip_adapter.{2i+1}.*`, and with train_fusion
`fusion.*`, kernels/feature_fusion.py), metadata
format / format_version / family / kind / contents / lora_alpha (kernels/checkpoints.py).
"""
import json
import logging
import os
import re
import shutil
import tempfile
import time

import torch
from safetensors.torch import save_file

from ..kernels import cls_text, weights_files
from ..kernels.adapter import AdapterLayer, LoadedAdapter
from ..kernels.adapter import published_order
from ..kernels.checkpoints import LORA_FORMAT, PACK_FORMAT_VERSION, save_adapter

WEIGHTS_NAME = "multiref_lora.safetensors"
CORE_LORA_NAME = "multiref_lora_core.safetensors"
ADAPTER_NAME = "multiref_adapter.safetensors"
CLS_TEXT_NAME = "multiref_cls_text.safetensors"
STATE_NAME = "training_state.pt"
REPLACED_DIR = "replaced"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_TMP_PREFIX = ".multiref-"
# What a run writes in its folder (cache/ is shared by runs on the same data and stays).
RUN_ENTRIES = ("config.json", "checkpoints", WEIGHTS_NAME, CORE_LORA_NAME, ADAPTER_NAME,
               "loss.json", "loss.png", "summary.json", "previews", "data_selection.json",
               CLS_TEXT_NAME)

log = logging.getLogger("multiref")


def lora_tensors(lora_layers):
    """{location: ModuleDict of LoRAPair} -> tensors under the adapter files' names."""
    out = {}
    for i, location in enumerate(published_order(lora_layers)):
        for name, pair in lora_layers[location].items():
            out[f"self_attn_lora.{2 * i}.{name}.down.weight"] = pair.down.weight.detach().cpu().contiguous()
            out[f"self_attn_lora.{2 * i}.{name}.up.weight"] = pair.up.weight.detach().cpu().contiguous()
    return out


def write_weights(path, lora_layers, family):
    """The LoRA weights file, written atomically (temp file + rename)."""
    alpha = {pair.alpha for pairs in lora_layers.values() for pair in pairs.values()}.pop()
    rank = next(iter(next(iter(lora_layers.values())).values())).down.out_features
    metadata = {"format": LORA_FORMAT, "format_version": PACK_FORMAT_VERSION, "family": family,
                "kind": "multiref", "contents": "self_attn_lora", "lora_alpha": repr(alpha),
                "lora_rank": str(rank), "layers": str(len(lora_layers))}
    atomic_write(path, lambda tmp: save_file(lora_tensors(lora_layers), tmp, metadata=metadata))
    return path


def write_adapter(path, base_adapter, lora_layers, adapter_layers, fusion=None):
    """The trained adapter (the base adapter's frozen image projection, the trained IP layers
    and LoRA, and the trained feature fusion, else the base adapter's own if it has one) in the
    pack's adapter format: MultiRefAdapterLoader reads it."""
    layers = tuple(AdapterLayer(adapter_layers[loc].to_k_ip, adapter_layers[loc].to_v_ip,
                                adapter_layers[loc].text_to_weight, lora_layers[loc])
                   for loc in published_order(adapter_layers))
    adapter = LoadedAdapter(kind="multiref", family=base_adapter.family,
                            image_proj=base_adapter.image_proj, layers=layers,
                            source=os.path.basename(path),
                            uncond_from=base_adapter.uncond_convention,
                            fusion=base_adapter.fusion if fusion is None else fusion)
    return save_adapter(adapter, path)


def write_cls_text(path, fusion):
    """The CLS text fusion in its own file format: MultiRefClsFusionLoader reads it."""
    return cls_text.save(fusion, path)


def core_lora_tensors(lora_layers, attention_paths):
    """The LoRA in the kohya naming that ComfyUI's core LoRA loader (and most UIs) read:
    `lora_unet_<module path with _>.lora_down.weight`, `.lora_up.weight`, `.alpha`.
    attention_paths: {location: 'diffusion_model.<...>.attn1'}. The host's to_out is a
    Sequential(Linear, Dropout): its weight is to_out.0."""
    out = {}
    for location, pairs in lora_layers.items():
        module = attention_paths[location][len("diffusion_model."):]
        for name, pair in pairs.items():
            key = "lora_unet_" + f"{module}.{name}{'.0' if name == 'to_out' else ''}".replace(".", "_")
            out[f"{key}.lora_down.weight"] = pair.down.weight.detach().cpu().contiguous()
            out[f"{key}.lora_up.weight"] = pair.up.weight.detach().cpu().contiguous()
            out[f"{key}.alpha"] = torch.tensor(pair.alpha)
    return out


def write_core_lora(path, lora_layers, attention_paths):
    tensors = core_lora_tensors(lora_layers, attention_paths)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "multiref-core-lora"}))
    return path


def atomic_write(path, write):
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save(output_dir, step, state, lora_layers, family, keep_last, adapter=None,
         adapter_layers=None, fusion=None, cls_fusion=None):
    """Write checkpoints/step-NNNNNN (complete or not at all), then drop all but the newest
    `keep_last`. Returns the checkpoint folder."""
    root = os.path.join(output_dir, "checkpoints")
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"step-{step:06d}")
    tmp = tempfile.mkdtemp(prefix=".step-", dir=root)
    try:
        torch.save(state, os.path.join(tmp, STATE_NAME))
        write_weights(os.path.join(tmp, WEIGHTS_NAME), lora_layers, family)
        if adapter is not None:
            write_adapter(os.path.join(tmp, ADAPTER_NAME), adapter, lora_layers, adapter_layers,
                          fusion)
        if cls_fusion is not None:
            write_cls_text(os.path.join(tmp, CLS_TEXT_NAME), cls_fusion)
        if os.path.isdir(final):  # the same step saved again (a resumed run stopped at once)
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in saved_steps(output_dir)[:-keep_last]:
        shutil.rmtree(os.path.join(root, f"step-{old:06d}"), ignore_errors=True)
    return final


def saved_steps(output_dir):
    root = os.path.join(output_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    return sorted(int(m.group(1)) for m in map(_STEP_DIR.match, os.listdir(root))
                  if m and os.path.isfile(os.path.join(root, m.group(0), STATE_NAME)))


def load_latest(output_dir):
    """(step, state) of the newest complete checkpoint, or None. The state file holds only
    tensors, numbers, strings and containers: read weights-only (weights_files)."""
    steps = saved_steps(output_dir)
    if not steps:
        return None
    folder = os.path.join(output_dir, "checkpoints", f"step-{steps[-1]:06d}")
    state, _ = weights_files.read(
        os.path.join(folder, STATE_NAME), "resume state",
        unsafe_fix=f"the trainer writes weights-only state files, so this one was not written by "
                   f"it (or was altered): delete the folder {folder} (the run then resumes from "
                   "the checkpoint before it) or start a fresh run",
        damaged_fix=f"delete the folder {folder}; the run then resumes from the checkpoint before it")
    return steps[-1], state


def clean_interrupted_writes(output_dir):
    """Remove what a run killed mid-write left: `.step-*` folders in checkpoints/ and
    `.multiref-*.tmp` files (every write is a temporary entry renamed into place, so these are
    never part of a complete file). Returns the removed paths."""
    removed = []
    for sub in ("", "checkpoints", "cache", "previews"):
        folder = os.path.join(output_dir, sub)
        if not os.path.isdir(folder):
            continue
        for name in os.listdir(folder):
            path = os.path.join(folder, name)
            if sub == "checkpoints" and name.startswith(".step-") and os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            elif name.startswith(_TMP_PREFIX) and name.endswith(".tmp") and os.path.isfile(path):
                os.remove(path)
            else:
                continue
            removed.append(path)
    if removed:
        log.warning("removed %d unfinished file(s) of an interrupted save in %s: %s", len(removed),
                    output_dir, ", ".join(os.path.relpath(p, output_dir) for p in removed))
    return removed


def set_aside(output_dir):
    """Move an earlier run's files (RUN_ENTRIES) to replaced/<time>/ so a fresh run never mixes
    with them; returns that folder, or None when there was nothing to move."""
    present = [name for name in RUN_ENTRIES if os.path.exists(os.path.join(output_dir, name))]
    if not present:
        return None
    target = os.path.join(output_dir, REPLACED_DIR, time.strftime("%Y%m%d-%H%M%S"))
    suffix = 1
    while os.path.exists(target):
        target = f"{target.rsplit('~', 1)[0]}~{suffix}"
        suffix += 1
    os.makedirs(target)
    for name in present:
        os.replace(os.path.join(output_dir, name), os.path.join(target, name))
    log.warning("resume is off: the earlier run in %s (%s) was moved to %s; delete that folder "
                "if you do not need it", output_dir, ", ".join(present), target)
    return target


def write_json(path, data):
    atomic_write(path, lambda tmp: _dump(tmp, data))


def _dump(tmp, data):
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)

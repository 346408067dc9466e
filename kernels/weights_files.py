"""Every model or state file the pack and its trainer open goes through here, as data only:
safetensors, or a pickle read with torch.load(weights_only=True). A pickle that would need to run
code to load is refused with a message naming the file. Plain torch, no ComfyUI import.

Files the host loads itself (the trainer's model checkpoint and CLIP vision model) pass `check`
first: the host may unpickle them without weights_only (the installable host does), so each must
be proven to hold only tensors, numbers and containers before the host sees it.
"""
import os
import pickle
import re
import tempfile

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
MODEL_UNSAFE_FIX = ("use a .safetensors version of the file (most models are published as "
                    "one), or convert it to .safetensors on a machine where you trust it")
MODEL_DAMAGED_FIX = "the file is damaged or incompletely downloaded: download it again"


class CheckpointError(ValueError):
    """A weights file cannot be used; the message names the file and what to do."""


def read(path, what, unsafe_fix=MODEL_UNSAFE_FIX, damaged_fix=MODEL_DAMAGED_FIX):
    """(contents, metadata) of a weights file: safetensors -> ({name: tensor}, its metadata);
    anything else -> (what torch.load(weights_only=True) returns, {}).
    what: the setting or input the file came from, for messages (e.g. "clip_vision")."""
    name = _require_file(path, what)
    try:
        if path.lower().endswith(SAFETENSORS_SUFFIXES):
            with safe_open(path, framework="pt") as f:
                metadata = dict(f.metadata() or {})
            return load_file(path), metadata
        return _torch_load(path), {}
    except pickle.UnpicklingError as exc:
        if "weights only" not in str(exc).lower():  # not a pickle at all, or a broken one
            raise _damaged(name, what, path, exc, damaged_fix) from None
        raise CheckpointError(
            f"refused to load {name} ({what}: {path}): it is a pickle that would run code to "
            f"load ({_refusal_reason(exc)}); pickles can run arbitrary code, so only weights-only "
            f"pickles (tensors, numbers, dicts, lists) are read. {unsafe_fix[:1].upper()}"
            f"{unsafe_fix[1:]}") from None
    except (RuntimeError, EOFError, OSError, ValueError, SafetensorError) as exc:
        raise _damaged(name, what, path, exc, damaged_fix) from None


def check(path, what, unsafe_fix=MODEL_UNSAFE_FIX, damaged_fix=MODEL_DAMAGED_FIX):
    """Raise CheckpointError unless `path` opens as data (see `read`). A zip-format pickle is
    memory-mapped, so checking a multi-GB checkpoint reads little more than its pickle."""
    read(path, what, unsafe_fix, damaged_fix)


def _require_file(path, what):
    if not path or not os.path.isfile(path):
        raise CheckpointError(f"{what}: file {path} does not exist; give the path of an existing "
                              "file")
    return os.path.basename(path)


def _torch_load(path):
    # Memory-mapped where the file allows it (zip format): a Lightning checkpoint holding a whole
    # model and optimizer state then costs only the tensors that are kept.
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        if "mmap" not in str(exc):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)


def _refusal_reason(exc):
    """The part of torch's refusal that says what the pickle asked for."""
    text = str(exc)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return f"it calls {found.group(1)}"
    found = re.search(r"Unsupported operand \d+", text)
    return found.group(0) if found else text.strip().splitlines()[-1][:200]


def _damaged(name, what, path, exc, fix):
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    return CheckpointError(f"cannot read {name} ({what}: {path}) ({first}); {fix}")


def write_safetensors(path, tensors, metadata):
    """Write a safetensors file atomically (a temp file in the same folder, then a rename): a
    reader never sees half a file, and a failed write leaves what was there before."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".multiref-", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path

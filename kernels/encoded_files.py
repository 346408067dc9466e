"""Encoded references in a safetensors file, so a reference is encoded once and reused across
workflows and machines. Tensors are written as they are (dtype and values kept: a reload is
bit-identical); everything else is JSON in the file's metadata. Plain torch, no ComfyUI import.

Tensors: ref.{i}.image_tokens, ref.{i}.uncond_tokens, and ref.{i}.latents / ref.{i}.masks /
ref.{i}.attention_mask / ref.{i}.tile_regions /
ref.{i}.class_embedding when the reference has them. Metadata: format,
format_version, adapter_fingerprint, references (a JSON list, one entry per reference: phrase,
weight, start_percent, end_percent, tokens_per_view, tokens_per_tile, and whether it has
latents, masks, attention_mask, tile_regions, class_embedding; files written before attention masks existed have
none of the later entries: no attention mask, every image reads all the tokens, no tile
regions, no class embedding).
"""
import json
import os

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from .references import EncodedReference
from . import weights_files
from .weights_files import CheckpointError

FORMAT = "multiref-encoded-references"
FORMAT_VERSION = "1"
SUFFIX = ".references.safetensors"
OPTIONAL_TENSORS = ("latents", "masks", "attention_mask", "tile_regions",
                    "class_embedding")
# Number of dimensions of each tensor (image_tokens (1, V*T, C), latents (V, 4, h, w), masks
# (V, h, w), attention_mask (F, H, W), tile_regions (K, h, w), class_embedding (V, D)).
DIMS = {"image_tokens": 3, "uncond_tokens": 3, "latents": 4, "masks": 3, "attention_mask": 3,
        "tile_regions": 3, "class_embedding": 2}
# Added within format version 1: an entry without the flag has no such tensor.
ADDED_TENSORS = ("attention_mask", "tile_regions", "class_embedding")
SPANS = ("tokens_per_view", "tokens_per_tile")  # token counts that split image_tokens


def save(encoded, path):
    """Write `encoded` (EncodedReference, ...) to `path` atomically (temp file + rename)."""
    encoded = tuple(encoded)
    fingerprints = {e.adapter_fingerprint for e in encoded}
    if len(fingerprints) != 1:
        raise ValueError("references: they were encoded with different adapters; save the "
                         "references of one adapter per file")
    tensors, entries = {}, []
    for i, enc in enumerate(encoded):
        tensors[f"ref.{i}.image_tokens"] = enc.image_tokens
        tensors[f"ref.{i}.uncond_tokens"] = enc.uncond_tokens
        for name in OPTIONAL_TENSORS:
            if getattr(enc, name) is not None:
                tensors[f"ref.{i}.{name}"] = getattr(enc, name)
        entries.append({"phrase": enc.phrase, "weight": enc.weight,
                        "start_percent": enc.start_percent, "end_percent": enc.end_percent,
                        **{name: getattr(enc, name) for name in SPANS},
                        **{name: getattr(enc, name) is not None for name in OPTIONAL_TENSORS}})
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION,
                "adapter_fingerprint": fingerprints.pop(), "references": json.dumps(entries)}
    return weights_files.write_safetensors(path, {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata)


def load(path):
    """(EncodedReference, ...) from a file `save` wrote; anything else is refused by name."""
    name = os.path.basename(path)
    if not name.lower().endswith(".safetensors"):
        raise CheckpointError(f"{name}: encoded references are read from .safetensors files only "
                              "(written by MultiRef Save Encoded References)")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = dict(f.metadata() or {})
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {name} ({str(exc).splitlines()[0][:200]}); the file "
                              "is damaged or incompletely copied: save it again") from None
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{name}: not a file of encoded references (format "
                              f"{metadata.get('format')!r}); save references with MultiRef Save "
                              "Encoded References")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{name}: encoded-references format version "
                              f"{metadata.get('format_version')}; this version of the pack reads "
                              f"version {FORMAT_VERSION}: update the pack, or encode the "
                              "references again")
    fingerprint = metadata.get("adapter_fingerprint", "")
    try:
        entries = json.loads(metadata.get("references", ""))
        _check_names(tensors, entries)
        return tuple(_entry(i, e, tensors, fingerprint) for i, e in enumerate(entries))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"{name}: its contents do not match its metadata ({exc}); the file "
                              "is damaged: save the references again") from None


def _entry(i, entry, tensors, fingerprint):
    parts = {name: tensors[f"ref.{i}.{name}"] for name in ("image_tokens", "uncond_tokens")}
    for name in OPTIONAL_TENSORS:
        parts[name] = tensors[f"ref.{i}.{name}"] if _has(entry, name) else None
    for name, tensor in parts.items():
        if tensor is not None and tensor.ndim != DIMS[name]:
            raise ValueError(f"ref.{i}.{name} has {tensor.ndim} dimensions, not {DIMS[name]}")
    if parts["image_tokens"].shape != parts["uncond_tokens"].shape:
        raise ValueError(f"reference {i}: image and uncond tokens differ in shape")
    return EncodedReference(**parts, phrase=str(entry["phrase"]), weight=float(entry["weight"]),
                            start_percent=float(entry["start_percent"]),
                            end_percent=float(entry["end_percent"]),
                            adapter_fingerprint=fingerprint,
                            **{name: _span(entry, name, parts["image_tokens"]) for name in SPANS})


def _check_names(tensors, entries):
    """Exactly the tensors the metadata announces (a missing one raises KeyError in _entry)."""
    if not entries:
        raise ValueError("no references")
    expected = {f"ref.{i}.{n}" for i, e in enumerate(entries) for n in DIMS
                if n not in OPTIONAL_TENSORS or _has(e, n)}
    extra = sorted(set(tensors) - expected)
    if extra:
        raise ValueError(f"unexpected tensors {extra[:3]}")


def _has(entry, name):
    """Whether a reference's entry announces the optional tensor `name`."""
    return entry.get(name, False) if name in ADDED_TENSORS else entry[name]


def _span(entry, name, image_tokens):
    """A reference's tokens_per_view or tokens_per_tile (None when absent: files of earlier
    versions), checked to split its tokens into whole views or tiles."""
    span = entry.get(name)
    if span is None:
        return None
    if not isinstance(span, int) or span < 1 or image_tokens.shape[1] % span:
        raise ValueError(f"{name} {span!r} does not split {image_tokens.shape[1]} tokens")
    return span

"""CLS-augmented text (MM-Diff): a reference's CLIP vision class embedding fused into the word
embedding of its entity token before the text encoder, one fusion per text encoder of the model
(SD1.5: "l"; SDXL: "l" and "g"). Its own safetensors file. Plain torch, no ComfyUI import.

Per text encoder of token width C, for a word embedding w (C) and a class embedding c (D):
    fused = w + mlp(LayerNorm([w ; proj(c)]))        mlp = Linear(2C, C) -> GELU -> Linear(C, C)
MM-Diff's MLP (LayerNorm, Linear, GELU, Linear over the concatenation) in residual form: the
last Linear starts at zero, so an untrained fusion gives fused == w exactly and the augmented
encoding equals the plain one bit for bit; training moves it away from the word only as far as
the loss asks (MM-Diff keeps the original words "to provide class priors").

File keys: cls_text.{encoder}.proj.{weight,bias}, cls_text.{encoder}.mlp.0.{weight,bias}
(LayerNorm), cls_text.{encoder}.mlp.1.{weight,bias}, cls_text.{encoder}.mlp.3.{weight,bias};
metadata format / format_version / family / image_width.
"""
import os
import re

import torch
from torch import nn

from . import weights_files
from .adapter import fingerprint_of
from .weights_files import CheckpointError

FORMAT = "multiref-cls-text"
FORMAT_VERSION = "1"
PREFIX = "cls_text."
PARTS = ("proj.weight", "proj.bias", "mlp.0.weight", "mlp.0.bias", "mlp.1.weight", "mlp.1.bias",
         "mlp.3.weight", "mlp.3.bias")
FAMILY_BY_ENCODERS = {("l",): "sd15", ("g", "l"): "sdxl"}
_KEY = re.compile(r"^cls_text\.([a-z]+)\.(.+)$")


class TokenFusion(nn.Module):
    """One text encoder's fusion: (word (..., C), class embedding (D,)) -> fused (..., C)."""

    def __init__(self, text_width, image_width):
        super().__init__()
        self.proj = nn.Linear(image_width, text_width)
        self.mlp = nn.Sequential(nn.LayerNorm(2 * text_width), nn.Linear(2 * text_width, text_width),
                                 nn.GELU(), nn.Linear(text_width, text_width))
        nn.init.zeros_(self.mlp[3].weight)
        nn.init.zeros_(self.mlp[3].bias)

    def forward(self, word, class_embedding):
        image = self.proj(class_embedding.to(word.dtype)).expand(word.shape)
        return word + self.mlp(torch.cat([word, image], dim=-1))


class ClsTextFusion(nn.Module):
    """The fusions of every text encoder of a model family, by the host's encoder key."""

    def __init__(self, text_widths, image_width, source="new"):
        super().__init__()
        self.encoders = nn.ModuleDict({key: TokenFusion(width, image_width)
                                       for key, width in sorted(text_widths.items())})
        self.image_width, self.source = image_width, source

    @property
    def family(self):
        return FAMILY_BY_ENCODERS.get(tuple(self.encoders), "unknown")

    @property
    def text_widths(self):
        return {key: fusion.proj.out_features for key, fusion in self.encoders.items()}

    @property
    def fingerprint(self):
        return fingerprint_of(self.state_dict())

    def fuse(self, encoder, word, class_embedding):
        return self.encoders[encoder](word, class_embedding)

    def describe(self):
        widths = ", ".join(f"{k}: {w}" for k, w in self.text_widths.items())
        return (f"CLS text fusion {self.source} ({self.family}; text widths {widths}; class "
                f"embedding width {self.image_width})")


def is_cls_text(keys):
    """A file of this layout: its tensors are all cls_text.* (detected by keys, as adapters)."""
    keys = list(keys)
    return bool(keys) and all(k.startswith(PREFIX) for k in keys)


def from_tensors(tensors, source):
    """Build a ClsTextFusion from a file's tensors, naming what is missing or inconsistent."""
    encoders = {}
    for key, value in tensors.items():
        match = _KEY.match(key)
        if match is None or match.group(2) not in PARTS:
            raise CheckpointError(f"{source}: unexpected tensor {key} in a CLS text fusion file "
                                  f"(expected cls_text.<encoder>.<{'|'.join(PARTS)}>); the file "
                                  "is damaged: train or save it again")
        encoders.setdefault(match.group(1), {})[match.group(2)] = value
    if tuple(sorted(encoders)) not in FAMILY_BY_ENCODERS:
        raise CheckpointError(f"{source}: CLS text fusion for text encoders {sorted(encoders)}; "
                              "the pack knows SD1.5 (l) and SDXL (g, l)")
    widths, image_widths = {}, set()
    for encoder, parts in encoders.items():
        missing = [p for p in PARTS if p not in parts]
        if missing:
            raise CheckpointError(f"{source}: cls_text.{encoder} lacks {missing}; the file is "
                                  "incomplete: train or save it again")
        widths[encoder], image_width = parts["proj.weight"].shape
        image_widths.add(image_width)
    if len(image_widths) != 1:
        raise CheckpointError(f"{source}: the encoders' projections read class embeddings of "
                              f"different widths {sorted(image_widths)}; the file is inconsistent")
    fusion = ClsTextFusion(widths, image_widths.pop(), source)
    state = {f"encoders.{encoder}.{part}": value.float()
             for encoder, parts in encoders.items() for part, value in parts.items()}
    try:
        fusion.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"{source}: tensor shapes do not fit one fusion "
                              f"({str(exc).splitlines()[-1].strip()[:200]}); the file is "
                              "inconsistent: train or save it again") from None
    return fusion


def tensors_of(fusion):
    """{file key: tensor} of a fusion (the layout of the module doc)."""
    return {f"{PREFIX}{name[len('encoders.'):]}": value.detach().cpu().contiguous()
            for name, value in fusion.state_dict().items()}


def save(fusion, path):
    """Write the fusion file atomically (temp file + rename)."""
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "family": fusion.family,
                "image_width": str(fusion.image_width)}
    return weights_files.write_safetensors(path, tensors_of(fusion), metadata)


def load(path):
    """A ClsTextFusion from its file; any other file is refused by name."""
    source = os.path.basename(path)
    tensors, metadata = weights_files.read(path, "fusion_name")
    if not isinstance(tensors, dict) or not is_cls_text(tensors):
        raise CheckpointError(f"{source}: not a CLS text fusion file (its tensors are not "
                              "cls_text.*); load image adapters with MultiRef Adapter Loader and "
                              "give this input a fusion trained with cls_text on")
    version = metadata.get("format_version", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{source}: CLS text fusion format version {version}; this version "
                              f"of the pack reads version {FORMAT_VERSION}: update the pack")
    return from_tensors(tensors, source).requires_grad_(False)  # loaded for use, not training

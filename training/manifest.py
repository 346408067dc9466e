"""The dataset manifest: one JSON file that lists every training group.

    {
      "format": "multiref-dataset", "version": 1,
      "root": "images",                         # optional; relative paths resolve against it
                                                # (itself relative to the manifest's folder)
      "samples": [
        {"kind": "object",                      # (a) SynCD style: one object, several views
         "caption": "a photo of a plush dog on a beach",
         "phrase": "dog",                       # the object's words in the caption
         "target": {"image": "dog/0.png", "mask": "dog/0_mask.png"},
         "references": [{"image": "dog/1.png", "mask": "dog/1_mask.png"},
                        {"image": "dog/2.png"}]},          # no mask = whole image is the object
        {"kind": "multi_object",                # (b) MIP style: several objects in one image
         "image": "scenes/park.png", "caption": "a dog and a cat in a park",
         "objects": [{"phrase": "dog", "mask": "scenes/park_dog.png",
                      "reference": "crops/dog.png", "reference_mask": "crops/dog_mask.png"},
                     {"phrase": "cat", "mask": "scenes/park_cat.png", "reference": "crops/cat.png"}]}
      ]
    }

Masks are images of the same size as their image; white (> 50% gray) = object. Both kinds become
the same `Group`: a target image, its caption, and K references, each with a foreground mask,
a phrase and (for multi-object samples) the object's mask in the target.
`load` checks the whole dataset and reports every problem of every sample at once (a sample
with a structural problem still has its files checked), not just the first.
"""
import json
import os
from dataclasses import dataclass, field
from typing import Optional, Tuple

from PIL import Image

FORMAT = "multiref-dataset"
VERSION = 1


class DatasetError(ValueError):
    """The dataset cannot be used; `problems` lists every problem found."""

    def __init__(self, manifest, problems):
        self.problems = list(problems)
        shown = "\n  - ".join(self.problems[:50])
        more = f"\n  ... and {len(self.problems) - 50} more" if len(self.problems) > 50 else ""
        super().__init__(f"dataset {manifest}: {len(self.problems)} problem(s); fix them and "
                         f"start again:\n  - {shown}{more}")


@dataclass(frozen=True)
class View:
    image: str
    mask: Optional[str] = None        # foreground of the object in this image; None = whole image


@dataclass(frozen=True)
class Reference:
    view: View
    phrase: str
    target_mask: Optional[str] = None  # where this object is in the target (multi-object only)


@dataclass(frozen=True)
class Group:
    """One training group: a target, its caption and K references of its object(s)."""
    name: str
    caption: str
    target: View
    references: Tuple[Reference, ...] = field(default_factory=tuple)


def load(manifest_path, max_references=None):
    """Parse and validate a manifest; returns the list of Groups or raises DatasetError listing
    every problem of every sample (structure, files, reference count) at once, sample by sample."""
    groups, problems, sizes = [], [], {}
    for group, found in _samples(manifest_path):
        if group is not None:
            found = found + _file_problems(group, sizes)
            if max_references is not None and len(group.references) > max_references:
                found.append(f"{group.name}: {len(group.references)} references, more than "
                             f"max_references ({max_references}); raise max_references or split "
                             "the sample")
            groups.append(group)
        problems += found
    if problems:
        raise DatasetError(manifest_path, problems)
    return groups


def parse(manifest_path):
    """(groups, problems) from the manifest's structure (no file is opened here)."""
    groups, problems = [], []
    for group, found in _samples(manifest_path):
        problems += found
        if group is not None:
            groups.append(group)
    return groups, problems


def _samples(manifest_path):
    """[(Group or None, its structure problems)] per sample; DatasetError when the file itself
    is unusable."""
    try:
        with open(manifest_path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise DatasetError(manifest_path, ["manifest file not found: check the `dataset` path"])
    except json.JSONDecodeError as exc:
        raise DatasetError(manifest_path, [f"not valid JSON: {exc}"])
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise DatasetError(manifest_path, [f'the top level must be an object with "format": '
                                           f'"{FORMAT}" (see training/manifest.py)'])
    if data.get("version") != VERSION:
        raise DatasetError(manifest_path, [f"version {data.get('version')!r} is not supported "
                                           f"(this trainer reads version {VERSION})"])
    base = os.path.dirname(os.path.abspath(manifest_path))
    root = os.path.join(base, data.get("root", ""))
    samples = data.get("samples")
    if not isinstance(samples, list) or not samples:
        raise DatasetError(manifest_path, ['"samples" must be a non-empty list'])
    return [_group(sample, f"samples[{index}]", root) for index, sample in enumerate(samples)]


def _group(sample, where, root):
    """(Group, problems): the group holds every path that could be read, even when other fields
    have problems, so its files are checked in the same pass (None: no group can be made)."""
    problems = []

    def text(obj, key, at, required=True):
        value = obj.get(key) if isinstance(obj, dict) else None
        if value is None and not required:
            return None
        if not isinstance(value, str) or (required and not value.strip()):
            problems.append(f"{at}: `{key}` must be a non-empty string")
            return None
        return value

    def path(obj, key, at, required=True):
        value = text(obj, key, at, required)
        return None if value is None else os.path.normpath(os.path.join(root, value))

    def entries(obj, key, at):
        value = obj.get(key)
        if not isinstance(value, list) or not value:
            problems.append(f"{at}: `{key}` must be a non-empty list")
            return []
        return value

    if not isinstance(sample, dict):
        return None, [f"{where}: must be an object"]
    kind = sample.get("kind")
    caption = text(sample, "caption", where)
    if kind == "object":
        phrase = text(sample, "phrase", where)
        target = sample.get("target")
        if not isinstance(target, dict):
            problems.append(f"{where}: `target` must be an object with `image` (and `mask`)")
            target = {}
        target_view = View(path(target, "image", f"{where}.target"),
                           path(target, "mask", f"{where}.target", required=False))
        refs = entries(sample, "references", where)
        references = tuple(
            Reference(View(path(r, "image", f"{where}.references[{i}]"),
                           path(r, "mask", f"{where}.references[{i}]", required=False)), phrase)
            for i, r in enumerate(refs))
        if any(not isinstance(r, dict) for r in refs):
            problems.append(f"{where}: every reference must be an object with `image`")
    elif kind == "multi_object":
        target_view = View(path(sample, "image", where))
        objects = entries(sample, "objects", where)
        references = tuple(
            Reference(View(path(o, "reference", f"{where}.objects[{i}]"),
                           path(o, "reference_mask", f"{where}.objects[{i}]", required=False)),
                      text(o, "phrase", f"{where}.objects[{i}]"),
                      path(o, "mask", f"{where}.objects[{i}]"))
            for i, o in enumerate(objects))
        for i, ref in enumerate(references):
            if caption and ref.phrase and ref.phrase.lower() not in caption.lower():
                problems.append(f"{where}.objects[{i}]: phrase {ref.phrase!r} does not occur in "
                                "the caption (routing finds objects by their words)")
    else:
        return None, problems + [f"{where}: `kind` must be 'object' or 'multi_object', got {kind!r}"]
    return Group(sample.get("name", where), caption, target_view, references), problems


def _file_problems(group, sizes):
    """The file problems of one group; `sizes` caches each file's size (None: unusable) across
    groups, so a file shared by several groups is opened and reported once."""
    problems = []

    def size_of(path, what):
        if path in sizes:
            return sizes[path]
        if not os.path.isfile(path):
            problems.append(f"{what}: file not found: {path}")
            sizes[path] = None
            return None
        try:
            with Image.open(path) as img:
                img.load()
                sizes[path] = img.size
        except Exception as exc:  # PIL raises many types for broken files; report them all
            problems.append(f"{what}: cannot read image {path} ({type(exc).__name__}: {exc})")
            sizes[path] = None
        return sizes[path]

    def pair(image, mask, what):
        image_size = None if image is None else size_of(image, f"{what} image")
        if mask is None:
            return
        mask_size = size_of(mask, f"{what} mask")
        if image_size and mask_size and image_size != mask_size:
            problems.append(f"{what}: mask {mask} is {mask_size[0]}x{mask_size[1]} but its image "
                            f"{image} is {image_size[0]}x{image_size[1]}; masks must match")

    pair(group.target.image, group.target.mask, f"{group.name} target")
    for i, ref in enumerate(group.references):
        pair(ref.view.image, ref.view.mask, f"{group.name} reference {i}")
        if ref.target_mask is not None:
            pair(group.target.image, ref.target_mask, f"{group.name} object {i} (in the target)")
    return problems

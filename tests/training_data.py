"""Tiny generated training datasets (PNG files + manifest) for the trainer tests."""
import json
import os

import numpy as np
from PIL import Image


def _object_image(rng, size, color):
    """A colored disc on a noisy background, and its mask."""
    yy, xx = np.mgrid[:size, :size]
    cy, cx = rng.integers(size // 4, 3 * size // 4, size=2)
    mask = (yy - cy) ** 2 + (xx - cx) ** 2 < (size // 4) ** 2
    img = rng.integers(0, 80, size=(size, size, 3)).astype(np.uint8)
    img[mask] = color
    return Image.fromarray(img), Image.fromarray((mask * 255).astype(np.uint8))


def write_object_dataset(folder, groups=3, refs=2, size=64, seed=0):
    """Kind (a): one object per group, a target + `refs` references, masks and captions."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    samples = []
    colors = [(220, 40, 40), (40, 200, 60), (50, 80, 230), (230, 210, 40)]
    names = ["apple", "frog", "ball", "lemon"]
    for g in range(groups):
        views = []
        for v in range(refs + 1):
            img, mask = _object_image(rng, size, colors[g % 4])
            img.save(os.path.join(folder, f"g{g}_v{v}.png"))
            mask.save(os.path.join(folder, f"g{g}_v{v}_mask.png"))
            views.append({"image": f"g{g}_v{v}.png", "mask": f"g{g}_v{v}_mask.png"})
        samples.append({"kind": "object", "caption": f"a photo of a {names[g % 4]}",
                        "phrase": names[g % 4], "target": views[0], "references": views[1:]})
    path = os.path.join(folder, "manifest.json")
    with open(path, "w") as f:
        json.dump({"format": "multiref-dataset", "version": 1, "samples": samples}, f)
    return path


def interrupt_at(n):
    """A trainer check_interrupt callback that stops the run (KeyboardInterrupt, as a cancelled
    prompt does) at its n-th call."""
    calls = []

    def check():
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
    return check


def _disc(size, center, radius):
    yy, xx = np.mgrid[:size, :size]
    return (yy - center[0]) ** 2 + (xx - center[1]) ** 2 < radius ** 2


def write_two_object_dataset(folder, groups=4, size=64, seed=0):
    """Kind (b): two objects per target (discs of two colors on noise, one in the left half and
    one in the right, sides drawn at random), each with its mask in the target, its phrase in
    the caption and a reference image of it alone (with its mask)."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    colors = [(220, 40, 40), (40, 200, 60), (50, 80, 230), (230, 210, 40)]
    names = ["apple", "frog", "ball", "lemon"]
    samples = []
    for g in range(groups):
        first, second = rng.choice(4, size=2, replace=False)
        sides = [0, 1] if rng.random() < 0.5 else [1, 0]
        img = rng.integers(0, 80, size=(size, size, 3)).astype(np.uint8)
        objects = []
        radius = size // 5
        for obj, side in zip((first, second), sides):
            center = (rng.integers(radius, size - radius + 1),
                      side * size // 2 + rng.integers(radius, size // 2 - radius + 1))
            mask = _disc(size, center, radius)
            img[mask] = colors[obj]
            Image.fromarray((mask * 255).astype(np.uint8)).save(
                os.path.join(folder, f"g{g}_{names[obj]}_mask.png"))
            # The reference: the object alone, centered on gray (as MIP-Adapter crops them).
            ref_mask = _disc(size, (size // 2, size // 2), size // 3)
            ref = np.full((size, size, 3), 128, dtype=np.uint8)
            ref[ref_mask] = colors[obj]
            ref_mask = Image.fromarray((ref_mask * 255).astype(np.uint8))
            Image.fromarray(ref).save(os.path.join(folder, f"g{g}_{names[obj]}_ref.png"))
            ref_mask.save(os.path.join(folder, f"g{g}_{names[obj]}_ref_mask.png"))
            objects.append({"phrase": names[obj], "mask": f"g{g}_{names[obj]}_mask.png",
                            "reference": f"g{g}_{names[obj]}_ref.png",
                            "reference_mask": f"g{g}_{names[obj]}_ref_mask.png"})
        Image.fromarray(img).save(os.path.join(folder, f"g{g}.png"))
        samples.append({"kind": "multi_object", "image": f"g{g}.png", "objects": objects,
                        "caption": f"a photo of a {names[first]} and a {names[second]}"})
    path = os.path.join(folder, "manifest.json")
    with open(path, "w") as f:
        json.dump({"format": "multiref-dataset", "version": 1, "samples": samples}, f)
    return path

"""Shares with 95% Wilson intervals, the markdown table, and the sample grids (PNG)."""
import math
import os

import numpy as np
from PIL import Image

from . import world


def wilson(successes, n, z=1.96):
    """(share, low, high): the Wilson score interval of a binomial share."""
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return p, max(0.0, centre - half), min(1.0, centre + half)


def share(flags):
    """'62% [48-74] (n=50)' for a list of booleans ('none (n=0)' for an empty one)."""
    if not flags:
        return "none (n=0)"
    p, lo, hi = wilson(int(sum(flags)), len(flags))
    return f"{100 * p:.0f}% [{100 * lo:.0f}-{100 * hi:.0f}] (n={len(flags)})"


def mean_ci(values):
    """'0.123 +- 0.010 (n=...)': mean and 1.96 standard errors, for a list of numbers."""
    v = np.asarray(values, np.float64)
    if len(v) < 2:
        return f"{v.mean() if len(v) else float('nan'):.3f} (n={len(v)})"
    return f"{v.mean():.3f} +- {1.96 * v.std(ddof=1) / math.sqrt(len(v)):.3f} (n={len(v)})"


def table(figures):
    """The results as markdown lines."""
    lines = ["| Figure | Setting | Result (95% CI) |", "|---|---|---|"]
    base = figures["base"]
    lines.append(f"| base: prompted shape drawn, one object (criterion >= 80%) | no reference, CFG "
                 f"{figures['text_scale']} | {share(base['single_shape'])} |")
    lines.append(f"| base: both shapes drawn, each in its half, two objects | no reference | "
                 f"{share(base['two_shapes'])} |")
    fid = figures["fidelity"]
    lines.append(f"| identity matches the reference (held-out identities) | adapter, one reference | "
                 f"{share(fid['with_reference'])} |")
    lines.append(f"| identity matches the reference (chance level) | base alone, same prompt/seed | "
                 f"{share(fid['without_reference'])} |")
    lines.append(f"| colour similarity to the reference's identity (histogram intersection, 0-1) | "
                 f"adapter, one reference | {mean_ci(fid['similarity_with'])} |")
    lines.append(f"| colour similarity to the reference's identity (chance level) | base alone, same "
                 f"prompt/seed | {mean_ci(fid['similarity_without'])} |")
    lines.append(f"| the closest of the {len(world.HELD_OUT)} held-out identities is the reference's | "
                 f"adapter, one reference | {share(fid['nearest_with'])} |")
    lines.append(f"| the closest of the {len(world.HELD_OUT)} held-out identities is the reference's (chance "
                 f"level) | base alone, same prompt/seed | {share(fid['nearest_without'])} |")
    lines.append(f"| prompted shape drawn, with the reference | adapter, one reference | "
                 f"{share(fid['shape_with_reference'])} |")
    for (mode, msa), r in figures["confusion"].items():
        name = f"`{mode}`" + (" + MSA" if msa else "")
        lines.append(f"| two references: an object carries the OTHER reference's identity | {name} | "
                     f"{share(r['swapped'])} |")
        lines.append(f"| two references: both objects carry their own identity | {name} | "
                     f"{share(r['both_own'])} |")
        lines.append(f"| two references: a drawn object's colours closer to the OTHER reference / to "
                     f"its own | {name} | {share(r['closer_other'])} / {share(r['closer_own'])} |")
        lines.append(f"| two references: routing weight inside the reference's own half (0.5 = "
                     f"none) | {name} | {mean_ci(r['routing_in_own_half'])} |")
    for (normalize, scale), r in figures["guidance"].items():
        name = f"{'normalized' if normalize else 'plain'} three-branch, image scale {scale:g}"
        lines.append(f"| clipped-pixel share (saturation) | {name} | {mean_ci(r['clipped'])} |")
        lines.append(f"| prompted shape drawn / identity matched | {name} | {share(r['shape'])} / "
                     f"{share(r['identity'])} |")
    return lines


def grid(rows, path, zoom=4, gap=2):
    """rows: lists of 32x32x3 pictures -> one PNG, zoomed (nearest), grey gaps."""
    if not rows:
        return
    side = rows[0][0].shape[0] * zoom
    width = max(len(r) for r in rows)
    canvas = np.full((len(rows) * (side + gap) + gap, width * (side + gap) + gap, 3), 0.15, np.float32)
    for i, row in enumerate(rows):
        for j, pic in enumerate(row):
            y, x = gap + i * (side + gap), gap + j * (side + gap)
            canvas[y:y + side, x:x + side] = pic.repeat(zoom, 0).repeat(zoom, 1)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(np.round(canvas * 255).astype(np.uint8)).save(path)

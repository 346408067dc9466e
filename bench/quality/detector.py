"""A fixed, rule-based reader of the world's pictures (generated or rendered): where the objects
are, which shape each is, and which identity it carries.

- Objects: pixels whose colour is saturated (max - min channel > 0.25; the background is grey),
  grouped into 4-connected components of at least 12 pixels (of 32x32).
- Shape: the component's mask against each shape's template drawn at the component's centroid,
  with the radius that gives the same area, at rotations -10..10 degrees; the best
  intersection-over-union wins; below 0.6 the object is "unrecognised".
- Identity: the component's colour histogram over the palette (each pixel to its nearest palette
  colour). Two histograms MATCH when their intersection (sum of per-bin minima) is at least 0.6:
  the same identity scores about 1, a plain object against a stripe pair sharing its colour 0.5,
  identities without a common colour about 0. Softer figures use the intersection itself: its
  mean against the reference's identity (with vs without the reference), and whether an object
  is closer to one reference's identity than to the other's, or which held-out identity it is
  closest to (the base draws stripes of three or four colours, which no strict match accepts).
"""
import numpy as np
from scipy import ndimage

from . import world

SATURATION = 0.25
MIN_PIXELS = 12
MIN_IOU = 0.6
MATCH = 0.6
_ANGLES = np.deg2rad([-10, -5, 0, 5, 10])
# radius giving a unit-radius shape's area, per shape (measured once on a large template)
_AREA_PER_R2 = {s: world.shape_mask(s, 64, 64, 40, size=128).sum() / 40 ** 2 for s in world.SHAPES}


def objects(image):
    """image (32x32x3 in 0..1) -> list of dicts(mask, centroid (x, y), shape, iou, histogram),
    largest first."""
    saturated = (image.max(axis=2) - image.min(axis=2)) > SATURATION
    labels, n = ndimage.label(saturated)
    found = []
    for k in range(1, n + 1):
        mask = labels == k
        if mask.sum() < MIN_PIXELS:
            continue
        shape, iou = classify(mask)
        ys, xs = np.nonzero(mask)
        found.append({"mask": mask, "centroid": (xs.mean() + 0.5, ys.mean() + 0.5),
                      "shape": shape, "iou": iou, "histogram": histogram(image, mask)})
    return sorted(found, key=lambda o: -o["mask"].sum())


def classify(mask):
    """(best shape or None, its IoU) by template matching."""
    ys, xs = np.nonzero(mask)
    cx, cy, area = xs.mean() + 0.5, ys.mean() + 0.5, mask.sum()
    best, best_iou = None, 0.0
    for shape in world.SHAPES:
        radius = np.sqrt(area / _AREA_PER_R2[shape])
        # the triangle's centroid sits below its box centre (apex up)
        offset = radius * 0.2 if shape == "triangle" else 0.0
        for angle in _ANGLES:
            template = world.shape_mask(shape, cx, cy - offset, radius, angle, mask.shape[0])
            iou = (template & mask).sum() / (template | mask).sum()
            if iou > best_iou:
                best, best_iou = shape, iou
    return (best if best_iou >= MIN_IOU else None), float(best_iou)


def histogram(image, mask):
    pixels = image[mask]
    nearest = ((pixels[:, None, :] - world.PALETTE[None]) ** 2).sum(-1).argmin(1)
    return np.bincount(nearest, minlength=len(world.PALETTE)) / max(len(pixels), 1)


def identity_histogram(identity):
    """The histogram a perfect drawing of an identity has (half and half, or all one colour)."""
    h = np.zeros(len(world.PALETTE))
    for c in identity:
        h[c] += 0.5
    return h


def similarity(h1, h2):
    return float(np.minimum(h1, h2).sum())


def nearest_identity(h, candidates):
    """The candidate identity whose histogram is most similar to h; None on a tie for the
    best (a tie is no answer)."""
    scores = [similarity(h, identity_histogram(c)) for c in candidates]
    best = max(scores)
    return None if scores.count(best) > 1 else candidates[scores.index(best)]


def matches(h1, h2):
    return similarity(h1, h2) >= MATCH


def find_shape(found, shape, region=None):
    """The largest detected object of `shape` (optionally with its centroid in `region`, a
    (x0, x1) column range), or None."""
    for obj in found:
        if obj["shape"] == shape and (region is None or region[0] <= obj["centroid"][0] < region[1]):
            return obj
    return None

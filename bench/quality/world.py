"""The synthetic world: scenes of one or two objects on a grey background, with ground truth.

An object = a SHAPE (named in the caption: circle, square, triangle, cross) and an IDENTITY the
caption never names: two colours of a six-hue palette in stripes (the same colour twice = a
plain object; which colour comes first is only the stripes' phase), 21 identities of which 5 are
held out of every training set. Every
scene comes with each object's mask and a reference view of the same object instance seen
differently (another position, scale, small rotation, background grey).

Pictures are drawn at 32x32 and stored 8x nearest-upscaled (256x256), so that the 8x latent
grid every SD node and the trainer assume is the drawing's own grid: the benchmark's pixel latent
averages 8x8 blocks back, which for these pictures is exactly invertible (base.PixelLatentVAE).

Two-object scenes put the first-named object in the left half and the second in the right half:
the caption's word order is the layout, so the halves are the true region masks for `mask`
routing."""
import itertools

import numpy as np

SIZE = 32
UPSCALE = 8  # as SD's VAE: the stored picture is 8x the latent grid
SHAPES = ("circle", "square", "triangle", "cross")
# red, yellow, green, cyan, blue, magenta: saturated hues only (the background is grey)
PALETTE = np.array([[230, 40, 40], [235, 215, 30], [40, 190, 60], [30, 200, 220],
                    [40, 70, 235], [215, 50, 215]], np.float32) / 255
IDENTITIES = tuple(itertools.combinations_with_replacement(range(len(PALETTE)), 2))  # colours a <= b
HELD_OUT = IDENTITIES[2::4]  # one in four, spread over the palette: 3 striped, 2 plain
TRAIN_IDENTITIES = tuple(i for i in IDENTITIES if i not in HELD_OUT)
STRIPE = 2  # pixels per stripe


def shape_mask(shape, cx, cy, radius, angle=0.0, size=SIZE):
    """Boolean (size, size) mask of a shape centred at (cx, cy), half-extent `radius`, rotated
    by `angle` radians; sampled at 4x4 points per pixel (covered if at least half are)."""
    sub = (np.arange(size * 4) + 0.5) / 4
    yy, xx = np.meshgrid(sub, sub, indexing="ij")
    c, s = np.cos(angle), np.sin(angle)
    u = (c * (xx - cx) + s * (yy - cy)) / radius  # object coordinates, unit half-extent
    v = (-s * (xx - cx) + c * (yy - cy)) / radius
    if shape == "circle":
        inside = u ** 2 + v ** 2 <= 1
    elif shape == "square":
        inside = (np.abs(u) <= 0.85) & (np.abs(v) <= 0.85)
    elif shape == "triangle":  # apex up, base at v = 0.8
        inside = (v <= 0.8) & (v >= -1.0) & (np.abs(u) <= (v + 1.0) / 1.8)
    elif shape == "cross":
        inside = ((np.abs(u) <= 0.33) & (np.abs(v) <= 1)) | ((np.abs(v) <= 0.33) & (np.abs(u) <= 1))
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")
    return inside.reshape(size, 4, size, 4).mean(axis=(1, 3)) >= 0.5


def paint(canvas, mask, identity, angle=0.0, phase=0):
    """Fill `mask` on `canvas` with the identity's stripes (perpendicular to the object's axis)."""
    yy, xx = np.mgrid[:canvas.shape[0], :canvas.shape[1]]
    along = -np.sin(angle) * xx + np.cos(angle) * yy
    stripe = ((np.floor(along / STRIPE).astype(int) + phase) % 2)
    colours = PALETTE[np.array(identity)][stripe]
    canvas[mask] = colours[mask]


def background(rng, size=SIZE):
    grey = rng.uniform(0.25, 0.75)
    return np.clip(grey + rng.normal(0, 0.02, (size, size, 1)), 0, 1).repeat(3, axis=2).astype(np.float32)


def draw(rng, objects, size=SIZE):
    """objects: [(shape, identity, cx, cy, radius, angle)] -> (image HxWx3, [mask per object])."""
    canvas = background(rng, size)
    masks = []
    for shape, identity, cx, cy, radius, angle in objects:
        mask = shape_mask(shape, cx, cy, radius, angle, size)
        paint(canvas, mask, identity, angle, phase=int(rng.integers(2)))
        masks.append(mask)
    return canvas, masks


COLOUR_NAMES = ("red", "yellow", "green", "cyan", "blue", "magenta")  # PALETTE's, in order


def caption(shapes, identities=None):
    """"a circle and a square"; with identities the colours are named before each shape ("a red
    blue circle", "a green square" for a plain one): only the base's training uses those (the
    benchmark's prompts never name an identity)."""
    if identities is None:
        return "a " + " and a ".join(shapes)
    named = [" ".join(COLOUR_NAMES[c] for c in sorted(set(identity))) + " " + shape
             for shape, identity in zip(shapes, identities)]
    return "a " + " and a ".join(named)


def scene(rng, shapes, identities):
    """A target scene: one object anywhere, or two objects, the first in the left half. Returns
    dict(image, masks, shapes, identities, caption)."""
    if len(shapes) == 1:
        r = rng.uniform(8, 11)
        objects = [(shapes[0], identities[0], rng.uniform(r, SIZE - r), rng.uniform(r, SIZE - r), r, 0.0)]
    else:
        objects = []
        for k, (shape, identity) in enumerate(zip(shapes, identities)):
            r = rng.uniform(5.5, 7)
            cx = rng.uniform(r, SIZE / 2 - r) + k * SIZE / 2
            objects.append((shape, identity, cx, rng.uniform(r, SIZE - r), r, 0.0))
    image, masks = draw(rng, objects)
    return {"image": image, "masks": masks, "shapes": tuple(shapes),
            "identities": tuple(identities), "caption": caption(shapes)}


def reference_view(rng, shape, identity):
    """The same object seen differently: its own picture (another position, scale, rotation up to
    10 degrees, background) and its mask."""
    r = rng.uniform(8, 12)
    angle = np.deg2rad(rng.uniform(-10, 10))
    image, masks = draw(rng, [(shape, identity, rng.uniform(r, SIZE - r), rng.uniform(r, SIZE - r), r, angle)])
    return image, masks[0]


def random_scene(rng, n_objects, identities=TRAIN_IDENTITIES):
    """A scene with random shapes (distinct in two-object scenes) and identities (no colour shared
    between the two objects, so their identities can be told apart)."""
    shapes = list(rng.choice(len(SHAPES), n_objects, replace=False))
    chosen = []
    while len(chosen) < n_objects:
        candidate = identities[rng.integers(len(identities))]
        if all(not set(candidate) & set(other) for other in chosen):
            chosen.append(candidate)
    return scene(rng, [SHAPES[i] for i in shapes], chosen)


def upscale(image):
    """32x32 picture -> the stored 256x256 (nearest, so 8x8 block means give it back exactly)."""
    return image.repeat(UPSCALE, axis=0).repeat(UPSCALE, axis=1)


def downscale(image):
    """Stored or generated 256x256 picture -> 32x32 by 8x8 block means."""
    h, w = image.shape[0] // UPSCALE, image.shape[1] // UPSCALE
    return image.reshape(h, UPSCALE, w, UPSCALE, -1).mean(axis=(1, 3))

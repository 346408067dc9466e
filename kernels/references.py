"""What a reference is, before and after encoding. Plain data: no ComfyUI import, immutable.

A reference is ONE object seen in one or several views (a batch of images of the same object).
`Reference` holds what the user gave; `EncodedReference` holds what the patches consume.
"""
from dataclasses import dataclass
from typing import Optional

import math

import torch
import torch.nn.functional as F

# How far outside 0..1 an IMAGE's pixels may stray (resampling overshoot, e.g. bicubic) before
# the image is refused as being on another scale (0..255, -1..1).
PIXEL_SLACK = 0.25


class ReferenceInputError(ValueError):
    """A reference input is unusable; the message names the input and the fix."""


def check_finite(tensor, what, fix):
    """Refuse NaN or infinite values: one of them turns the whole sampled latent into NaN."""
    bad = int((~torch.isfinite(tensor)).sum())
    if bad:
        raise ReferenceInputError(f"{what}: {bad} of {tensor.numel()} values are NaN or infinite; "
                                  f"{fix}")


def check_pixel_range(images, what):
    """Refuse an IMAGE far outside 0..1 (another scale): the encoders would see a clipped or
    washed-out picture and nothing else would show it."""
    low, high = float(images.min()), float(images.max())
    if low < -PIXEL_SLACK or high > 1 + PIXEL_SLACK:
        raise ReferenceInputError(
            f"{what}: pixel values run from {low:.4g} to {high:.4g}, but a ComfyUI IMAGE holds "
            f"0..1 (up to {PIXEL_SLACK} outside is accepted); a 0..255 image must be divided by "
            "255, a -1..1 image mapped with (x + 1) / 2, before it is connected")


@dataclass(frozen=True, eq=False)  # tensors inside: compare fields explicitly
class Reference:
    """Raw user input for one object.

    images: (V, H, W, 3) float in 0..1, V >= 1 views of the same object (ComfyUI IMAGE layout).
    masks: (V, H, W) or (1, H, W) (one mask for every view) float foreground masks (1 = object),
        or None = the whole image is the object.
    phrase: the object's words as they appear in the prompt, e.g. "dog" (routing uses them).
    weight: strength of this reference (multiplies its image-attention contribution).
    start_percent, end_percent: the part of sampling (0 = first step, 1 = last) it is active in.
    negative_images: (1 or V, H', W', 3) float in 0..1, what the reference must NOT look like:
        their adapter tokens replace the "no image" tokens of the unconditional branch; None =
        the adapter family's own "no image".
    attention_mask: (F, H', W') float in 0..1 over the OUTPUT image, where the reference acts
        (IPAdapter's attn_mask): it multiplies the reference's image attention at each position;
        F = 1 for every image of the batch, or one per batch image (a video's frames). None =
        everywhere. Not the foreground mask above, which selects the object in the reference.
    one_view_per_image: False = the views show one object and every generated image reads all
        of them; True = view k conditions batch image k only (IPAdapter Batch, a video's
        frames), one view serving every image.
    """
    images: torch.Tensor
    masks: Optional[torch.Tensor] = None
    phrase: str = ""
    weight: float = 1.0
    start_percent: float = 0.0
    end_percent: float = 1.0
    negative_images: Optional[torch.Tensor] = None
    attention_mask: Optional[torch.Tensor] = None
    one_view_per_image: bool = False

    def __post_init__(self):
        check_reference(self)


def check_image_batch(images, what):
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[-1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ReferenceInputError(f"{what}: expected an IMAGE batch (views, height, width, 3), "
                                  f"got {shape}; connect an RGB image (convert RGBA/gray first)")
    if images.shape[0] == 0:
        raise ReferenceInputError(f"{what}: the image batch is empty (0 views); connect at "
                                  "least one image")
    check_finite(images, what, "re-load or re-decode the image")
    check_pixel_range(images, what)


def check_reference(ref):
    images, masks = ref.images, ref.masks
    check_image_batch(images, "reference image")
    if ref.negative_images is not None:
        check_image_batch(ref.negative_images, "reference negative_image")
        if ref.negative_images.shape[0] not in (1, images.shape[0]):
            raise ReferenceInputError(
                f"reference negative_image: {ref.negative_images.shape[0]} images for "
                f"{images.shape[0]} views; give one negative image, or one per view")
    if ref.attention_mask is not None:
        check_attention_mask(ref.attention_mask, "reference attention_mask")
    if not math.isfinite(ref.weight):
        raise ReferenceInputError(f"reference weight: {ref.weight} is not a number; give 0..5")
    if masks is not None:
        check_finite(masks, "reference mask", "re-load or redraw the mask")
        if masks.ndim != 3 or masks.shape[0] not in (1, images.shape[0]) or \
                tuple(masks.shape[1:]) != tuple(images.shape[1:3]):
            raise ReferenceInputError(
                f"reference mask: size {tuple(masks.shape)} (views, height, width) does not match "
                f"its image {tuple(images.shape[:3])}; resize the mask to the image (or give one "
                "mask per view)")
    if not 0.0 <= ref.start_percent <= ref.end_percent <= 1.0:
        raise ReferenceInputError(f"reference start/end percent: need 0 <= start <= end <= 1, got "
                             f"{ref.start_percent}..{ref.end_percent}")


def check_attention_mask(mask, what):
    """An attention mask is a MASK batch (F, H, W) of finite values (MultiRef Reference clamps
    them to 0..1)."""
    if not isinstance(mask, torch.Tensor) or mask.ndim != 3 or 0 in mask.shape:
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ReferenceInputError(f"{what}: expected a MASK (images, height, width), got {shape}; "
                                  "connect a mask over the output image")
    check_finite(mask, what, "re-load or redraw the mask (0 = reference off, 1 = full)")


# Tiled encoding (ComfyUI_IPAdapter_plus's IPAdapter Tiled cuts a picture this way): at most
# this many square tiles along the long side of a non-square picture.
MAX_TILES = 4
NEAR_SQUARE = (0.75, 4 / 3)  # height / width ratios cut into 2 x 2 tiles of the centre square


def tile_layout(height, width):
    """How a height x width picture is cut into square tiles: (tiled area (top, left, height,
    width), tile side, tile origins relative to the area). A nearly square picture (NEAR_SQUARE)
    gives 2 x 2 tiles of its centre square; any other one tiles of its short side along its
    long side, at most MAX_TILES (a longer picture keeps its centre MAX_TILES squares),
    overlapping evenly when they do not fit exactly."""
    if NEAR_SQUARE[0] < height / width < NEAR_SQUARE[1]:
        side = min(height, width)
        half = side // 2
        area = ((height - side) // 2, (width - side) // 2, side, side)
        return area, half, [(y * half, x * half) for y in range(2) for x in range(2)]
    size, long = min(height, width), max(height, width)
    count = min(math.ceil(long / size), MAX_TILES)
    span = min(long, count * size)
    first = (long - span) // 2
    overlap = (count * size - span) / (count - 1) if count > 1 else 0
    along = [int(i * (size - overlap)) for i in range(count)]
    if width > height:
        return (0, first, size, span), size, [(0, a) for a in along]
    return (first, 0, span, size), size, [(a, 0) for a in along]


def square_tiles(images):
    """(V, H, W, 3) -> (V * k, s, s, 3): every view cut into the k square tiles of tile_layout,
    view after view, so that the CLIP vision model (which crops each picture to its centre
    square) sees all of it."""
    (top, left, _, _), size, origins = tile_layout(*images.shape[1:3])
    return torch.stack([images[:, top + y:top + y + size, left + x:left + x + size]
                        for y, x in origins], dim=1).reshape(-1, size, size, images.shape[-1])


def tile_regions(height, width, cell=8):
    """(k, h, w): where each tile of tile_layout lies in the tiled area, on a grid of cells of
    about `cell` pixels (each cell the fraction of it the tile covers). IPAdapter Tiled lets each
    tile act only there, the tiled area stretched onto the generated image."""
    (_, _, area_h, area_w), size, origins = tile_layout(height, width)
    cells_h, cells_w = max(1, round(area_h / cell)), max(1, round(area_w / cell))

    def covered(start, length, cells):
        edges = torch.linspace(0, length, cells + 1, dtype=torch.float64)
        low, high = edges[:-1], edges[1:]
        inside = torch.minimum(high, torch.tensor(float(start + size))) - \
            torch.maximum(low, torch.tensor(float(start)))
        return inside.clamp(min=0) / (high - low)

    return torch.stack([torch.outer(covered(y, area_h, cells_h), covered(x, area_w, cells_w))
                        for y, x in origins]).float()


MASK_VALUES = ("binary", "soft")


def latent_masks(masks, views, size, dilation=0, values="binary"):
    """(1 or V, H, W) float masks -> (V, h, w) masks on the latent grid `size`.

    binary: {0, 1}. Binarized at 0.5 on the image grid; a latent cell is foreground when at
    least half of its pixels are (area resize).
    soft: the mask's own values in [0, 1], averaged over each cell (area resize); Masked Shared
    Attention then counts a token of value m with weight e^(m - 1) (SynCD's additive mask), and
    leaves out tokens of value 0.
    `dilation` then grows the foreground by that many cells (square neighbourhood, the largest
    value nearby), as SynCD dilates its masks to keep object borders.
    """
    if values not in MASK_VALUES:
        raise ReferenceInputError(f"mask_values: {values!r} is not one of {MASK_VALUES}")
    if values == "soft":
        fg = F.interpolate(masks.float().clamp(0, 1).unsqueeze(1), size=tuple(size), mode="area")
    else:
        fg = (masks.float() > 0.5).float().unsqueeze(1)
        fg = (F.interpolate(fg, size=tuple(size), mode="area") >= 0.5).float()
    if dilation > 0:
        fg = F.max_pool2d(fg, 2 * dilation + 1, stride=1, padding=dilation)
    fg = fg[:, 0].expand(views, -1, -1).contiguous()
    empty = [i for i in range(views) if fg[i].sum() == 0]
    if empty:
        raise ReferenceInputError(_empty_mask_message(masks, views, size, empty))
    return fg


def _empty_mask_message(masks, views, size, empty):
    """Why views have no foreground cell, and what helps (mask_dilation cannot: it grows the
    cells that are already foreground)."""
    pixels = (masks.float() > 0.5).flatten(1).sum(1).expand(views)  # one mask may serve all
    blank = [i for i in empty if pixels[i] == 0]
    small = [i for i in empty if pixels[i] > 0]
    cell = f"{masks.shape[1] // size[0]}x{masks.shape[2] // size[1]}"
    parts = []
    if blank:
        parts.append(f"view(s) {blank} are blank (no pixel above 0.5): paint the object white in "
                     "the mask, or leave the mask out (= the whole image is the object)")
    if small:
        parts.append(
            f"in view(s) {small} the object covers only {[int(pixels[i]) for i in small]} "
            f"pixel(s), less than half of any {cell}-pixel latent cell, so no foreground is left "
            f"at the latent resolution {tuple(size)}: draw the mask larger around the object, or "
            "use a larger image in which the object spans several cells (mask_dilation cannot "
            "help: it only grows cells that are already foreground)")
    return "reference mask: no foreground; " + "; ".join(parts)


@dataclass(frozen=True, eq=False)  # tensors inside: compare fields explicitly
class EncodedReference:
    """One reference ready for the patches.

    image_tokens: (1, V*T, C_ctx) the adapter's projected tokens of all V views, concatenated
        view after view (T = 16 for Plus adapters, 4 for base adapters; C_ctx = the UNet's
        cross-attention context width). These go through each layer's to_k_ip / to_v_ip.
    uncond_tokens: same shape, the adapter's "no image" tokens as its checkpoint family's own
        code computes them (LoadedAdapter.uncond_convention), used for rows that must not see
        the reference.
    latents: (V, 4, h, w) raw VAE latents of the views (not yet scaled by the model's latent
        format), or None when no VAE was given (then Masked Shared Attention is unavailable).
    masks: (V, h, w) float on the latent grid, binary {0, 1} or soft values in [0, 1]
        (latent_masks) (h, w = latents' grid, or the image
        size / 8 when there are no latents), or None = the whole image.
    phrase, weight, start_percent, end_percent, attention_mask: copied from the Reference.
    tokens_per_view: None = every image reads all the tokens; T = the reference gives one view
        per batch image (Reference.one_view_per_image): image k reads tokens k*T .. (k+1)*T.
    tile_regions: None, or (K, h, w) where each of the K tiles of every view acts in the
        generated image (tile_regions; Encode References' crop "tiles on their regions");
        tokens_per_tile: the tokens of one tile (the tokens run view after view, tile after
        tile).
    adapter_fingerprint: LoadedAdapter.fingerprint of the adapter that made the tokens; patches
        refuse tokens made by another adapter.
    class_embedding: (V, D) CLIP vision's class (pooled, projected) embedding of each whole
        view, read by CLS-augmented text (kernels/cls_text.py); None in files saved before it.
    """
    image_tokens: torch.Tensor
    uncond_tokens: torch.Tensor
    latents: Optional[torch.Tensor]
    masks: Optional[torch.Tensor]
    phrase: str
    weight: float
    start_percent: float
    end_percent: float
    adapter_fingerprint: str
    attention_mask: Optional[torch.Tensor] = None
    tokens_per_view: Optional[int] = None
    tile_regions: Optional[torch.Tensor] = None
    tokens_per_tile: Optional[int] = None
    class_embedding: Optional[torch.Tensor] = None

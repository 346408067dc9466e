"""Regenerate the README's pictures from the pack itself.

  docs/images/routing_maps.png        where each reference goes: weighted vs sum routing
                                      (kernels/routing.py, drawn by the MultiRef Routing Maps node)
  docs/images/guidance_saturation.png plain three-branch vs normalized guidance at image scales
                                      2, 6, 12 (bench/guidance_saturation.py's runs)

Both are mechanism pictures: constructed queries and keys, and tiny random-weight models driven
by a denoiser with a known answer. Neither is a trained model's output; the pictures say so.

Run from the pack folder:  .venv/bin/python -m docs.make_pictures
"""
import os

import torch
from PIL import Image, ImageDraw, ImageFont

from bench import guidance_saturation as bench
from bench.common import boot_pack

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGES = os.path.join(ROOT, "docs", "images")
GUIDANCE_SCALES = (2.0, 6.0, 12.0)
GUIDANCE_RANGE = 3.0  # latent values in [-3, 3] map to [0, 255]; beyond that is clipped
BACKGROUND, INK, MUTED = (255, 255, 255), (20, 20, 20), (90, 90, 90)
MARGIN, GAP = 14, 12


def font(size):
    return ImageFont.load_default(size=size)


def text_size(draw, text, size):
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font(size))
    return right - left, bottom - top


def to_pil(rgb):
    """(H, W, 3) floats in [0, 1] -> PIL image."""
    return Image.fromarray((rgb.clamp(0, 1) * 255).round().to(torch.uint8).numpy())


def compose(title, note, column_heads, row_heads, cells, head_width=0):
    """A grid of cells (rows of (image, [(text, colour or None), ...])) with headers, a title and
    a note under it. Every image of the grid has the same size."""
    cell_w, cell_h = cells[0][0][0].size
    line = 17
    caption_h = max(len(lines) for row in cells for _, lines in row) * line + 6
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    width = max(2 * MARGIN + head_width + len(column_heads) * (cell_w + GAP) - GAP,
                2 * MARGIN + text_size(probe, title, 18)[0])
    note_lines = _wrap(probe, note, 12, width - 2 * MARGIN)
    top = MARGIN + 24 + len(note_lines) * 16 + 8 + 20
    height = top + len(cells) * (cell_h + caption_h + GAP) + MARGIN
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    draw.text((MARGIN, MARGIN), title, fill=INK, font=font(18))
    for i, text in enumerate(note_lines):
        draw.text((MARGIN, MARGIN + 26 + 16 * i), text, fill=MUTED, font=font(12))
    for c, head in enumerate(column_heads):
        x = MARGIN + head_width + c * (cell_w + GAP)
        draw.text((x + (cell_w - text_size(draw, head, 14)[0]) // 2, top - 20), head, fill=INK,
                  font=font(14))
    for r, row in enumerate(cells):
        y = top + r * (cell_h + caption_h + GAP)
        if row_heads:
            for i, text in enumerate(row_heads[r].split("\n")):
                draw.text((MARGIN, y + cell_h // 2 - 10 + 16 * i), text, fill=INK, font=font(14))
        for c, (image, lines) in enumerate(row):
            x = MARGIN + head_width + c * (cell_w + GAP)
            canvas.paste(image, (x, y))
            for i, (text, colour) in enumerate(lines):
                ty = y + cell_h + 4 + i * line
                if colour is not None:
                    draw.rectangle((x, ty + 2, x + 11, ty + 13), fill=colour)
                draw.text((x + (16 if colour is not None else 0), ty), text, fill=INK, font=font(13))
    return canvas


def _wrap(draw, text, size, width):
    lines, current = [], ""
    for word in text.split():
        trial = f"{current} {word}".strip()
        if current and text_size(draw, trial, size)[0] > width:
            lines.append(current)
            current = word
        else:
            current = trial
    return lines + [current]


def save(image, name):
    """Atomic write: a reader never sees half a PNG."""
    path = os.path.join(IMAGES, name)
    temporary = path + ".tmp"
    image.save(temporary, format="PNG", optimize=True)
    os.replace(temporary, path)
    print(f"wrote {os.path.relpath(path, ROOT)} ({image.size[0]}x{image.size[1]})")


# --- routing maps ---------------------------------------------------------------------------

ROUTING_GRID = (24, 40)  # latent height, width; the node draws 8 pixels per latent cell
HEADS, DIM_HEAD = 2, 8
# Intended region of each reference as (top, bottom, left, right) fractions of the latent.
LAYOUTS = {
    2: (("A", "left half", (0, 1, 0, 0.5)), ("B", "right half", (0, 1, 0.5, 1))),
    3: (("A", "left half", (0, 1, 0, 0.5)), ("B", "top right", (0, 0.5, 0.5, 1)),
        ("C", "bottom right", (0.5, 1, 0.5, 1))),
}


def region_masks(layout, grid):
    """(N, L) booleans: position x lies in reference i's intended region."""
    height, width = grid
    rows = torch.arange(height)[:, None].expand(height, width).flatten() / height
    cols = torch.arange(width)[None, :].expand(height, width).flatten() / width
    return torch.stack([(rows >= t) & (rows < b) & (cols >= l) & (cols < r)
                        for _, _, (t, b, l, r) in layout])


def constructed_layer(layout, grid, seed=0):
    """One attention layer built so the answer is known: the queries of reference i's region
    point along direction e_i (plus noise), and reference i's phrase key is e_i; every head sees
    the same directions. Reference tokens (keys and values) are random."""
    g = torch.Generator().manual_seed(seed)
    n = len(layout)
    masks = region_masks(layout, grid)
    directions = torch.eye(DIM_HEAD)[:n]
    q = 3.0 * (masks.float().T @ directions) + 0.3 * torch.randn(masks.shape[1], DIM_HEAD, generator=g)
    q = q.repeat(1, HEADS)[None]
    phrase_keys = [(3.0 * directions[i]).repeat(HEADS)[None] for i in range(n)]
    width = HEADS * DIM_HEAD
    ip_k = torch.randn(1, n, 16, width, generator=g)
    ip_v = torch.randn(1, n, 16, width, generator=g)
    return q, phrase_keys, ip_k, ip_v, masks


def routed(routing, mode, q, phrase_keys, ip_k, ip_v, reference_weights):
    """The pack's routed cross-attention with the text attention set to zero, so `out` is the
    references' contribution alone; returns (out, the map a user is shown)."""
    phrases = routing.phrase_keys(phrase_keys) if mode == "weighted" else None
    return routing.routed_cross_attention(q, torch.zeros_like(q), HEADS, ip_k, ip_v,
                                          reference_weights, 1.0, mode, phrases=phrases)


def share_in_region(routing, mode, layer, i):
    """Fraction of reference i's contribution (its magnitude summed over positions) that lands
    in its intended region, measured with only reference i switched on."""
    q, phrase_keys, ip_k, ip_v, masks = layer
    only_i = torch.zeros(len(phrase_keys))
    only_i[i] = 1.0
    out, _ = routed(routing, mode, q, phrase_keys, ip_k, ip_v, only_i)
    magnitude = out[0].norm(dim=-1)
    return float(magnitude[masks[i]].sum() / magnitude.sum())


def routing_panel(pack, mode, layer, layout):
    """The node MultiRef Routing Maps drawing the weights the kernel computed for this layer."""
    routing, routing_nodes = pack("kernels.routing"), pack("nodes.routing")
    q, phrase_keys, ip_k, ip_v, _ = layer
    n = len(phrase_keys)
    _, shown = routed(routing, mode, q, phrase_keys, ip_k, ip_v, torch.ones(n))
    if shown is None:  # mode sum: every reference at full weight everywhere, as the node records
        shown = torch.ones(1, q.shape[1], n)
    recorder = routing_nodes.RoutingRecorder()
    recorder.record(1.0, "input", ROUTING_GRID, shown)
    model = pack("families.tiny_models").tiny_unet("sd15")  # only carries the recorder
    model.model_options.setdefault("transformer_options", {})[routing_nodes.RECORDER_KEY] = recorder
    latent = {"samples": torch.zeros(1, 4, *ROUTING_GRID)}
    picture, = routing_nodes.MultiRefRoutingMaps().show(model, latent, 0, "all")
    image = to_pil(picture[0])
    draw = ImageDraw.Draw(image)
    w, h = image.size
    for name, _, (t, b, l, r) in layout:  # outline and name each intended region
        box = (round(l * w), round(t * h), round(r * w) - 1, round(b * h) - 1)
        draw.rectangle(box, outline=(255, 255, 255), width=2)
        cx, cy = (box[0] + box[2]) // 2, (box[1] + box[3]) // 2
        draw.text((cx - 6, cy - 11), name, fill=(255, 255, 255), font=font(22), stroke_width=2,
                  stroke_fill=(0, 0, 0))
    return image


def routing_picture(pack):
    routing, palette = pack("kernels.routing"), pack("nodes.routing").PALETTE
    rows = []
    for n, layout in LAYOUTS.items():
        layer = constructed_layer(layout, ROUTING_GRID, seed=n)
        row = []
        for mode in ("weighted", "sum"):
            lines = []
            for i, (name, where, _) in enumerate(layout):
                share = share_in_region(routing, mode, layer, i)
                colour = tuple(round(255 * c) for c in palette[i])
                lines.append((f"{name}: {100 * share:.0f}% of its contribution in {where}", colour))
            row.append((routing_panel(pack, mode, layer, layout), lines))
        rows.append(row)
    note = ("Constructed layer, not a trained model: queries in each outlined region point along "
            "that reference's phrase key (plus noise), reference tokens are random. Weights from "
            "kernels/routing.py, drawn by the MultiRef Routing Maps node (one colour per "
            "reference). Under each panel: share of each reference's contribution that lands in "
            "its own region (measured with only that reference on).")
    return compose("Where each reference goes: weighted routing vs sum", note,
                   ("weighted (each reference where its phrase is)",
                    "sum (every reference everywhere)"),
                   ("2\nreferences", "3\nreferences"), rows, head_width=92)


# --- normalized guidance --------------------------------------------------------------------

def latent_to_image(latent, scale=16):
    """Channels 0-2 of a (1, 4, h, w) latent as RGB, fixed range for every panel, enlarged."""
    rgb = (latent[0, :3].permute(1, 2, 0) / GUIDANCE_RANGE + 1) / 2
    image = to_pil(rgb)
    return image.resize((image.size[0] * scale, image.size[1] * scale), Image.NEAREST)


def latent_caption(latent):
    clipped = float((latent[0, :3].abs() > GUIDANCE_RANGE).float().mean())
    return [(f"mean |x| {float(latent.abs().mean()):.2f}", None),
            (f"{100 * clipped:.0f}% of values clipped", None)]


def guidance_picture(pack, bench, steps=6):
    run = bench.saturation_runner(pack, steps)
    rows = []
    target = None
    for normalize in (False, True):
        row = []
        for scale in GUIDANCE_SCALES:
            latent, _, toy = run(scale, normalize)
            row.append((latent_to_image(latent), latent_caption(latent)))
            target = toy.means["full"][None]
        rows.append(row)
    # The first column: what the prompt-conditioned data looks like (the denoiser's full-branch
    # mean), the same on both rows; blank under it on the second row.
    reference = (latent_to_image(target), latent_caption(target))
    blank = Image.new("RGB", reference[0].size, BACKGROUND)
    rows = [[reference] + rows[0], [(blank, [])] + rows[1]]
    note = (f"Tiny random-weight SD1.5-like model driven by an exact Gaussian denoiser per branch "
            f"(bench/guidance_saturation.py), the pack's three-branch guider and the host's euler "
            f"sampler, {steps} steps, text scale {bench.TEXT_SCALE}. Latent channels 0-2 shown as "
            f"RGB, one fixed range [-{GUIDANCE_RANGE:.0f}, {GUIDANCE_RANGE:.0f}] for every panel: "
            f"saturated colours and clipping mean the image condition overshoots. First column: "
            f"the prompt-conditioned data mean (what sampling without guidance gives).")
    heads = ["prompt data mean"] + [f"image scale {s:g}" for s in GUIDANCE_SCALES]
    return compose("Plain vs normalized three-branch guidance as the image scale grows", note,
                   heads, ("plain\nthree-branch", "normalized\n(SynCD eq. 4)"), rows,
                   head_width=110)


def main():
    pack = boot_pack()
    os.makedirs(IMAGES, exist_ok=True)
    save(routing_picture(pack), "routing_maps.png")
    save(guidance_picture(pack, bench), "guidance_saturation.png")


if __name__ == "__main__":
    main()

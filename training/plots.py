"""The loss curve as a picture, drawn with PIL (no plotting library needed): raw loss in light
gray, its running mean (window = 5% of the steps) in blue, on a fixed 640 x 360 canvas."""
import numpy as np
from PIL import Image, ImageDraw

WIDTH, HEIGHT, MARGIN = 640, 360, 40


def running_mean(values, window):
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def loss_curve(losses):
    """[(step, loss)] -> a PIL RGB image of the curve (axes labelled with first/last step and
    the loss range)."""
    img = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(img)
    draw.rectangle([MARGIN, MARGIN // 2, WIDTH - MARGIN // 2, HEIGHT - MARGIN], outline="black")
    if not losses:
        draw.text((MARGIN + 10, HEIGHT // 2), "no steps yet", fill="black")
        return img
    steps = [s for s, _ in losses]
    values = [float(v) for _, v in losses]
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    first, last = steps[0], steps[-1]

    def point(step, value):
        x = MARGIN + (WIDTH - 1.5 * MARGIN) * ((step - first) / ((last - first) or 1))
        y = HEIGHT - MARGIN - (HEIGHT - 1.5 * MARGIN) * ((value - low) / span)
        return x, y

    for series, color in ((values, (190, 190, 190)),
                          (running_mean(values, max(1, len(values) // 20)), (30, 90, 220))):
        pts = [point(s, v) for s, v in zip(steps, series)]
        draw.line(pts if len(pts) > 1 else pts * 2, fill=color, width=2)
    draw.text((MARGIN, HEIGHT - MARGIN + 5), f"step {first}", fill="black")
    draw.text((WIDTH - 2 * MARGIN - 20, HEIGHT - MARGIN + 5), f"step {last}", fill="black")
    draw.text((4, MARGIN // 2), f"{high:.3g}", fill="black")
    draw.text((4, HEIGHT - MARGIN - 10), f"{low:.3g}", fill="black")
    draw.text((MARGIN + 10, MARGIN // 2 + 5), "training loss (gray) and running mean (blue)",
              fill="black")
    return img


def as_comfy_image(img):
    """PIL image -> (1, H, W, 3) float tensor in 0..1 (ComfyUI IMAGE)."""
    import torch
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]

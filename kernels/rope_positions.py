"""Token positions of a Flux-style joint sequence and their rotary embedding (RoPE). Plain torch.

Flux gives every token an id of 3 axes (axis 0: which image, axes 1 and 2: row and column in
patch units; text tokens get 0, 0, 0, so RoPE leaves them unchanged) and rotates each pair of
channels (x[2j], x[2j+1]) of q and k by an angle id_a * theta^(-2j/d_a), axis after axis. Because
rotations compose, a key already rotated at position p moves to p + delta by one more rotation
of delta: reference keys gathered from their own rows (local positions) can be placed where they
do not collide with the target's positions without recomputing them.

Reference layouts (each reference a box of rows x columns in patch units):
  offset (ReferenceLatent's default): axis 0 = 1 for every reference; the boxes are packed
    along one growing edge so they never overlap each other (the target, on axis 0 = 0, cannot
    collide with any of them);
  index: axis 0 = 1, 2, ... one per reference, each box at row 0, column 0;
  below: axis 0 = 0, each box below the previous one, starting under the target (SynCD's data
    generation stacks images in height, for base models that never saw axis 0 other than 0).
"""
import torch

LAYOUTS = ("offset", "index", "below")


def grid_ids(rows, cols, index=0, row_offset=0, col_offset=0, dtype=torch.float32):
    """(rows * cols, 3) ids of an image box, row-major as the tokens are packed."""
    r = torch.arange(rows, dtype=dtype) + row_offset
    c = torch.arange(cols, dtype=dtype) + col_offset
    ids = torch.zeros(rows, cols, 3, dtype=dtype)
    ids[..., 0] = index
    ids[..., 1] = r[:, None]
    ids[..., 2] = c[None, :]
    return ids.reshape(rows * cols, 3)


def reference_placements(target_size, reference_sizes, layout="offset"):
    """[(index, row_offset, col_offset)] of each reference box (sizes in patch units)."""
    if layout not in LAYOUTS:
        raise ValueError(f"reference layout must be one of {LAYOUTS}, got {layout!r}")
    placements = []
    if layout == "index":
        return [(k + 1, 0, 0) for k in range(len(reference_sizes))]
    if layout == "below":
        row = target_size[0]
        for rows, _ in reference_sizes:
            placements.append((0, row, 0))
            row += rows
        return placements
    # offset: a reference goes right of the boxes so far when that keeps the covered area
    # squarer (its height plus the covered height exceeds its width plus the covered width),
    # below them otherwise.
    covered_rows = covered_cols = 0
    for rows, cols in reference_sizes:
        row_offset = col_offset = 0
        if rows + covered_rows > cols + covered_cols:
            col_offset = covered_cols
        else:
            row_offset = covered_rows
        covered_rows = max(covered_rows, rows + row_offset)
        covered_cols = max(covered_cols, cols + col_offset)
        placements.append((1, row_offset, col_offset))
    return placements


def rope_angles(ids, axes_dim, theta):
    """(..., L, 3) ids -> (..., L, sum(axes_dim) / 2) rotation angles, float64."""
    angles = []
    for axis, dim in enumerate(axes_dim):
        exponent = torch.arange(0, dim, 2, dtype=torch.float64) / dim
        angles.append(ids[..., axis, None].double() * theta ** -exponent)
    return torch.cat(angles, dim=-1)


def rotate(x, angles):
    """x (..., L, D) with channel pairs (2j, 2j+1) rotated by angles (..., L, D / 2), in x's
    dtype (the rotation is computed in float64)."""
    pairs = x.double().unflatten(-1, (-1, 2))
    cos, sin = angles.cos(), angles.sin()
    first = cos * pairs[..., 0] - sin * pairs[..., 1]
    second = sin * pairs[..., 0] + cos * pairs[..., 1]
    return torch.stack([first, second], dim=-1).flatten(-2).to(x.dtype)


def shift_rotated(x, delta_ids, axes_dim, theta):
    """Keys rotated at their positions p -> rotated at p + delta (delta_ids (L, 3) or (3,))."""
    return rotate(x, rope_angles(delta_ids, axes_dim, theta))


def unrotate_host(x, pe):
    """Undo the host's RoPE: x (B, H, L, D) rotated by ComfyUI's Flux `pe` (B or 1, 1, L, D/2, 2,
    2), the rotation matrix [[cos, -sin], [sin, cos]] per channel pair, back to the unrotated
    vectors (the transposed matrix is the inverse rotation), computed in float64."""
    pairs = x.double().unflatten(-1, (-1, 2))
    m = pe.double()
    first = m[..., 0, 0] * pairs[..., 0] + m[..., 1, 0] * pairs[..., 1]
    second = m[..., 0, 1] * pairs[..., 0] + m[..., 1, 1] * pairs[..., 1]
    return torch.stack([first, second], dim=-1).flatten(-2).to(x.dtype)

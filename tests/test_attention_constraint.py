"""The cross-attention map constraint: the kernel against a written-out formula."""
import math

import torch

from multiref.kernels import attention_constraint as ac


def _slow(q, k, heads, owners, key_valid, masks, grid, valid):
    """Loss and shares position by position, key by key, in Python floats: owners[b][s] is
    the object of key s (None = none), masks (B, N, h, w) averaged cell by cell by hand."""
    b_count, length, width = q.shape
    d = width // heads
    n_objects = masks.shape[1]
    cell_h, cell_w = masks.shape[2] // grid[0], masks.shape[3] // grid[1]
    losses, shares = [], torch.zeros(b_count, n_objects, dtype=torch.float64)
    for b in range(b_count):
        m = [[float(masks[b, i, y * cell_h:(y + 1) * cell_h, x * cell_w:(x + 1) * cell_w].mean())
              for y in range(grid[0]) for x in range(grid[1])] for i in range(n_objects)]
        for i in range(n_objects):
            for h in range(heads):
                a = []
                for pos in range(length):
                    scores = [sum(float(q[b, pos, h * d + c]) * float(k[b, s, h * d + c])
                                  for c in range(d)) / math.sqrt(d)
                              for s in range(k.shape[1])]
                    live = [s for s in range(k.shape[1]) if key_valid[b][s]]
                    top = max(scores[s] for s in live)
                    z = sum(math.exp(scores[s] - top) for s in live)
                    a.append(sum(math.exp(scores[s] - top) / z for s in live if owners[b][s] == i))
                shares[b, i] += sum(ax * mx for ax, mx in zip(a, m[i])) / sum(a) / heads
                if valid[b][i]:
                    peak = max(a)
                    inside = sum(ax / peak * mx for ax, mx in zip(a, m[i])) / sum(m[i])
                    outside = sum(ax / peak * (1 - mx) for ax, mx in zip(a, m[i])) / \
                        sum(1 - mx for mx in m[i])
                    losses.append((outside - inside) / heads)
    n_valid = sum(sum(row) for row in valid)
    return sum(losses) / n_valid, shares


def test_loss_and_shares_match_a_written_out_formula():
    gen = torch.Generator().manual_seed(0)
    heads, d, grid = 2, 3, (3, 4)
    q = torch.randn(2, 12, heads * d, generator=gen)
    k = torch.randn(2, 7, heads * d, generator=gen) * 2
    # row 0: object 0 owns keys 1-2, object 1 key 4; row 1: object 0 owns key 0, object 1 keys
    # 5-6, key 6 is padding (out of the softmax).
    owners = [[None, 0, 0, None, 1, None, None], [0, None, None, None, None, 1, 1]]
    key_valid = torch.tensor([[True] * 7, [True] * 6 + [False]])
    assignment = torch.zeros(2, 7, 2)
    for b, row in enumerate(owners):
        for s, owner in enumerate(row):
            if owner is not None:
                assignment[b, s, owner] = 1.0
    masks = (torch.rand(2, 2, 6, 8, generator=gen) > 0.5).float()
    valid = torch.tensor([[True, True], [True, False]])
    maps = ac.object_maps(q, k, heads, assignment, key_valid)
    at_grid = ac.masks_at_grid(masks, grid)
    loss = ac.balanced_localization_loss(maps, at_grid, valid)
    expected_loss, expected_shares = _slow(q, k, heads, owners, key_valid.tolist(), masks, grid,
                                           valid.tolist())
    torch.testing.assert_close(loss.double(), torch.tensor(expected_loss, dtype=torch.float64),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ac.share_inside(maps, at_grid).double(), expected_shares,
                               rtol=1e-5, atol=1e-6)


def test_loss_is_lowest_when_the_attention_lies_inside_the_mask():
    """A map inside its mask gives -1 (outside mean 0, inside mean 1); the mirrored map +1;
    no valid object gives 0 and a gradient of zeros."""
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2, :] = 1
    at_grid = ac.masks_at_grid(mask, (4, 4))
    inside = at_grid.transpose(1, 2)[:, None].clone()         # (1, 1, L, 1)
    valid = torch.tensor([[True]])
    assert float(ac.balanced_localization_loss(inside, at_grid, valid)) == -1.0
    assert float(ac.balanced_localization_loss(1 - inside, at_grid, valid)) == 1.0
    maps = inside.clone().requires_grad_()
    loss = ac.balanced_localization_loss(maps, at_grid, torch.tensor([[False]]))
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.equal(maps.grad, torch.zeros_like(maps))

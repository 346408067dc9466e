"""Cross-attention map constraints (MM-Diff's training losses, on FastComposer's balanced
localization loss), plain torch.

In one cross-attention layer, with queries Q (B, L, heads*d) at the L positions of the layer
grid, keys K (B, S, heads*d) and objects i = 1..N, each owning some of the keys:
  P_h(x, s) = softmax over the keys s of Q_x . K_s / sqrt(d)        (head h; one attention row)
  A_ih(x)   = sum over object i's keys s of P_h(x, s)               (object i's share at x)
  Â_ih(x)   = A_ih(x) / max_x A_ih(x)                               (FastComposer's normalisation:
                                                                     each map peaks at 1)
  m_i(x)    = object i's mask at the layer grid, the covered fraction of each cell (0..1)
  loss      = mean over heads and valid objects of
              sum_x Â (1 - m) / sum_x (1 - m)  -  sum_x Â m / sum_x m
              (the mean attention outside the object minus the mean attention inside)
An object's keys are its phrase tokens in the prompt (text maps), or its reference's image tokens
among all references' image tokens in one softmax (image maps: with each reference in its own
softmax, as routed attention runs it, its probabilities sum to 1 at every position and say
nothing about where it is).
The share inside, what the benchmark measures: sum_x A_ih m_i / sum_x A_ih, mean over heads.
"""
import math

import torch
import torch.nn.functional as F


def object_maps(q, k, heads, assignment, key_valid=None):
    """A (B, heads, L, N) float32: each object's share of the attention at each position.

    q: (B, L, heads*d); k: (B, S, heads*d); assignment: (B, S, N), 1 on object i's keys;
    key_valid: (B, S) bool or None, keys left out of the softmax (padding) are False."""
    b, length, width = q.shape
    d = width // heads
    qh = q.view(b, length, heads, d).transpose(1, 2)
    kh = k.view(b, k.shape[1], heads, d).transpose(1, 2)
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * (1.0 / math.sqrt(d))
    if key_valid is not None:
        scores = scores.masked_fill(~key_valid[:, None, None, :].to(scores.device), float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
    return torch.matmul(probs, assignment.to(probs)[:, None])


def masks_at_grid(masks, grid):
    """Masks (B, N, h, w) in 0..1 at a layer grid (H, W), each cell the covered fraction of
    the mask: (B, N, H*W)."""
    return F.adaptive_avg_pool2d(masks.float(), grid).flatten(2)


def balanced_localization_loss(maps, masks, valid):
    """The loss above: maps (B, heads, L, N) from object_maps, masks (B, N, L) from
    masks_at_grid, valid (B, N) bool (objects to constrain). A scalar; 0 (still part of the
    graph) when no object is valid."""
    peak = maps.amax(dim=2, keepdim=True).clamp_min(torch.finfo(maps.dtype).tiny)
    normalized = maps / peak
    inside = masks.transpose(1, 2)[:, None].to(maps)       # (B, 1, L, N)
    outside = 1 - inside
    mean_in = (normalized * inside).sum(2) / inside.sum(2).clamp_min(1e-6)
    mean_out = (normalized * outside).sum(2) / outside.sum(2).clamp_min(1e-6)
    per_object = (mean_out - mean_in).mean(dim=1)          # (B, N), mean over heads
    weight = valid.to(per_object)
    return (per_object * weight).sum() / weight.sum().clamp_min(1.0)


def share_inside(maps, masks):
    """(B, N): each object's attention mass inside its own mask, as a share of its mass."""
    inside = masks.transpose(1, 2)[:, None].to(maps)
    total = maps.sum(2).clamp_min(torch.finfo(maps.dtype).tiny)
    return ((maps * inside).sum(2) / total).mean(dim=1)

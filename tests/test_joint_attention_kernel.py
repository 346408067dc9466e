"""Kernels for MSA in a joint text+image sequence (kernels/joint_attention.py) and reference token
positions (kernels/rope_positions.py), against slow references written out differently: a dense
L x L masked softmax in float64, complex-number rotations, explicit id sets. Pure torch."""
import math

import pytest
import torch

from multiref.kernels import joint_attention as ja
from multiref.kernels import rope_positions as rp

B, H, D = 2, 2, 8
T, N = 3, 6


def _qkv(length, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, length, D, generator=gen) for _ in range(3)]


def _dense(q, keys, values, logits_offset):
    """softmax(q k^T / sqrt(D) + offset) v in float64, offset -inf where a key is not read."""
    logits = q.double() @ keys.double().transpose(-1, -2) / math.sqrt(D) + logits_offset
    return logits.softmax(-1) @ values.double()


def test_reading_rows_attention_equals_a_dense_masked_reference():
    q, k, v = _qkv(T + N)
    gen = torch.Generator().manual_seed(1)
    m = 5
    k_fg, v_fg = torch.randn(H, m, D, generator=gen), torch.randn(H, m, D, generator=gen)
    fg_bias = torch.tensor([0.0, 0.0, math.log(2.0), math.log(2.0), math.log(0.5)])
    out = ja.reading_rows_attention(q, k, v, T, k_fg, v_fg, fg_bias)
    keys = torch.cat([k, k_fg.expand(B, -1, -1, -1)], dim=2)
    values = torch.cat([v, v_fg.expand(B, -1, -1, -1)], dim=2)
    offset = torch.zeros(T + N, T + N + m, dtype=torch.float64)
    offset[:T, T + N:] = -math.inf  # text queries read their own row only
    offset[T:, T + N:] = fg_bias.double()  # image queries: each reference token w times
    torch.testing.assert_close(out.double(), _dense(q, keys, values, offset), rtol=1e-5, atol=1e-6)


def _kontext_dense(q, k, v, reference_lens, foreground, weights, block):
    length = q.shape[2]
    split = T + N
    offset = torch.zeros(length, length, dtype=torch.float64)
    per_token = torch.tensor(weights, dtype=torch.float64).repeat_interleave(
        torch.tensor(reference_lens))
    for j in range(split, length):
        fg, w = bool(foreground[j - split]), float(per_token[j - split])
        offset[T:split, j] = math.log(w) if fg else -math.inf
    if block:
        offset[split:, T:split] = -math.inf
    return _dense(q, k, v, offset)


@pytest.mark.parametrize("block", [True, False])
def test_kontext_attention_equals_a_dense_masked_reference(block):
    reference_lens = (4, 6)
    q, k, v = _qkv(T + N + sum(reference_lens), seed=2)
    foreground = torch.tensor([1, 0, 1, 1, 0, 0, 1, 1, 1, 0], dtype=torch.bool)
    weights = (2.0, 0.5)
    out = ja.kontext_attention(q, k, v, T, N, reference_lens, foreground, weights, block)
    expected = _kontext_dense(q, k, v, reference_lens, foreground, weights, block)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)


def test_kontext_blocking_keeps_every_reference_query_off_the_target():
    reference_lens = (4,)
    q, k, v = _qkv(T + N + 4, seed=3)
    foreground = torch.tensor([1, 1, 0, 1], dtype=torch.bool)
    out = ja.kontext_attention(q, k, v, T, N, reference_lens, foreground, (1.0,), True)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, T:T + N] += 10.0  # the target's keys and values, changed
    v2[:, :, T:T + N] -= 3.0
    moved = ja.kontext_attention(q, k2, v2, T, N, reference_lens, foreground, (1.0,), True)
    assert torch.equal(out[:, :, T + N:], moved[:, :, T + N:])  # read nothing of the target
    assert not torch.allclose(out[:, :, :T + N], moved[:, :, :T + N])


def test_kontext_is_plain_joint_attention_only_when_nothing_restricts():
    """All-ones mask, weight 1, no blocking: `restricts` is False and the caller runs the
    host's attention unchanged (exactly core ReferenceLatent); any other setting restricts."""
    ones = torch.ones(10, dtype=torch.bool)
    assert not ja.restricts(ones, (1.0, 1.0), False)
    assert ja.restricts(ones, (1.0, 1.0), True)
    assert ja.restricts(ones, (1.0, 2.0), False)
    partial = ones.clone()
    partial[3] = False
    assert ja.restricts(partial, (1.0, 1.0), False)
    # The restricted computation itself agrees with plain attention in that case (tolerance:
    # it runs three attentions instead of one).
    q, k, v = _qkv(T + N + 10, seed=4)
    out = ja.kontext_attention(q, k, v, T, N, (4, 6), ones, (1.0, 1.0), False)
    plain = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-6)


def test_kontext_refuses_a_sequence_of_another_length_and_nonpositive_weights():
    q, k, v = _qkv(T + N + 4)
    with pytest.raises(ValueError, match="not text 3 \\+ target 6"):
        ja.kontext_attention(q, k, v, T, N, (5,), torch.ones(5, dtype=torch.bool), (1.0,))
    with pytest.raises(ValueError, match="weights must be > 0"):
        ja.kontext_attention(q, k, v, T, N, (4,), torch.ones(4, dtype=torch.bool), (0.0,))


AXES, THETA = (4, 6, 6), 10000


def _complex_rotation(x, ids):
    """Each channel pair as a complex number times e^(i * angle), angle written axis by axis."""
    z = torch.view_as_complex(x.double().unflatten(-1, (-1, 2)).contiguous())
    angles = []
    for axis, dim in enumerate(AXES):
        for j in range(dim // 2):
            angles.append(ids[:, axis].double() * THETA ** (-(2.0 * j) / dim))
    rotated = z * torch.polar(torch.ones(()).double(), torch.stack(angles, dim=-1))
    return torch.view_as_real(rotated).flatten(-2)


def test_rotation_equals_complex_multiplication_and_composes():
    ids = rp.grid_ids(3, 4, index=1, row_offset=2)
    x = torch.randn(H, 12, sum(AXES), dtype=torch.float64)
    rotated = rp.rotate(x, rp.rope_angles(ids, AXES, THETA))
    torch.testing.assert_close(rotated, _complex_rotation(x, ids), rtol=1e-12, atol=1e-12)
    delta = torch.tensor([0.0, 5.0, 7.0])
    shifted = rp.shift_rotated(rotated, delta, AXES, THETA)
    direct = rp.rotate(x, rp.rope_angles(ids + delta, AXES, THETA))
    torch.testing.assert_close(shifted, direct, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("layout", rp.LAYOUTS)
def test_reference_positions_never_collide(layout):
    target = (4, 6)
    references = [(4, 6), (2, 8), (6, 2), (3, 3)]
    placements = rp.reference_placements(target, references, layout)
    boxes = [rp.grid_ids(*target)] + [rp.grid_ids(rows, cols, *place)
                                      for (rows, cols), place in zip(references, placements)]
    seen = set()
    for box in boxes:
        ids = {tuple(row) for row in box.tolist()}
        assert len(ids) == box.shape[0] and not ids & seen
        seen |= ids


def test_offset_layout_packs_references_as_written_out():
    # 1st (4x6): taller+0 > wider+0? 4 > 6 no -> below the (empty) covered box: row 0.
    # 2nd (4x2): 4 + 4 > 2 + 6? no -> below: row 4.  3rd (6x2): 6 + 8 > 2 + 6 -> right: col 6.
    assert rp.reference_placements((8, 8), [(4, 6), (4, 2), (6, 2)], "offset") == [
        (1, 0, 0), (1, 4, 0), (1, 0, 6)]
    assert rp.reference_placements((8, 8), [(4, 6), (2, 2)], "index") == [(1, 0, 0), (2, 0, 0)]
    assert rp.reference_placements((8, 8), [(4, 6), (2, 2)], "below") == [(0, 8, 0), (0, 12, 0)]

"""Masked Shared Attention kernel: key compaction equals SynCD's masked-bias attention."""
import math

import pytest
import torch

from multiref.kernels import msa

HEADS = 2


def masked_bias_reference(q, k, v, k_refs, v_refs, fg_refs, heads):
    """SynCD's form, written out: keys [own | every token of every reference], background
    reference keys get -inf, softmax per head, explicit matmuls in float64."""
    b, n, c = q.shape
    d = c // heads
    keys = torch.cat([k, k_refs.reshape(1, -1, c).expand(b, -1, -1)], 1).double()
    values = torch.cat([v, v_refs.reshape(1, -1, c).expand(b, -1, -1)], 1).double()
    allowed = torch.cat([torch.ones(n, dtype=torch.bool), fg_refs.reshape(-1)])
    bias = torch.zeros(allowed.shape, dtype=torch.float64).masked_fill(~allowed, -math.inf)
    out = torch.empty(b, n, c, dtype=torch.float64)
    for h in range(heads):
        sl = slice(h * d, (h + 1) * d)
        logits = q[..., sl].double() @ keys[..., sl].transpose(1, 2) / math.sqrt(d) + bias
        out[..., sl] = logits.softmax(-1) @ values[..., sl]
    return out.float()


def _rows(count, tokens, channels, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(count, tokens, channels, generator=gen) for _ in range(3)]


def _random_masks(refs, h, w, seed, kinds):
    gen = torch.Generator().manual_seed(seed)
    masks = (torch.rand(refs, h, w, generator=gen) < 0.4).float()
    for i, kind in enumerate(kinds):
        if kind == "empty":
            masks[i] = 0
        elif kind == "full":
            masks[i] = 1
    return masks


@pytest.mark.parametrize("kinds", [("random",), ("empty",), ("full",),
                                   ("random", "empty", "full"), ("random", "random", "random")])
def test_compacted_equals_masked_bias(kinds):
    h, w, c = 6, 5, 16
    q, k, v = _rows(2, h * w, c, seed=0)
    _, k_refs, v_refs = _rows(len(kinds), h * w, c, seed=1)
    fg = msa.resize_masks(_random_masks(len(kinds), h, w, 2, kinds), h, w)
    index = msa.foreground_index(fg)
    out = msa.shared_attention(q, k, v, msa.gather_foreground(k_refs, index),
                               msa.gather_foreground(v_refs, index), HEADS)
    expected = masked_bias_reference(q, k, v, k_refs, v_refs, fg, HEADS)
    assert (out - expected).abs().max() < 1e-5
    assert index.numel() == int(fg.sum())


def test_reference_weight_counts_each_token_weight_times():
    """Weight 2 on reference B equals B's foreground tokens listed twice (no bias); weights of
    1 give no bias at all (the unbiased fused attention)."""
    h, w, c = 4, 5, 16
    q, k, v = _rows(2, h * w, c, seed=5)
    _, k_refs, v_refs = _rows(2, h * w, c, seed=6)
    fg = msa.resize_masks(_random_masks(2, h, w, 7, ("random", "random")), h, w)
    index = msa.foreground_index(fg)
    bias = msa.reference_bias(torch.tensor([1.0, 2.0]), h * w, index)
    out = msa.shared_attention(q, k, v, msa.gather_foreground(k_refs, index),
                               msa.gather_foreground(v_refs, index), HEADS, bias)
    again = msa.foreground_index(fg[1:])
    twice_k = torch.cat([msa.gather_foreground(k_refs, index), msa.gather_foreground(k_refs[1:], again)])
    twice_v = torch.cat([msa.gather_foreground(v_refs, index), msa.gather_foreground(v_refs[1:], again)])
    expected = msa.shared_attention(q, k, v, twice_k, twice_v, HEADS)
    assert (out - expected).abs().max() < 1e-5
    assert msa.reference_bias(torch.ones(2), h * w, index) is None


def syncd_additive_mask_reference(q, k, v, k_refs, v_refs, values, row_weights, heads):
    """SynCD's soft masks, written out as its attention processor builds them: the mask is added
    to the logits, its own tokens getting 1, a reference token its value m, a token of value 0
    masked out; a reference weight w adds log w. Explicit float64 matmuls."""
    b, n, c = q.shape
    d = c // heads
    keys = torch.cat([k, k_refs.reshape(1, -1, c).expand(b, -1, -1)], 1).double()
    vals = torch.cat([v, v_refs.reshape(1, -1, c).expand(b, -1, -1)], 1).double()
    token_weights = row_weights.double().repeat_interleave(values.shape[1])
    ref_bias = torch.where(values.reshape(-1) > 0,
                           values.reshape(-1).double() + token_weights.log(), -math.inf)
    bias = torch.cat([torch.ones(n, dtype=torch.float64), ref_bias])
    out = torch.empty(b, n, c, dtype=torch.float64)
    for h in range(heads):
        sl = slice(h * d, (h + 1) * d)
        logits = q[..., sl].double() @ keys[..., sl].transpose(1, 2) / math.sqrt(d) + bias
        out[..., sl] = logits.softmax(-1) @ vals[..., sl]
    return out.float()


def test_soft_mask_values_weigh_tokens_as_syncd_additive_mask():
    h, w, c = 4, 5, 16
    q, k, v = _rows(2, h * w, c, seed=8)
    _, k_refs, v_refs = _rows(2, h * w, c, seed=9)
    gen = torch.Generator().manual_seed(10)
    soft = torch.rand(2, 8, 10, generator=gen) * (torch.rand(2, 8, 10, generator=gen) < 0.6)
    values = msa.resize_mask_values(soft, h, w)
    index = msa.foreground_index(values > 0)
    weights = torch.tensor([1.0, 2.5])
    bias = msa.reference_bias(weights, h * w, index, values.flatten())
    out = msa.shared_attention(q, k, v, msa.gather_foreground(k_refs, index),
                               msa.gather_foreground(v_refs, index), HEADS, bias)
    expected = syncd_additive_mask_reference(q, k, v, k_refs, v_refs, values, weights, HEADS)
    assert (out - expected).abs().max() < 1e-5
    # Binary values add nothing: the unbiased fused attention, as without values.
    binary = (values > 0.5).float()
    index = msa.foreground_index(binary > 0)
    assert msa.reference_bias(torch.ones(2), h * w, index, binary.flatten()) is None


def test_empty_foreground_is_plain_attention():
    q, k, v = _rows(2, 12, 16, seed=3)
    empty = torch.zeros(0, 16)
    out = msa.shared_attention(q, k, v, empty, empty, HEADS)
    plain = masked_bias_reference(q, k, v, torch.zeros(0, 12, 16), torch.zeros(0, 12, 16),
                                  torch.zeros(0, 12, dtype=torch.bool), HEADS)
    assert (out - plain).abs().max() < 1e-5


def test_batch_mode_each_image_reads_the_others_foreground():
    h, w, c = 4, 3, 16
    q, k, v = _rows(3, h * w, c, seed=4)
    fg = msa.resize_masks(_random_masks(3, h, w, 5, ("random", "empty", "full")), h, w)
    out = msa.batch_shared_attention(q, k, v, fg, HEADS)
    for i in range(3):
        others = [j for j in range(3) if j != i]
        expected = masked_bias_reference(q[i:i + 1], k[i:i + 1], v[i:i + 1], k[others],
                                         v[others], fg[others], HEADS)
        assert (out[i:i + 1] - expected).abs().max() < 1e-5


def test_resize_masks_is_nearest_for_any_size():
    gen = torch.Generator().manual_seed(6)
    masks = (torch.rand(2, 9, 13, generator=gen) > 0.5).float()
    out = msa.resize_masks(masks, 5, 7).view(2, 5, 7)
    for y in range(5):
        for x in range(7):  # nearest: source index floor(dst * in / out)
            assert torch.equal(out[:, y, x], masks[:, (y * 9) // 5, (x * 13) // 7] > 0.5)


def test_blend_strength_zero_returns_the_plain_tensor_itself():
    plain, shared = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    assert msa.blend(plain, shared, 0.0) is plain
    assert msa.blend(plain, shared, 1.0) is shared
    assert torch.allclose(msa.blend(plain, shared, 0.25), 0.75 * plain + 0.25 * shared)


def test_step_noise_is_fresh_per_step_and_reproducible():
    a, b = msa.step_noise((2, 4, 3, 3), 14.6), msa.step_noise((2, 4, 3, 3), 14.6)
    assert torch.equal(a, b)
    assert not torch.equal(a, msa.step_noise((2, 4, 3, 3), 9.7))


def test_fit_to_grid_resizes_latents_and_masks():
    latents, masks = torch.randn(2, 4, 8, 8), torch.zeros(2, 8, 8)
    masks[:, :4] = 1
    same = msa.fit_to_grid(latents, masks, 8, 8)
    assert same[0] is latents and same[1] is masks
    lat, m = msa.fit_to_grid(latents, masks, 4, 6)
    assert lat.shape == (2, 4, 4, 6) and m.shape == (2, 4, 6)
    assert torch.equal(m[:, :2], torch.ones(2, 2, 6)) and not m[:, 2:].any()


def _brute_force_otsu(values, candidates):
    """Between-class variance computed from the values themselves for every candidate cut."""
    best, best_cut = -1.0, None
    for cut in candidates:
        upper, lower = values[values >= cut], values[values < cut]
        if len(upper) == 0 or len(lower) == 0:
            continue
        score = len(lower) * len(upper) * (lower.mean() - upper.mean()) ** 2
        if score > best:
            best, best_cut = score, cut
    return best_cut


def test_otsu_matches_brute_force_on_histogram_values():
    gen = torch.Generator().manual_seed(8)
    bins = 16
    # Values on bin centers, so the histogram loses nothing and both methods see the same data.
    levels = torch.randint(0, bins, (200,), generator=gen).double()
    values = (levels + 0.5) / bins
    values = torch.cat([values, torch.tensor([0.0, 1.0], dtype=torch.float64)])
    cut = msa.otsu_threshold(values, bins)
    edges = [k / bins for k in range(1, bins)]
    assert abs(cut - _brute_force_otsu(values, edges)) < 1e-9


def test_phrase_masks_find_the_object_and_dilate():
    maps = torch.full((2, 8, 8), 0.01)
    maps[0, 2:4, 2:5] = 0.2
    maps[1, 6, 6] = 0.5
    maps += 0.001 * torch.rand(2, 8, 8, generator=torch.Generator().manual_seed(9))
    plain = msa.phrase_masks(maps, dilation=0)
    expected = torch.zeros(2, 8, 8)
    expected[0, 2:4, 2:5] = 1
    expected[1, 6, 6] = 1
    assert torch.equal(plain, expected)
    grown = msa.phrase_masks(maps, dilation=1)
    expected[0, 1:5, 1:6] = 1
    expected[1, 5:8, 5:8] = 1
    assert torch.equal(grown, expected)
    assert torch.equal(msa.phrase_masks(torch.ones(1, 3, 3)), torch.ones(1, 3, 3))

"""Routing math (kernels/routing.py) against slow, obvious implementations of
docs/ARCHITECTURE.md, Routing."""
import math

import pytest
import torch
import torch.nn.functional as F

from multiref.kernels import routing

HEADS, DIM_HEAD = 2, 4
WIDTH = HEADS * DIM_HEAD


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def slow_relevance(q, per_reference_keys, heads):
    """R_i(x) = mean over heads and phrase tokens of softmax over positions x, with loops."""
    b, length, width = q.shape
    d = width // heads
    out = torch.zeros(b, length, len(per_reference_keys), dtype=torch.float64)
    for row in range(b):
        for i, keys in enumerate(per_reference_keys):
            total = torch.zeros(length, dtype=torch.float64)
            for h in range(heads):
                for t in range(keys.shape[0]):
                    k = keys[t, h * d:(h + 1) * d].double()
                    scores = [float(k @ q[row, x, h * d:(h + 1) * d].double()) / math.sqrt(d)
                              for x in range(length)]
                    top = max(scores)
                    exps = [math.exp(s - top) for s in scores]
                    total += torch.tensor(exps, dtype=torch.float64) / sum(exps)
            out[row, :, i] = total / (heads * keys.shape[0])
    return out


def plain_ip_attention(q, k, v, heads):
    """Plain IP-Adapter image attention of one reference: SDPA over that reference's tokens."""
    b, length, width = q.shape
    split = lambda x: x.view(b, x.shape[1], heads, width // heads).transpose(1, 2)
    out = F.scaled_dot_product_attention(split(q), split(k), split(v))
    return out.transpose(1, 2).reshape(b, length, width)


def slow_routed(q, text_out, heads, refs, scale, per_reference_keys=None, text_to_weight=None):
    """docs/ARCHITECTURE.md, Routing, written out reference by reference: refs = [(k_ip, v_ip,
    w_i)]."""
    out = text_out.double().clone()
    if per_reference_keys is not None:
        relevance = slow_relevance(q, per_reference_keys, heads)
        weights = relevance / relevance.sum(-1, keepdim=True)
        if text_to_weight is not None:
            gate = torch.sigmoid(text_out.double() @ text_to_weight.double().T)
            weights = weights * gate / gate.mean(dim=1, keepdim=True)
    for i, (k, v, w) in enumerate(refs):
        o = plain_ip_attention(q.double(), k.double(), v.double(), heads)
        spatial = weights[..., i:i + 1] if per_reference_keys is not None else 1.0
        out = out + scale * w * spatial * o
    return out


def _pad(tokens_list):
    """(B, n_i, C) per reference -> (B, N, n_max, C) and the token counts."""
    counts = [t.shape[1] for t in tokens_list]
    padded = torch.zeros(tokens_list[0].shape[0], len(counts), max(counts), tokens_list[0].shape[2])
    for i, t in enumerate(tokens_list):
        padded[:, i, :t.shape[1]] = t
    return padded, counts


def _case(seed, b=2, length=12, counts=(4, 8, 4), phrase_lengths=(1, 2, 3)):
    g = _gen(seed)
    q = torch.randn(b, length, WIDTH, generator=g)
    text_out = torch.randn(b, length, WIDTH, generator=g)
    ks = [torch.randn(b, n, WIDTH, generator=g) for n in counts]
    vs = [torch.randn(b, n, WIDTH, generator=g) for n in counts]
    phrase = [torch.randn(p, WIDTH, generator=g) for p in phrase_lengths]
    return q, text_out, ks, vs, phrase


def test_relevance_maps_equal_slow_loops():
    q, _, _, _, phrase = _case(0, length=15)
    fast = routing.relevance_maps(q, routing.phrase_keys(phrase), HEADS)
    slow = slow_relevance(q, phrase, HEADS)
    assert fast.dtype == torch.float32
    torch.testing.assert_close(fast.double(), slow, atol=1e-6, rtol=1e-5)
    # A softmax over positions: every map sums to one over the layer.
    torch.testing.assert_close(fast.sum(1), torch.ones(2, 3), atol=1e-5, rtol=0)


def test_relevance_maps_with_keys_per_row_equal_each_row_on_its_own():
    """Row 0 reads the phrases' keys, row 1 other keys of the same token counts (MIP-Adapter's
    uncond rows: the empty prompt at the phrases' positions)."""
    q, _, _, _, phrase = _case(2, length=15)
    other = [torch.randn(p.shape, generator=_gen(9)) for p in phrase]
    first, second = routing.phrase_keys(phrase), routing.phrase_keys(other)
    per_row = routing.PhraseKeys(torch.stack([first.keys, second.keys]), first.average)
    fast = routing.relevance_maps(q, per_row, HEADS)
    torch.testing.assert_close(fast[0:1].double(), slow_relevance(q[0:1], phrase, HEADS), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(fast[1:2].double(), slow_relevance(q[1:2], other, HEADS), atol=1e-6, rtol=1e-5)


def test_weighted_with_learned_gate_equals_slow_formula():
    q, text_out, ks, vs, phrase = _case(1)
    u = torch.randn(1, WIDTH, generator=_gen(7))
    weights = torch.tensor([1.0, 0.5, 0.8])
    k, counts = _pad(ks)
    v, _ = _pad(vs)
    fast, shown = routing.routed_cross_attention(
        q, text_out, HEADS, k, v, weights, 0.7, "weighted", phrases=routing.phrase_keys(phrase),
        text_to_weight=u, token_counts=counts)
    slow = slow_routed(q, text_out, HEADS, list(zip(ks, vs, weights.tolist())), 0.7, phrase, u)
    torch.testing.assert_close(fast.double(), slow, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(shown.sum(-1), torch.ones(2, 12), atol=1e-5, rtol=0)


def test_one_reference_weighted_equals_plain_ip_adapter():
    q, text_out, ks, vs, phrase = _case(2, counts=(16,), phrase_lengths=(2,))
    out, _ = routing.routed_cross_attention(
        q, text_out, HEADS, ks[0][:, None], vs[0][:, None], torch.ones(1), 0.6, "weighted",
        phrases=routing.phrase_keys(phrase))
    plain = text_out + 0.6 * plain_ip_attention(q, ks[0], vs[0], HEADS)
    torch.testing.assert_close(out, plain, atol=1e-6, rtol=1e-5)


def test_sum_equals_plain_ip_adapter_with_every_reference_added():
    q, text_out, ks, vs, _ = _case(3, counts=(16, 32, 16))
    k, counts = _pad(ks)
    v, _ = _pad(vs)
    out, shown = routing.routed_cross_attention(q, text_out, HEADS, k, v, torch.ones(3), 0.8,
                                                "sum", token_counts=counts)
    plain = text_out.clone()
    for ki, vi in zip(ks, vs):
        plain = plain + 0.8 * plain_ip_attention(q, ki, vi, HEADS)
    assert shown is None
    torch.testing.assert_close(out, plain, atol=1e-6, rtol=1e-5)


def test_mask_mode_zero_is_no_adapter_and_one_is_full_strength():
    q, text_out, ks, vs, _ = _case(4, length=12, counts=(4, 4, 4))
    k, v = torch.stack(ks, 1), torch.stack(vs, 1)
    grid = (3, 4)
    zeros = torch.zeros(3, 30, 40)
    off, _ = routing.routed_cross_attention(q, text_out, HEADS, k, v, torch.ones(3), 1.0, "mask",
                                            masks=zeros, grid=grid)
    assert torch.equal(off, text_out)
    full, shown = routing.routed_cross_attention(q, text_out, HEADS, k, v, torch.ones(3), 1.0,
                                                 "mask", masks=torch.ones(3, 30, 40), grid=grid)
    summed, _ = routing.routed_cross_attention(q, text_out, HEADS, k, v, torch.ones(3), 1.0, "sum")
    assert torch.equal(shown, torch.ones(12, 3))
    assert torch.equal(full, summed)
    # Half a mask: the left half of the layer gets the reference, the right half does not.
    half = torch.zeros(1, 30, 40)
    half[:, :, :20] = 1
    out, _ = routing.routed_cross_attention(q, text_out, HEADS, k[:, :1], v[:, :1], torch.ones(1),
                                            1.0, "mask", masks=half, grid=grid)
    left = torch.arange(12) % 4 < 2
    assert torch.equal(out[:, ~left], text_out[:, ~left])
    plain = text_out + plain_ip_attention(q, ks[0], vs[0], HEADS)
    torch.testing.assert_close(out[:, left], plain[:, left], atol=1e-6, rtol=1e-5)


def _left_right_case(height=6, width=10, seed=5):
    """Phrase A's keys point along the queries of the left half, phrase B's along the right."""
    g = _gen(seed)
    d = 8
    a, b = torch.zeros(d), torch.zeros(d)
    a[0], b[1] = 1.0, 1.0
    left = (torch.arange(height * width) % width) < width // 2
    direction = torch.where(left[:, None], a, b)
    q = (3.0 * direction + 0.3 * torch.randn(height * width, d, generator=g)).repeat(1, 2)[None]
    keys_a, keys_b = (3.0 * a).repeat(2)[None], (3.0 * b).repeat(2)[None]
    k = torch.randn(1, 2, 16, 2 * d, generator=g)
    v = torch.randn(1, 2, 16, 2 * d, generator=g)
    return q, [keys_a, keys_b], k, v, left


def _share_in_left(mode, q, phrase, k, v, left):
    """Fraction of reference A's contribution (magnitude) that lands in the left half."""
    zero_text = torch.zeros_like(q)
    out, _ = routing.routed_cross_attention(
        q, zero_text, 2, k, v, torch.tensor([1.0, 0.0]), 1.0, mode,
        phrases=routing.phrase_keys(phrase) if mode == "weighted" else None)
    magnitude = out[0].norm(dim=-1)
    return float(magnitude[left].sum() / magnitude.sum())


def test_constructed_left_right_case_routes_reference_a_left():
    q, phrase, k, v, left = _left_right_case()
    weighted = _share_in_left("weighted", q, phrase, k, v, left)
    summed = _share_in_left("sum", q, phrase, k, v, left)
    print(f"routing precision (reference A in the left half): weighted {weighted:.3f}, "
          f"sum {summed:.3f}")
    assert weighted >= 0.90
    assert 0.40 <= summed <= 0.60


def test_layer_grid_uses_real_height_and_width():
    assert routing.layer_grid((6, 10), 60) == (6, 10)
    assert routing.layer_grid((6, 10), 15) == (3, 5)
    assert routing.layer_grid((6, 10), 6) == (2, 3)
    assert routing.layer_grid((128, 72), 32 * 18) == (32, 18)
    with pytest.raises(routing.RoutingInputError, match="latent"):
        routing.layer_grid((6, 10), 16)


def test_maps_are_detached_unless_training_asks():
    q, text_out, ks, vs, phrase = _case(6)
    q.requires_grad_(True)
    k, v = torch.stack([ks[0], ks[2]], 1), torch.stack([vs[0], vs[2]], 1)
    phrases = routing.phrase_keys([phrase[0], phrase[1]])
    _, shown = routing.routed_cross_attention(q, text_out, HEADS, k, v, torch.ones(2), 1.0,
                                              "weighted", phrases=phrases)
    assert not shown.requires_grad
    _, shown = routing.routed_cross_attention(q, text_out, HEADS, k, v, torch.ones(2), 1.0,
                                              "weighted", phrases=phrases, keep_grad=True)
    shown[..., 0].sum().backward()
    assert q.grad is not None and q.grad.abs().sum() > 0


def test_unknown_mode_and_empty_phrase_are_refused():
    q, text_out, ks, vs, phrase = _case(8)
    with pytest.raises(routing.RoutingInputError, match="mode"):
        routing.routed_cross_attention(q, text_out, HEADS, torch.stack(ks[:1], 1),
                                       torch.stack(vs[:1], 1), torch.ones(1), 1.0, "blend")
    with pytest.raises(routing.RoutingInputError, match="phrase"):
        routing.phrase_keys([phrase[0], torch.zeros(0, WIDTH)])

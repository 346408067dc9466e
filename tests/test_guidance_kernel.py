"""Normalized guidance math (docs/ARCHITECTURE.md, Normalized guidance) against a slow
per-sample transcription."""
import math

import pytest
import torch

from multiref.kernels import guidance


def _norm(t):
    return math.sqrt(sum(float(v) ** 2 for v in t.reshape(-1).tolist()))


def _factor(own, smallest):
    return 1.0 if own == 0 else min(1.0, smallest / own)


def reference_normalized(u, i, f, s_t, s_i):
    """Eq. 4 written out sample by sample, in float64 Python arithmetic for the norms."""
    rows = []
    for ub, ib, fb in zip(u.double(), i.double(), f.double()):
        d_img, d_txt = ib - ub, fb - ib
        n_img, n_txt = _norm(d_img), _norm(d_txt)
        m = min(n_img, n_txt)
        rows.append(ib + s_i * _factor(n_img, m) * d_img + s_t * _factor(n_txt, m) * d_txt)
    return torch.stack(rows).to(u.dtype)


def _branches(seed, shape=(3, 4, 5, 6)):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) for _ in range(3)]


def test_matches_transcription_with_either_vector_smaller():
    u, i, f = _branches(0)
    # Sample 0: image guidance small; sample 1: text guidance small; sample 2: as drawn.
    i[0] = u[0] + 0.05 * (i[0] - u[0])
    f[1] = i[1] + 0.05 * (f[1] - i[1])
    n_img = guidance.per_sample_norm(i - u).flatten()
    n_txt = guidance.per_sample_norm(f - i).flatten()
    assert n_img[0] < n_txt[0] and n_txt[1] < n_img[1]
    out = guidance.normalized_guidance(u, i, f, 7.5, 8.0)
    torch.testing.assert_close(out, reference_normalized(u, i, f, 7.5, 8.0), rtol=1e-5, atol=1e-5)
    # After the rescale both vectors have the smaller norm, so the guided step is bounded.
    step = guidance.per_sample_norm(out - i).flatten()
    assert torch.all(step <= (7.5 + 8.0) * torch.minimum(n_img, n_txt) * (1 + 1e-5))


@pytest.mark.parametrize("zero", ["image", "text", "both"])
def test_zero_guidance_vector_is_safe(zero):
    u, i, f = _branches(1)
    if zero in ("image", "both"):
        i = u.clone()
    if zero in ("text", "both"):
        f = i.clone()
    out = guidance.normalized_guidance(u, i, f, 5.0, 3.0)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, reference_normalized(u, i, f, 5.0, 3.0))
    # m = 0: both vectors vanish, only the image-only prediction is left.
    torch.testing.assert_close(out, i)


def test_normalize_off_is_plain_three_branch():
    u, i, f = _branches(2)
    s_t, s_i = 6.0, 4.0
    # InstructPix2Pix form with base u: u + (1 + s_I)(i - u) + s_T (f - i) is the same thing.
    expected = u + (1 + s_i) * (i - u) + s_t * (f - i)
    torch.testing.assert_close(guidance.plain_three_branch_guidance(u, i, f, s_t, s_i), expected,
                               rtol=1e-5, atol=1e-5)
    # Normalization only changes something when the norms differ: equal norms, equal results.
    d_txt = (f - i) * guidance.per_sample_norm(i - u) / guidance.per_sample_norm(f - i)
    f_equal = i + d_txt
    torch.testing.assert_close(guidance.normalized_guidance(u, i, f_equal, s_t, s_i),
                               guidance.plain_three_branch_guidance(u, i, f_equal, s_t, s_i),
                               rtol=1e-5, atol=1e-5)


def test_image_scale_zero_without_image_condition_is_two_branch_cfg():
    u, _, f = _branches(3)
    plain = guidance.plain_three_branch_guidance(u, u, f, 7.0, 0.0)
    torch.testing.assert_close(plain, u + 7.0 * (f - u))
    torch.testing.assert_close(guidance.two_branch_guidance(u, f, 7.0, normalize=False), plain)


def test_two_branch_normalized_caps_the_norm_at_the_prompt_prediction():
    u, _, f = _branches(4)
    f[2] = u[2] + 1e-3 * (f[2] - u[2])  # a sample whose guided prediction stays small
    out = guidance.two_branch_guidance(u, f, 9.0, normalize=True)
    for b in range(3):
        guided = u[b] + 9.0 * (f[b] - u[b])
        factor = min(1.0, _norm(f[b]) / _norm(guided))
        torch.testing.assert_close(out[b], guided * factor)
    assert _norm(out[0]) == pytest.approx(_norm(f[0]), rel=1e-5)
    zero = torch.zeros_like(u)
    assert torch.equal(guidance.two_branch_guidance(zero, zero, 9.0, normalize=True), zero)


def test_progress_runs_over_the_schedule_and_the_ramp_follows():
    sigmas = torch.tensor([10.0, 6.0, 3.0, 1.0, 0.5, 0.0])  # 5 steps
    assert [guidance.sampling_progress(float(s), sigmas) for s in sigmas[:-1]] == [0, .25, .5, .75, 1]
    # Between two steps (second stage of a two-stage sampler): linear in sigma.
    assert guidance.sampling_progress(4.5, sigmas) == pytest.approx(0.25 + 0.25 * 0.5)
    assert guidance.sampling_progress(11.0, sigmas) == 0.0
    assert guidance.sampling_progress(0.1, sigmas) == 1.0
    assert guidance.sampling_progress(3.0, torch.tensor([3.0, 0.0])) == 0.0  # one step
    assert guidance.image_scale_at(0.5, 8.0, 5.0) == 10.5
    assert guidance.image_scale_at(1.0, 2.0, -5.0) == 0.0  # never negative

"""Normalized text/image guidance (SynCD eq. 4; docs/ARCHITECTURE.md, Normalized guidance).
Plain torch; no host import.

Three predictions per step: u (negative text, no image condition), i (negative text + image
condition), f (prompt + image condition). The image guidance d_img = i - u and the text guidance
d_txt = f - i are each shrunk to the smaller of the two per-sample L2 norms, so neither can grow
past the other at high scales (what burns colors with plain three-branch CFG).

Every function works on whatever prediction the caller hands it (noise, velocity or denoised
image): differences of denoised predictions are the raw differences times one per-sample factor,
so the min-norm factors come out the same in either space.
"""
import torch


def per_sample_norm(x):
    """L2 norm over all non-batch dims, shaped (B, 1, 1, ...) to broadcast against x."""
    return x.flatten(1).norm(dim=1).reshape((-1,) + (1,) * (x.ndim - 1))


def capped(vector, norm, cap):
    """vector * min(1, cap / norm); a zero vector stays zero (no 0/0)."""
    factor = torch.where(norm > 0, cap / norm.clamp_min(torch.finfo(norm.dtype).tiny), 1.0)
    return vector * factor.clamp(max=1.0)


def min_norm_rescale(d_img, d_txt):
    """Both guidance vectors scaled to at most the smaller one's norm, per sample."""
    n_img, n_txt = per_sample_norm(d_img), per_sample_norm(d_txt)
    m = torch.minimum(n_img, n_txt)
    return capped(d_img, n_img, m), capped(d_txt, n_txt, m)


def normalized_guidance(u, i, f, text_scale, image_scale):
    """SynCD eq. 4: i + s_I * d_img + s_T * d_txt with min-norm rescaled guidance vectors."""
    d_img, d_txt = min_norm_rescale(i - u, f - i)
    return i + image_scale * d_img + text_scale * d_txt


def plain_three_branch_guidance(u, i, f, text_scale, image_scale):
    """The same combination without the rescale (InstructPix2Pix-style, base i)."""
    return i + image_scale * (i - u) + text_scale * (f - i)


# Relative size of i - u below which the image branch counts as equal to uncond: the two rows
# then hold the same inputs, and only the batch position (a different GEMM tile on some CPUs)
# can leave a last-bit difference between them.
SAME_PREDICTION_TOLERANCE = 1e-5


def lacks_image_condition(u, i):
    """(B, 1, ...) True where the image-only prediction equals uncond (to the tolerance above):
    no image condition acts on that sample at this step."""
    return per_sample_norm(i - u) <= SAME_PREDICTION_TOLERANCE * per_sample_norm(u)


def two_branch_guidance(u, f, scale, normalize):
    """CFG for any model: u + s * (f - u). Normalized, the guided prediction's per-sample norm is
    capped at the conditional prediction's norm: one guidance vector has no partner to be
    compared with, so the prediction itself is kept from outgrowing what the prompt asked for."""
    guided = u + scale * (f - u)
    if not normalize:
        return guided
    return capped(guided, per_sample_norm(guided), per_sample_norm(f))


def sampling_progress(sigma, sigmas):
    """0 at the first step of the schedule `sigmas` (descending, last entry the end), 1 at the
    last step; linear in sigma between two steps (samplers that call the model mid-step)."""
    starts = [float(s) for s in sigmas[:-1]]
    if len(starts) <= 1 or sigma >= starts[0]:
        return 0.0
    for step in range(len(starts) - 1):
        high, low = starts[step], starts[step + 1]
        if low <= sigma <= high:
            within = (high - sigma) / (high - low) if high > low else 0.0
            return (step + within) / (len(starts) - 1)
    return 1.0


RAMPS = ("steps", "timestep")
TRAIN_TIMESTEPS = 1000  # SynCD's _get_image_adapter_scale divides by 1000


def timestep_progress(timestep):
    """SynCD's ramp variable (1000 - t) / 1000 of the model's discrete timestep t (999 at the
    noisiest level): it depends on the noise level, not on the number of steps."""
    return (TRAIN_TIMESTEPS - timestep) / TRAIN_TIMESTEPS


def image_scale_at(progress, image_scale, ramp):
    """Adaptive image scale s_I = s_I0 + a * progress, never below 0 (SynCD's schedule)."""
    return max(0.0, image_scale + ramp * progress)

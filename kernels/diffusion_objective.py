"""The denoising objective in the model's own parameterization, and condition dropout.

The host's samplers see a model as a denoiser D(x, sigma) = a(sigma) * x + b(sigma) * out, where
`out` is the network's raw output (eps for eps-prediction, v for v-prediction) and a, b come from
the model's parameterization. With x = clean + sigma * noise, the network's own target satisfies
clean = a * x + b * target, so
    out - target = (D - clean) / b.
The loss mean(((D - clean) / b)^2) is therefore exactly the eps-MSE of an eps model
(b = -sigma) and the v-MSE of a v model (b = -sigma / sqrt(sigma^2 + 1)), computed from the
denoised output and b alone: one formula for every parameterization.
"""
import torch


def parameterization_loss(denoised, clean, output_scale):
    """Mean squared error of the raw network output against its own target, per sample.
    denoised, clean: (B, C, H, W); output_scale: (B,) the b(sigma) of each sample."""
    b = output_scale.reshape(-1, *([1] * (denoised.ndim - 1))).to(denoised.dtype)
    return ((denoised - clean) / b).pow(2).flatten(1).mean(dim=1)


def condition_dropout(u, text_p, image_p, both_p):
    """Which conditions one group loses, from one uniform draw u in [0, 1): text only with
    probability text_p, image only with image_p, both with both_p (MIP/SynCD use 5% each).
    Returns (drop_text, drop_image)."""
    if min(text_p, image_p, both_p) < 0 or text_p + image_p + both_p > 1:
        raise ValueError(f"condition dropout probabilities ({text_p}, {image_p}, {both_p}) must "
                         "be >= 0 and sum to at most 1")
    if u < text_p:
        return True, False
    if u < text_p + image_p:
        return False, True
    if u < text_p + image_p + both_p:
        return True, True
    return False, False


def output_scale_of(calculate_denoised, sigma, like):
    """b(sigma) of a parameterization given its calculate_denoised(sigma, out, x) function:
    D(out=1, x=0). `like` gives the per-sample shape, dtype and device."""
    ones = torch.ones_like(like)
    return calculate_denoised(sigma, ones, torch.zeros_like(like)).flatten(1)[:, 0]


def euler_sample(denoise, noise, sigmas):
    """The plain Euler sampler (training previews): x_0 = noise * sigmas[0], then
    x <- x + (x - D(x, s)) / s * (s_next - s) down the decreasing `sigmas` (last one 0).
    denoise(x, sigma (B,)) -> D; returns the final x."""
    x = noise * sigmas[0]
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        s = sigma.reshape(1).expand(x.shape[0])
        x = x + (x - denoise(x, s)) / sigma * (sigma_next - sigma)
    return x

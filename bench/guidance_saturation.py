"""Normalized guidance benchmark (docs/ARCHITECTURE.md, Normalized guidance; Performance
targets): prints, in one run,

1. over-saturation table on a fixed tiny setup (the tiny SD1.5-like model driven by an exact
   Gaussian denoiser per branch, see GaussianConditions; the real guider and sampler): for image
   scales 2..12, plain three-branch guidance vs. normalized (SynCD eq. 4): mean |x| and
   per-channel mean of the final denoised latent, and the raw norm ratio |d_img| / |d_txt|
   averaged over the steps;
2. with CUDA (or --sdxl): the time of one three-branch step (batch 3, one call) vs. a two-branch
   CFG step (the host's CFGGuider, batch 2) on an SDXL-shaped UNet (the host's UNetModel with the
   SDXL configuration, random fp16 weights) at 1024px (128x128 latent), and their ratio. On a CPU
   --sdxl runs it in fp32 (--resolution 256 --timing-steps 1 for a smoke run of that code).

Part 2 uses random weights: it measures time, not images.

Run from the pack folder:  python -m bench.guidance_saturation  [--steps N] [--sdxl]
    [--resolution N] [--timing-steps N]
"""
import argparse
import datetime

import torch

from bench import common
from bench.common import boot_pack

IMAGE_SCALES = (2.0, 4.0, 6.0, 8.0, 10.0, 12.0)
TEXT_SCALE = 7.5
LATENT = (1, 4, 8, 8)  # the saturation runs' latent: tiny, the denoiser is exact


class GaussianConditions:
    """A denoiser with a known answer, installed as the UNet function wrapper of the tiny model
    (the UNet itself is not run: random weights do not denoise, so their final latent would be
    leftover noise). The data of each branch is Gaussian around its own mean: uncond around U,
    image-only around U + image offset (per channel: the reference's colors), full around that
    plus a text pattern. The exact denoiser is x0 = mean + s^2 / (s^2 + sigma^2) * (x - mean).
    The image condition moves the prediction more than the text does, as a strong reference
    does, so plain guidance drifts with the image scale: burnt colors."""

    def __init__(self, patching, shape, std=0.5):
        gen = torch.Generator().manual_seed(0)
        uncond = 0.5 * torch.randn(shape, generator=gen)
        image = uncond + torch.tensor([0.6, -0.4, 0.3, 0.1]).view(-1, 1, 1)
        full = image + 0.15 * torch.randn(shape, generator=gen)
        self.means = {"uncond": uncond, "image": image, "full": full}
        self.variance = std ** 2
        self.patching = patching
        self.ratios = []

    def __call__(self, apply_model, args):
        x, sigma = args["input"], args["timestep"]
        options = args["c"].get("transformer_options", {})
        roles = self.patching.roles_from_chunks(
            args["cond_or_uncond"], options.get(self.patching.BRANCHES_KEY,
                                                self.patching.DEFAULT_BRANCHES), x.shape[0])
        means = torch.stack([self.means[role] for role in roles]).to(x)
        shrink = (self.variance / (self.variance + sigma ** 2)).view(-1, 1, 1, 1)
        out = means + shrink * (x - means)
        if set(roles) == {"full", "image", "uncond"}:
            by_role = {role: out[roles.index(role)] for role in roles}
            self.ratios.append(float((by_role["image"] - by_role["uncond"]).norm()
                                     / (by_role["full"] - by_role["image"]).norm()))
        return out


def saturation_runner(pack, steps):
    """The fixed tiny setup of the over-saturation table; returns run(image_scale, normalize)
    -> (final latent in the model's latent space, mean |d_img| / |d_txt| over the steps, the
    GaussianConditions it ran with)."""
    import comfy.samplers
    guidance_nodes, patching = pack("nodes.guidance"), pack("families.unet")
    model = pack("families.tiny_models").tiny_unet("sd15", seed=0)
    latent = LATENT
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn(latent, generator=gen)
    context = torch.zeros(1, 77, pack("families.tiny_models").SD15_CONTEXT)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", steps)

    def run(image_scale, normalize):
        toy = GaussianConditions(patching, latent[1:])
        wrapped = model.clone()
        wrapped.set_model_unet_function_wrapper(toy)
        guider = guidance_nodes.MultiRefGuider(wrapped, TEXT_SCALE, image_scale, 0.0, normalize,
                                               guidance_nodes.THREE_BRANCH)
        guider.set_conds([[context, {}]], [[context, {}]])
        out = guider.sample(noise, torch.zeros(latent), comfy.samplers.sampler_object("euler"),
                            sigmas, disable_pbar=True, seed=0)
        # Back to the model's latent space (the sampler returns it scaled for the VAE).
        return model.model.process_latent_in(out), sum(toy.ratios) / len(toy.ratios), toy

    return run


def saturation_table(pack, steps):
    run = saturation_runner(pack, steps)
    latent = LATENT

    def row(name, x, ratio=None):
        channels = " ".join(f"{float(c):+6.2f}" for c in x.mean(dim=(-2, -1)).reshape(-1))
        tail = "" if ratio is None else f"  {ratio:7.3f}"
        return f"{float(x.abs().mean()):7.3f}  {channels}{tail}"

    _, _, toy = run(1.0, True)
    print(f"\nover-saturation: exact Gaussian denoiser on the tiny SD1.5-like model, euler, "
          f"{steps} steps, text scale {TEXT_SCALE}, latent {latent[2]}x{latent[3]}, scales 2..12")
    print(f"prompt-conditioned data mean (what unguided sampling of the full branch gives): "
          f"{row('full', toy.means['full'])}")
    print("image | plain three-branch                         | normalized (eq. 4)")
    print("scale | mean|x|  channel means            |di|/|dt| | mean|x|  channel means            |di|/|dt|")
    for image_scale in IMAGE_SCALES:
        cells = [row("", *run(image_scale, normalize)[:2]) for normalize in (False, True)]
        print(f"{image_scale:5.1f} | {cells[0]} | {cells[1]}")


def step_timing(setup, pack, steps):
    """One three-branch step vs. a two-branch CFG step, SDXL-shaped UNet (fp16, 1024px on CUDA)."""
    import comfy.samplers
    guidance_nodes = pack("nodes.guidance")
    model = setup.unet(pack)
    positive, negative, noise = setup.sampling_inputs(pack, torch.Generator().manual_seed(0))
    sampling = model.get_model_object("model_sampling")

    def per_step(guider):
        run = lambda n: guider.sample(noise, torch.zeros_like(noise),
                                      comfy.samplers.sampler_object("euler"),
                                      comfy.samplers.calculate_sigmas(sampling, "normal", n),
                                      disable_pbar=True, seed=0)
        return setup.per_step(run, steps)

    two = comfy.samplers.CFGGuider(model)
    two.set_conds(positive, negative)
    two.set_cfg(TEXT_SCALE)
    # Image scale > 0: every step runs the three branches in one batch-3 call. The model has no
    # image condition here (the guider then logs that it falls back to text-only CFG); the
    # compute per step is the same as with one.
    three = guidance_nodes.MultiRefGuider(model, TEXT_SCALE, 8.0, 0.0, True,
                                          guidance_nodes.THREE_BRANCH)
    three.set_conds(positive, negative)
    two_ms, three_ms = per_step(two) * 1e3, per_step(three) * 1e3
    (h, w), side = setup.latent, setup.resolution
    print(f"\nstep time, {setup.model_label()}, {side}x{side} (latent {h}x{w}), euler, "
          f"{steps} steps:"
          f"\n  two-branch CFG (host CFGGuider, batch 2): {two_ms:.1f} ms/step"
          f"\n  three-branch normalized (one batch-3 call): {three_ms:.1f} ms/step"
          f"\n  ratio three/two: {three_ms / two_ms:.3f} (target <= 1.10)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="steps of the saturation runs")
    parser.add_argument("--timing-steps", type=int, default=10,
                        help="timed steps (CUDA, or CPU with --sdxl)")
    common.add_setup_options(parser)
    args = parser.parse_args()
    setup = common.setup(parser, args)
    print(f"guidance benchmark, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} "
          f"UTC, {setup.describe()}")
    pack = boot_pack()
    saturation_table(pack, args.steps)
    if setup.sdxl:
        step_timing(setup, pack, args.timing_steps)
    else:
        print("\nstep timing skipped: no CUDA device. The three-branch vs. two-branch step ratio "
              "is measured on a GPU (SDXL-shaped UNet, 1024px); run this script there (--sdxl "
              "runs it on this CPU in fp32, as a smoke run).")


if __name__ == "__main__":
    main()

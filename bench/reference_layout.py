"""The trainer's reference layout: SynCD's detached reference pass (the K reference rows in their
own UNet call without gradient, then the target row with it) against reference rows riding in
the target's batch (one call of 1 + K rows, the sampling layout). Both compute the same reference
features (the references never read the target); what differs is what autograd keeps: inside
one batched call it saves every row's activations for the backward, the reference rows'
included, although no gradient needs them.

    python -m bench.reference_layout            # CUDA: the SDXL-shaped UNet, bf16, 1024px
    python -m bench.reference_layout --refs 2   # CPU: the tiny SDXL-like UNet at 256px

Run it on a current ComfyUI (COMFYUI_PATH=/path/to/ComfyUI): the installable host adds the
attention outputs in place, which autograd refuses (the trainer patches that; this measures the
model's own calls).

Prints, per layout, the bytes autograd keeps for backward (the weights left out, as in
bench.train_memory) and the time of a forward + backward, and their ratios in one run.
"""
import argparse
import contextlib
import os
import sys

import torch

from bench import common
from bench.common import boot_pack
from bench.train_memory import saved_bytes


def step(model, target, refs, sigma, context, adm, layout):
    """One forward + backward of the target row's loss; the reference rows in their own call
    without gradient ('detached') or in the target's call ('rows'). Returns the loss."""
    k = refs.shape[0]
    sigmas = sigma.repeat(1 + k)
    text, y = context.expand(1 + k, -1, -1), None if adm is None else adm.expand(1 + k, -1)
    extra = lambda rows: {} if y is None else {"y": y[rows]}
    if layout == "detached":
        with torch.no_grad():
            model.apply_model(refs, sigmas[1:], c_crossattn=text[1:], **extra(slice(1, None)))
        out = model.apply_model(target, sigmas[:1], c_crossattn=text[:1], **extra(slice(0, 1)))
    else:
        out = model.apply_model(torch.cat([target, refs]), sigmas, c_crossattn=text,
                                **extra(slice(None)))[:1]
    loss = out.float().square().mean()
    loss.backward()
    return loss


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--refs", type=int, default=2, help="references per target")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per layout")
    common.add_setup_options(parser)
    args = parser.parse_args(argv)
    setup = common.setup(parser, args, cuda_dtype=torch.bfloat16, tiny_resolution=256)
    pack = boot_pack(os.environ.get("COMFYUI_PATH"))
    if not setup.sdxl:
        torch.set_num_threads(1)
    patcher = setup.unet(pack)
    model = patcher.model.to(setup.device)
    context_width, _, adm_width = setup.widths(pack)
    gen = torch.Generator().manual_seed(0)
    h, w = setup.latent
    as_input = lambda *shape: torch.randn(*shape, generator=gen).to(setup.device, setup.dtype)
    # The target's input carries the gradient (as the LoRA does in training); the model's own
    # weights stay frozen.
    target = as_input(1, 4, h, w).requires_grad_(True)
    refs = as_input(args.refs, 4, h, w)
    context = as_input(1, 77, context_width)
    adm = as_input(1, adm_width) if adm_width else None
    sigma = torch.tensor([1.0], device=setup.device)
    resident = {p.untyped_storage().data_ptr() for p in model.parameters()}
    print(f"{setup.model_label()}, {setup.resolution}px, 1 target + {args.refs} references",
          flush=True)
    figures = {}
    for layout in ("detached", "rows"):
        seen = {}
        with saved_bytes(seen, resident), torch.autocast("cuda", setup.dtype, enabled=setup.cuda):
            step(model, target, refs, sigma, context, adm, layout)
        with torch.autocast("cuda", setup.dtype, enabled=setup.cuda):
            seconds = setup.per_step(
                lambda n: [step(model, target, refs, sigma, context, adm, layout)
                           for _ in range(n)], args.steps)
        figures[layout] = (sum(seen.values()) / 2 ** 20, seconds * 1000)
        print(f"{layout:>8}: saved for backward {figures[layout][0]:.1f} MiB, "
              f"{figures[layout][1]:.0f} ms per forward + backward", flush=True)
    memory = figures["rows"][0] / figures["detached"][0]
    speed = figures["rows"][1] / figures["detached"][1]
    print(f"rows / detached: memory kept {memory:.2f}x, time {speed:.2f}x")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())

"""Masked Shared Attention benchmark: prints, in one run,

1. attention alone: masked SDPA (SynCD's form: every reference token, additive bias on the
   background) vs. compacted (foreground gathered, unmasked fused SDPA) vs. plain attention,
   for 1 and 3 references at 30% and 60% foreground, with the ratio of compacted to the FLOPs
   floor (1 + K x foreground) x plain, and the largest difference masked vs. compacted;
2. sampling: per-step time of a sample without MSA, with one-call MSA (reference rows in the
   same UNet call) and with the two-pass form (separate reference pass), 1 and 3 references.

CUDA: SDXL 1024px shapes in fp16 (2 target rows, 10 heads x 64, 4096 tokens at the 64x64 level;
sampling on the host's UNetModel with the SDXL configuration, random weights, 1024x1024).
CPU: tiny shapes (and the tiny SDXL-like UNet) so it runs in seconds; its ratios mean little.
CPU with --sdxl: the CUDA mode's shapes and model in fp32 (--resolution 256 --steps 1
--repeats 2 for a smoke run of that code).

Run from the pack folder:  python -m bench.msa_attention  [--attention-only] [--sdxl]
    [--resolution N] [--steps N] [--repeats N]
"""
import argparse
import datetime
import time

import torch
import torch.nn.functional as F

from bench import common
from bench.common import boot_pack, load_kernel


def attention_shapes(setup):
    """(target rows, heads, head width, level height, level width): SDXL's first attention
    level (1/16 of the image side, 10 heads x 64) or tiny ones."""
    side = setup.resolution // 16
    return (2, 10, 64, side, side) if setup.sdxl else (2, 4, 32, 16, 16)


def _timed(setup, fn, repeats):
    fn()
    setup.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    setup.synchronize()
    return (time.perf_counter() - start) / repeats


def _masked_sdpa(q, k, v, k_refs, v_refs, bias, heads):
    """SynCD's form: keys [own | all reference tokens], background reference keys biased to
    -inf through an additive mask, one masked fused attention."""
    b, n, c = q.shape
    keys = torch.cat([k, k_refs.reshape(1, -1, c).expand(b, -1, -1)], 1)
    values = torch.cat([v, v_refs.reshape(1, -1, c).expand(b, -1, -1)], 1)
    split = lambda x: x.view(b, -1, heads, c // heads).transpose(1, 2)
    out = F.scaled_dot_product_attention(split(q), split(keys), split(values), attn_mask=bias)
    return out.transpose(1, 2).reshape(b, n, c)


def bench_attention(setup, kernel, repeats):
    rows, heads, width, h, w = attention_shapes(setup)
    n, c = h * w, heads * width
    device, dtype = setup.device, setup.dtype
    gen = torch.Generator(device=device).manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=gen, device=device, dtype=dtype)
    q, k, v = rand(rows, n, c), rand(rows, n, c), rand(rows, n, c)
    split = lambda x: x.view(rows, n, heads, width).transpose(1, 2)
    plain = _timed(setup, lambda: F.scaled_dot_product_attention(split(q), split(k), split(v)),
                   repeats)
    print(f"attention, {rows} target rows, {heads} heads x {width}, {n} tokens ({h}x{w}), "
          f"{dtype}: plain {plain * 1e3:.3f} ms")
    print(f"{'refs':>4} {'fg':>5} {'masked ms':>10} {'compact ms':>10} {'floor ms':>9} "
          f"{'compact/floor':>13} {'masked/compact':>14} {'max |diff|':>10}")
    for refs in (1, 3):
        k_refs, v_refs = rand(refs, n, c), rand(refs, n, c)
        for fraction in (0.3, 0.6):
            fg = torch.rand(refs, n, generator=gen, device=device) < fraction
            bias = torch.zeros(1, 1, n, n * (1 + refs), device=device, dtype=dtype)
            bias[..., n:] = torch.where(fg.reshape(-1), 0.0, float("-inf")).to(dtype)
            bias = bias.expand(rows, 1, n, -1)
            index = kernel.foreground_index(fg)  # once per layer shape, cached by the node
            masked_fn = lambda: _masked_sdpa(q, k, v, k_refs, v_refs, bias, heads)
            compact_fn = lambda: kernel.shared_attention(
                q, k, v, kernel.gather_foreground(k_refs, index),
                kernel.gather_foreground(v_refs, index), heads)
            masked, compact = _timed(setup, masked_fn, repeats), _timed(setup, compact_fn, repeats)
            floor = (1 + refs * index.numel() / (refs * n)) * plain
            diff = (masked_fn().float() - compact_fn().float()).abs().max().item()
            print(f"{refs:>4} {fraction:>5.0%} {masked * 1e3:>10.3f} {compact * 1e3:>10.3f} "
                  f"{floor * 1e3:>9.3f} {compact / floor:>13.2f} {masked / compact:>14.2f} "
                  f"{diff:>10.1e}")


class TwoPass:
    """SynCD's two passes per step, for timing: a reference pass banks every attn1 layer's
    keys/values, then the target pass reads their foreground (compacted, as the one-call form)."""

    def __init__(self, kernel, patching, layer_grid, latents, masks, sampling):
        self.kernel, self.patching, self.sampling = kernel, patching, sampling
        self.layer_grid = layer_grid
        self.latents, self.masks = latents, masks
        self.bank, self.writing, self.grid, self.roles = {}, False, None, ()
        self.foreground = {}  # (h, w) -> flat foreground index, as the one-call form caches

    def wrapper(self, apply_model, args):
        x, sigmas, c = args["input"], args["timestep"], args["c"]
        self.roles = self.patching.roles_from_chunks(args["cond_or_uncond"],
                                                     self.patching.DEFAULT_BRANCHES, x.shape[0])
        self.grid = tuple(x.shape[-2:])
        rows = self.latents.shape[0]
        sigma = float(sigmas[0])
        noise = self.kernel.step_noise(self.latents.shape, sigma).to(x)
        noisy = self.sampling.noise_scaling(sigmas[:1].reshape(1, 1, 1, 1), noise,
                                            self.latents.to(x))
        source = self.roles.index("full")
        c_ref = {key: (val[[source] * rows] if torch.is_tensor(val) and val.shape[0] == x.shape[0]
                       else val) for key, val in c.items()}
        self.writing = True
        apply_model(noisy, sigmas[:1].expand(rows), **c_ref)
        self.writing = False
        return apply_model(x, sigmas, **c)

    def make_patch(self, location, inner):
        def attn1(q, k, v, extra_options):
            if self.writing:
                self.bank[location] = (k, v)
                return inner(q, k, v, extra_options)
            readers = self.patching.rows_with_role(self.roles, self.patching.IMAGE_ROLES)
            out = inner(q, k, v, extra_options)
            h, w = self.layer_grid(self.grid, q.shape[1])
            index = self.foreground.get((h, w))
            if index is None:
                fg = self.kernel.resize_masks(self.masks, h, w)
                index = self.foreground[(h, w)] = self.kernel.foreground_index(fg).to(q.device)
            k_ref, v_ref = self.bank[location]
            out[readers] = self.kernel.shared_attention(
                q[readers], k[readers], v[readers], self.kernel.gather_foreground(k_ref, index),
                self.kernel.gather_foreground(v_ref, index), extra_options["n_heads"])
            return out
        return attn1


def bench_sampling(setup, steps):
    pack = boot_pack()
    kernel, patching, node = pack("kernels.msa"), pack("families.unet"), pack("nodes.msa")
    references = pack("kernels.references")
    import comfy.sample
    model, latent, (context, _, _) = setup.unet(pack), setup.latent, setup.widths(pack)
    gen = torch.Generator().manual_seed(0)
    positive, negative, noise = setup.sampling_inputs(pack, gen)

    def per_step(patched):
        run = lambda n: comfy.sample.sample(patched, noise, n, 5.0, "euler", "normal", positive,
                                            negative, torch.zeros_like(noise), seed=0,
                                            disable_pbar=True)
        return setup.per_step(run, steps)

    plain = per_step(model)
    print(f"\nsampling, {setup.model_label()}, "
          f"latent {latent[0]}x{latent[1]}, euler, CFG (batch 2), {steps} steps: "
          f"plain {plain * 1e3:.1f} ms/step")
    for refs in (1, 3):
        latents = torch.randn(refs, 4, *latent, generator=gen)
        masks = (torch.rand(refs, *latent, generator=gen) < 0.3).float()
        encoded = tuple(references.EncodedReference(
            image_tokens=torch.zeros(1, 4, context), uncond_tokens=torch.zeros(1, 4, context),
            latents=latents[i:i + 1], masks=masks[i:i + 1], phrase="object", weight=1.0,
            start_percent=0.0, end_percent=1.0, adapter_fingerprint="") for i in range(refs))
        one_call = per_step(node.apply_msa(model, encoded, 1.0, 0.0, 1.0, False, "all",
                                           "references"))
        two = TwoPass(kernel, patching, pack("kernels.routing").layer_grid,
                      model.model.process_latent_in(latents), masks,
                      model.get_model_object("model_sampling"))
        two_model = model.clone()
        two_model.set_model_unet_function_wrapper(two.wrapper)
        patching.set_attention_patch(two_model, "attn1", two.make_patch)
        two_pass = per_step(two_model)
        print(f"  {refs} reference(s), 30% foreground: one-call {one_call * 1e3:.1f} ms/step "
              f"({one_call / plain:.2f}x plain), two-pass {two_pass * 1e3:.1f} ms/step "
              f"({two_pass / plain:.2f}x plain)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--attention-only", action="store_true", help="skip the sampling part")
    cuda = torch.cuda.is_available()
    parser.add_argument("--steps", type=int, default=8 if cuda else 4, help="timed sampler steps")
    parser.add_argument("--repeats", type=int, default=50 if cuda else 30,
                        help="timed calls per attention case")
    common.add_setup_options(parser)
    args = parser.parse_args()
    setup = common.setup(parser, args)
    print(f"MSA benchmark, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
          f"{setup.describe()}")
    bench_attention(setup, load_kernel("msa"), repeats=args.repeats)
    if not args.attention_only:
        bench_sampling(setup, args.steps)


if __name__ == "__main__":
    main()

"""Routing overhead benchmark: prints, in one run, side by side,

1. one cross-attention layer: plain IP-Adapter Plus (text attention + image attention over one
   reference's 16 tokens) vs. weighted-merge routing with 2 and 3 references (text attention +
   relevance maps + merged per-reference image attention), as a time ratio;
2. one sampling step of a UNet through the host's sampler (CFG, batch 2): plain IP-Adapter Plus
   patch vs. MultiRefApplyAdapter (weighted) with 2 and 3 references.

CPU: tiny shapes (the tiny SDXL-like UNet) so it runs in seconds, one thread, CPU time of this
process; its ratios mean little for the GPU.
CUDA: SDXL 1024px shapes in fp16 (layers at 64x64 with 10 heads and 32x32 with 20 heads, 77 text
tokens, context 2048; the host's SDXL UNet configuration with random weights). The design
target is the CUDA sampling ratio: routing with 2 references <= 1.10x plain IP-Adapter Plus.
CPU with --sdxl: the CUDA mode's shapes and model in fp32 on all threads (--resolution 256
--steps 1 --repeats 2 for a smoke run of that code).

Run from the pack folder:  python -m bench.routing_overhead  [--attention-only] [--sdxl]
    [--resolution N] [--steps N] [--repeats N]
"""
import argparse
import datetime
import time

import torch
import torch.nn.functional as F

from bench import common
from bench.common import boot_pack, load_kernel

IP_TOKENS = 16
PHRASE_TOKENS = 2


def layers(setup):
    """(label, rows, heads, head width, positions, text tokens) per cross-attention level timed:
    SDXL's two attention levels (1/16 and 1/32 of the image side) or a tiny one."""
    if not setup.sdxl:
        return (("tiny 16x16 level", 2, 4, 16, 16 * 16, 77),)
    return tuple((f"SDXL {s}x{s} level", 2, heads, 64, s * s, 77)
                 for s, heads in ((setup.resolution // 16, 10), (setup.resolution // 32, 20)))


def _timed(setup, fn, repeats, rounds=5):
    """Seconds per call: the fastest of `rounds` rounds (robust to other work on the machine).
    On a CPU shared with other work, wall time measures the neighbours: count this process's CPU
    time instead."""
    clock = time.perf_counter if setup.cuda else time.process_time
    fn()
    best = float("inf")
    for _ in range(rounds):
        setup.synchronize()
        start = clock()
        for _ in range(repeats):
            fn()
        setup.synchronize()
        best = min(best, (clock() - start) / repeats)
    return best


def _heads(x, heads):
    return x.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)


def _attention(q, k, v, heads):
    out = F.scaled_dot_product_attention(_heads(q, heads), _heads(k, heads), _heads(v, heads))
    return out.transpose(1, 2).reshape(q.shape)


def bench_attention(setup, kernel, repeats):
    print("\n1. one cross-attention layer (image keys/values and phrase keys cached, as in the "
          "patches)")
    for label, rows, heads, d, positions, text in layers(setup):
        make = lambda *shape: torch.randn(*shape, device=setup.device, dtype=setup.dtype)
        width = heads * d
        q, k_text, v_text = make(rows, positions, width), make(rows, text, width), make(rows, text, width)

        ip_keys, ip_values = make(rows, 3, IP_TOKENS, width), make(rows, 3, IP_TOKENS, width)

        def plain():
            k_ip, v_ip = ip_keys[:, 0], ip_values[:, 0]
            return _attention(q, k_text, v_text, heads) + 0.7 * _attention(q, k_ip, v_ip, heads)

        plain_time = _timed(setup, plain, repeats)
        line = f"  {label} ({rows} rows, {heads} heads x {d}, {positions} positions): plain " \
               f"{plain_time * 1e3:.3f} ms"
        for refs in (2, 3):
            phrases = kernel.phrase_keys([make(PHRASE_TOKENS, width) for _ in range(refs)])
            weights = torch.ones(refs, device=setup.device)
            k_ip, v_ip = ip_keys[:, :refs], ip_values[:, :refs]

            def routed():
                text_out = _attention(q, k_text, v_text, heads)
                return kernel.routed_cross_attention(q, text_out, heads, k_ip, v_ip, weights, 0.7,
                                                     "weighted", phrases=phrases)[0]

            routed_time = _timed(setup, routed, repeats)
            line += f"; routed {refs} refs {routed_time * 1e3:.3f} ms ({routed_time / plain_time:.2f}x)"
        print(line)


def _random_adapter(pack, model, seed=0):
    """Random weights in the published IP-Adapter layout sized for the model's cross-attentions."""
    checkpoints, adapter = pack("kernels.checkpoints"), pack("kernels.adapter")
    gen = torch.Generator().manual_seed(seed)
    dims = checkpoints.cross_attention_dims(model.model.diffusion_model)
    context = next(iter(dims.values()))[0]
    tensors = {"image_proj.proj.weight": torch.randn(IP_TOKENS * context, 8, generator=gen),
               "image_proj.proj.bias": torch.zeros(IP_TOKENS * context),
               "image_proj.norm.weight": torch.ones(context),
               "image_proj.norm.bias": torch.zeros(context)}
    for i, location in enumerate(adapter.published_order(dims)):
        ctx, inner = dims[location]
        for name in ("to_k_ip", "to_v_ip"):
            tensors[f"ip_adapter.{2 * i + 1}.{name}.weight"] = torch.randn(inner, ctx, generator=gen) / ctx ** 0.5
    return adapter.build_adapter("ip_adapter", "sdxl", tensors, source="random"), context


def _plain_ip_adapter(patching, model, adapter, reference, scale):
    """Plain IP-Adapter Plus on every cross-attention: text attention + scale * SDPA over the
    reference's tokens (image tokens on prompt rows, uncond tokens on negative rows)."""
    patched = model.clone()
    adapter = adapter.bind(list(patching.attention_locations(model)))

    def make(location, inner):
        layer, cache = adapter.layer(location), {}

        def attention(q, k, v, extra_options):
            out = inner(q, k, v, extra_options)
            roles = patching.row_roles(extra_options, q.shape[0])
            if roles not in cache:
                tokens = torch.cat([reference.image_tokens if r in patching.IMAGE_ROLES
                                    else reference.uncond_tokens for r in roles]).to(q)
                cache[roles] = (F.linear(tokens, layer.to_k_ip.weight.to(q)),
                                F.linear(tokens, layer.to_v_ip.weight.to(q)))
            k_ip, v_ip = cache[roles]
            return out + scale * _attention(q, k_ip, v_ip, extra_options["n_heads"])
        return attention

    patching.set_attention_patch(patched, "attn2", make)
    return patched


def bench_sampling(setup, steps):
    pack = boot_pack()
    patching, node, references = pack("families.unet"), pack("nodes.routing"), pack("kernels.references")
    import comfy.sample
    model, latent = setup.unet(pack), setup.latent
    # SDXL-shaped: phrase embeddings are given directly (no SDXL text encoder weights here).
    clip = None if setup.sdxl else pack("families.tiny_models").tiny_text_encoder("sdxl")
    adapter, context = _random_adapter(pack, model)
    gen = torch.Generator().manual_seed(0)
    positive, negative, noise = setup.sampling_inputs(pack, gen)
    encoded = tuple(references.EncodedReference(
        image_tokens=torch.randn(1, IP_TOKENS, context, generator=gen),
        uncond_tokens=torch.zeros(1, IP_TOKENS, context), latents=None, masks=None,
        phrase=phrase, weight=1.0, start_percent=0.0, end_percent=1.0,
        adapter_fingerprint=adapter.fingerprint) for phrase in ("dog", "cat", "hat"))

    def per_step(patched):
        run = lambda: comfy.sample.sample(patched, noise, steps, 5.0, "euler", "normal", positive,
                                          negative, torch.zeros_like(noise), seed=0,
                                          disable_pbar=True)
        return _timed(setup, run, 1, rounds=3) / steps

    plain = per_step(_plain_ip_adapter(patching, model, adapter, encoded[0], 0.7))
    print(f"\n2. sampling, {setup.model_label()}, latent "
          f"{latent[0]}x{latent[1]}, euler, CFG (batch 2), {steps} steps: plain IP-Adapter Plus "
          f"{plain * 1e3:.1f} ms/step")
    for refs in (2, 3):
        routed = per_step(node.MultiRefApplyAdapter().apply(
            model, adapter, encoded[:refs], clip or _Embeddings(context, gen), "weighted", 0.7,
            0.0, 1.0)[0])
        print(f"  routed (weighted), {refs} references: {routed * 1e3:.1f} ms/step "
              f"({routed / plain:.2f}x plain IP-Adapter Plus)")


class _Embeddings:
    """Stands in for the text encoder when no SDXL text encoder is at hand: the node encodes
    each phrase through clip.tokenize / clip.encode_from_tokens; these give random embeddings of
    the model's context width for 2-token phrases."""

    def __init__(self, context, gen):
        self.context, self.gen = context, gen

    def tokenize(self, text):
        ids = [49406] + ([320, 321] if text else []) + [49407] * (74 if text else 76)
        return {"l": [[(i, 1.0) for i in ids]]}

    def encode_from_tokens(self, tokens):
        return torch.randn(1, 77, self.context, generator=self.gen)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--attention-only", action="store_true", help="skip the sampling part")
    parser.add_argument("--steps", type=int, default=8 if torch.cuda.is_available() else 4,
                        help="sampler steps per timed sample")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per layer case")
    common.add_setup_options(parser)
    args = parser.parse_args()
    setup = common.setup(parser, args)
    if not setup.sdxl:
        torch.set_num_threads(1)
    now = datetime.datetime.now(datetime.timezone.utc)
    print(f"routing overhead benchmark, {now:%Y-%m-%d %H:%M} UTC, {setup.describe()}")
    if not setup.cuda:
        shapes = (f"SDXL-shaped model at {setup.resolution}px in fp32, a smoke run of the GPU "
                  f"mode" if setup.sdxl else "SDXL 1024px shapes skipped, tiny shapes only")
        print(f"no CUDA device: {shapes} (ratios on a CPU do not speak for the GPU target)")
    bench_attention(setup, load_kernel("routing"), repeats=args.repeats)
    if not args.attention_only:
        bench_sampling(setup, args.steps)


if __name__ == "__main__":
    main()

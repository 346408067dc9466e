"""Flux joint attention with MultiRef's two MSA forms against the attention they replace, at one
block's shapes (kernels/joint_attention.py; plain torch, no host needed):

  * references mode: the three guidance rows (full, image, uncond) plus one reference row per
    reference in one call; the image-conditioned rows' image queries also read each reference's
    foreground keys (compacted), against the same call without references (three rows);
  * kontext mode: [text | target | reference] (ReferenceLatent) with the target restricted to
    the reference's foreground and the reference kept from reading the target, against full
    joint attention over the same sequence.

    python -m bench.flux_attention          # CUDA: Flux-dev shapes (24 heads x 128, 512 text
                                            # tokens, 1024x1024 -> 4096 image tokens), bf16
    python -m bench.flux_attention --tiny   # CPU-sized shapes, float32

Prints ms per call and the ratios in one run. These are attention-only figures: a Flux step also
runs the blocks' projections and MLPs, which the reference rows add to as well (rows / 3 of
them), and the project's step-level targets need the whole transformer.
"""
import argparse
import datetime

import torch
import torch.nn.functional as F

from bench.common import load_kernel
from bench.msa_attention import _timed


class Where:
    """Device, dtype and synchronisation for bench.msa_attention's timer."""

    def __init__(self, device, dtype):
        self.device, self.dtype = device, dtype

    def synchronize(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def shapes(tiny):
    """(heads, head width, text tokens, image tokens)."""
    return (4, 32, 64, 256) if tiny else (24, 128, 512, 4096)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="small shapes (CPU)")
    parser.add_argument("--refs", type=int, default=1, help="references")
    parser.add_argument("--foreground", type=float, default=0.3,
                        help="share of a reference's tokens that are foreground")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per case")
    args = parser.parse_args()
    cuda = torch.cuda.is_available() and not args.tiny
    where = Where(torch.device("cuda" if cuda else "cpu"), torch.bfloat16 if cuda else torch.float32)
    repeats = args.repeats or (30 if cuda else 5)
    joint = load_kernel("joint_attention")
    heads, width, text, image = shapes(not cuda)
    gen = torch.Generator().manual_seed(0)
    rand = lambda *s: torch.randn(*s, generator=gen).to(where.device, where.dtype)
    fg = torch.rand(args.refs * image, generator=gen) < args.foreground
    print(f"Flux attention, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
          f"{torch.cuda.get_device_name() if cuda else 'CPU'}, {heads} heads x {width}, "
          f"text {text} + image {image} tokens, {args.refs} reference(s), "
          f"{args.foreground:.0%} foreground, {str(where.dtype).split('.')[-1]}")

    # references mode: 3 guidance rows alone, against 3 rows + reference rows in the same call
    q, k, v = (rand(3 + args.refs, heads, text + image, width) for _ in range(3))
    index = fg.nonzero()[:, 0].to(where.device)
    ref_k = k[3:, :, text:].transpose(0, 1).flatten(1, 2)  # (H, R * N, D)
    ref_v = v[3:, :, text:].transpose(0, 1).flatten(1, 2)

    def plain():
        F.scaled_dot_product_attention(q[:3], k[:3], v[:3])

    def with_references():
        k_fg, v_fg = ref_k.index_select(1, index), ref_v.index_select(1, index)
        joint.reading_rows_attention(q[:2], k[:2], v[:2], text, k_fg, v_fg)  # full, image
        F.scaled_dot_product_attention(q[2:], k[2:], v[2:])  # uncond and reference rows
    t_plain, t_refs = _timed(where, plain, repeats), _timed(where, with_references, repeats)
    print(f"references mode: 3 rows {t_plain * 1e3:.2f} ms, 3 rows + {args.refs} reference "
          f"row(s) reading the foreground {t_refs * 1e3:.2f} ms ({t_refs / t_plain:.2f}x)")

    # kontext mode: [text | target | references] in the sequence, one row per branch
    length = text + image * (1 + args.refs)
    q, k, v = (rand(3, heads, length, width) for _ in range(3))
    weights = [1.0] * args.refs

    def full():
        F.scaled_dot_product_attention(q, k, v)

    def kontext():
        joint.kontext_attention(q, k, v, text, image, [image] * args.refs, fg.to(where.device),
                                weights, block_reference_to_target=True)
    t_full, t_kontext = _timed(where, full, repeats), _timed(where, kontext, repeats)
    print(f"kontext mode: full ReferenceLatent attention {t_full * 1e3:.2f} ms, foreground-"
          f"restricted {t_kontext * 1e3:.2f} ms ({t_full / t_kontext:.2f}x faster)")


if __name__ == "__main__":
    main()

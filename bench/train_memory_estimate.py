"""Training peak memory at SDXL 1024px without a GPU: the trainer's real step (reference pass,
target pass with LoRA and Masked Shared Attention, backward, AdamW) on the host's UNetModel with
the SDXL configuration, run on the meta device and counted by bench.live_memory (what a CUDA run
keeps: fused attention, bf16 autocast, every reference pixel foreground).

    python -m bench.train_memory_estimate                 # the trainer, checkpointing off and on
    python -m bench.train_memory_estimate --anchor --comfyui PATH
        # the configuration measured on an H100 (docs/ARCHITECTURE.md, Performance targets: the
        # host's own UNet forward, all self-attention projections trainable, 1 and 3 rows), to check
        # the estimate against a real measurement; needs a current ComfyUI checkout (the installable
        # host adds a residual in place, which autograd refuses)

Prints per setting the peak in GiB and the phase it occurs in, and the FLOPs of one step.
"""
import argparse
import contextlib
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.common import boot_pack
from bench.live_memory import LiveBytes, cuda_kernels_on_meta
from bench.train_memory import resident_tensors, synthetic_encoded, trainer_step

META = torch.device("meta")
GIB = 2 ** 30


@contextlib.contextmanager
def host_fused_attention():
    """The host picks its attention function at import from the device it found (a CPU here);
    on a GPU it picks PyTorch's fused attention: use that one."""
    import comfy.ldm.modules.attention as attention
    saved = attention.optimized_attention, attention.optimized_attention_masked
    attention.optimized_attention = attention.optimized_attention_masked = attention.attention_pytorch
    try:
        yield
    finally:
        attention.optimized_attention, attention.optimized_attention_masked = saved


@contextlib.contextmanager
def schedule_with_values(base_model):
    """The trainer reads the noise schedule once, to draw timesteps, and a meta model's has no
    values: inside, the model carries a fresh one on the CPU."""
    sampling = base_model.model_sampling
    base_model.model_sampling = type(sampling)(base_model.model_config)
    try:
        yield
    finally:
        base_model.model_sampling = sampling


def phase_peaks(loss_of_step, optimizer, known, device, steps=2):
    """`steps` training steps (loss_of_step() -> loss, backward, optimizer step) under
    LiveBytes; returns ({phase: peak bytes} of the last step, FLOPs of forward + backward)."""
    peaks, flops = {}, 0
    with LiveBytes(known, device) as live:
        for index in range(steps):
            counter = FlopCounterMode(display=False) if index == 0 else contextlib.nullcontext()
            with counter:
                live.reset_peak()
                loss = loss_of_step()
                peaks["forward"] = live.peak
                live.reset_peak()
                loss.backward()
                del loss
                peaks["backward"] = live.peak
            live.reset_peak()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            peaks["optimizer"] = live.peak
            if index == 0:
                flops = counter.get_total_flops()
    return peaks, flops


def trainer_peaks(pack, patcher, res, context, adm, refs, rank, checkpointing, device=META):
    """The trainer's step on `patcher` (its UNet already on `device`), batch 1 with `refs`
    references; returns (phase peaks, FLOPs, bytes of trainable parameters)."""
    loop, dataset = pack("training.loop"), pack("training.dataset")
    encoded = synthetic_encoded(dataset, (res // 8, res // 8), context, adm, refs)
    models = loop.Models(patcher, None, None, "sdxl")
    with trainer_step(pack, models, device, encoded, res, refs, rank, checkpointing,
                      building=schedule_with_values(patcher.model)) as (run, optimizer):
        trainable = sum(p.numel() * p.element_size() for p in run.step_module.parameters())
        with host_fused_attention(), cuda_kernels_on_meta():
            peaks, flops = phase_peaks(lambda: run.step_module(run.batch(0, [0])), optimizer,
                                       resident_tensors(run), device)
    return peaks, flops, trainable


def anchor_peaks(diffusion_model, rows, res):
    """The measured anchor: the host's own UNet forward on `rows` rows, every self-attention
    projection trainable (bf16, AdamW), loss on the whole output."""
    trainable = []
    for name, param in diffusion_model.named_parameters():
        wanted = ".attn1.to_" in name
        param.requires_grad_(wanted)
        if wanted:
            trainable.append(param)
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    h = res // 8

    def loss():
        x = torch.randn(rows, 4, h, h, device=META, dtype=torch.bfloat16)
        context = torch.randn(rows, 77, 2048, device=META, dtype=torch.bfloat16)
        y = torch.randn(rows, 2816, device=META, dtype=torch.bfloat16)
        out = diffusion_model(x, torch.full((rows,), 500.0, device=META), context=context, y=y)
        return out.float().pow(2).mean()
    known = [*diffusion_model.parameters(), *diffusion_model.buffers()]
    with host_fused_attention(), cuda_kernels_on_meta():
        return phase_peaks(loss, optimizer, known, META)


def describe(label, base_bytes, peaks, flops):
    total = {name: (base_bytes + value) / GIB for name, value in peaks.items()}
    worst = max(total, key=total.get)
    phases = ", ".join(f"{name} {value:.2f}" for name, value in total.items())
    return (f"{label}: peak {total[worst]:.2f} GiB in {worst} ({phases}), "
            f"{flops / 1e12:.2f} TFLOP/step")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--rank", type=int, default=128, help="LoRA rank (SynCD: 128)")
    parser.add_argument("--refs", type=int, default=2, help="references per target")
    parser.add_argument("--resolution", type=int, default=1024, help="image side in pixels")
    parser.add_argument("--anchor", action="store_true",
                        help="estimate the measured H100 anchor configuration instead")
    parser.add_argument("--comfyui", help="a ComfyUI checkout to run on (needed for --anchor)")
    args = parser.parse_args(argv)
    pack = boot_pack(args.comfyui)
    patcher = pack("families.tiny_models").sdxl_shaped_unet(META, torch.bfloat16)
    unet = patcher.model.diffusion_model
    weights = sum(p.numel() * p.element_size() for p in unet.parameters())
    print(f"meta-device estimate: SDXL-shaped UNet ({sum(p.numel() for p in unet.parameters()) / 1e9:.3f}B "
          f"parameters, bf16 weights {weights / GIB:.2f} GiB), {args.resolution}px, batch 1", flush=True)
    if args.anchor:
        for rows in (1, 3):
            peaks, flops = anchor_peaks(unet, rows, args.resolution)
            print(describe(f"anchor, {rows} row(s)", weights, peaks, flops), flush=True)
        return 0
    print(f"trainer: {args.refs} references (every pixel foreground), LoRA rank {args.rank} "
          "(fp32, AdamW), bf16 autocast", flush=True)
    for checkpointing in (False, True):
        peaks, flops, trainable = trainer_peaks(pack, patcher, args.resolution, 2048, 2816,
                                                args.refs, args.rank, checkpointing)
        print(describe(f"checkpointing={'on ' if checkpointing else 'off'}", weights + trainable,
                       peaks, flops), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Training step cost: peak memory and time per step of the trainer's real step (reference pass
without gradient + target pass with LoRA and Masked Shared Attention + backward + AdamW), with
and without gradient checkpointing of the layers that run.

    python -m bench.train_memory          # CUDA: the host's UNetModel with the SDXL config
                                            # (random weights, bf16), 1024px, batch 1, 2 references
    python -m bench.train_memory --steps 3  # CPU: the tiny UNet at 256px (runs anywhere; the
                                            # numbers that count are the GPU ones)
    python -m bench.train_memory --sdxl --resolution 256 --steps 1
        # CPU: the CUDA mode's SDXL-shaped UNet in fp32 (no autocast), a smoke run of that code

Prints one line per setting: peak memory (CUDA), the bytes autograd keeps for backward,
ms per step, images per second (targets), and on CUDA the model FLOPs utilization against
--peak-tflops (H100 SXM bf16 dense: 989).
"""
import argparse
import contextlib
import sys
import time

from bench import common
from bench.common import boot_pack


def saved_bytes(seen, resident=frozenset()):
    """Count the bytes autograd keeps for backward outside checkpointed regions (a checkpointed
    region keeps only its inputs): {storage pointer: bytes} filled in `seen`. Storages in
    `resident` (the weights, which live on anyway) are not counted: autograd saves a layer's
    weight for its input's gradient, and those bytes are not the activations' cost."""
    import torch

    def pack(t):
        pointer = t.untyped_storage().data_ptr()
        if pointer not in resident:
            seen[pointer] = t.untyped_storage().nbytes()
        return t
    return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)


@contextlib.contextmanager
def trainer_step(pack, models, device, encoded, resolution, refs, rank, checkpointing,
                 building=None):
    """The trainer's Run (LoRA, patched clone, loss module) loaded on `device`, with its AdamW
    optimizer: yields (run, optimizer) and unloads the clone on exit. `building`: a context
    around building the Run (the meta-device estimate lends it a schedule with values)."""
    import torch
    loop, config_mod = pack("training.loop"), pack("training.config")
    config = config_mod.TrainConfig(dataset="-", output_dir="-", lora_rank=rank,
                                    resolution=resolution, gradient_checkpointing=checkpointing,
                                    max_references=refs)
    with building or contextlib.nullcontext():
        run = loop.Run(config, models, device, encoded)
    optimizer = torch.optim.AdamW(run.step_module.parameters(), lr=1e-5)
    loop._load(run.patcher, device)
    try:
        yield run, optimizer
    finally:
        loop._unload(run.patcher)


def resident_tensors(run):
    """What lives through a whole step anyway: the weights, buffers and trainable parameters."""
    return [t for module in (run.patcher.model, run.step_module)
            for t in (*module.parameters(), *module.buffers())]


def synthetic_encoded(dataset, latent_hw, context, adm, refs, groups=2):
    """Encoded groups with random tensors of the right shapes (no VAE / text encoder needed)."""
    import torch
    gen = torch.Generator().manual_seed(0)
    h, w = latent_hw
    masks = torch.zeros(refs, h, w)
    masks[:, h // 4: 3 * h // 4, w // 4: 3 * w // 4] = 1  # object = the central quarter
    items = [dataset.EncodedGroup(torch.randn(4, h, w, generator=gen),
                                  torch.randn(77, context, generator=gen),
                                  None if adm is None else torch.randn(adm, generator=gen),
                                  torch.randn(refs, 4, h, w, generator=gen), masks,
                                  ref_context=torch.randn(refs, 77, context, generator=gen),
                                  ref_adm=None if adm is None else torch.randn(refs, adm, generator=gen))
             for _ in range(groups)]
    return items, (torch.zeros(77, context), None if adm is None else torch.zeros(adm)), None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps (after 2 warm-up steps)")
    parser.add_argument("--rank", type=int, default=128, help="LoRA rank (SynCD: 128)")
    parser.add_argument("--refs", type=int, default=2, help="references per target")
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="the GPU's dense bf16 peak, for model FLOPs utilization")
    common.add_setup_options(parser)
    args = parser.parse_args(argv)
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    setup = common.setup(parser, args, cuda_dtype=torch.bfloat16, tiny_resolution=256)
    module = boot_pack()
    loop, dataset = module("training.loop"), module("training.dataset")
    cuda, device, res = setup.cuda, setup.device, setup.resolution
    if not setup.sdxl:
        torch.set_num_threads(1)
    patcher, (context, _, adm) = setup.unet(module), setup.widths(module)
    models = loop.Models(patcher, None, None, "sdxl")
    encoded = synthetic_encoded(dataset, (res // 8, res // 8), context, adm, args.refs)
    print(f"device: {torch.cuda.get_device_name() if cuda else 'cpu'}; {setup.model_label()}, "
          f"{res}px, batch 1, {args.refs} references, LoRA rank {args.rank}", flush=True)
    for checkpointing in (False, True):
        with trainer_step(module, models, device, encoded, res, args.refs, args.rank,
                          checkpointing) as (run, optimizer):
            resident = {t.untyped_storage().data_ptr() for t in resident_tensors(run)}
            flops, saved = None, {}
            for step in range(args.steps + 2):
                if step == 2:
                    if cuda:
                        torch.cuda.synchronize()
                        torch.cuda.reset_peak_memory_stats()
                    started = time.perf_counter()
                counter = FlopCounterMode(display=False) if step == 1 else None
                with counter or contextlib.nullcontext(), torch.autocast("cuda", torch.bfloat16, enabled=cuda):
                    with saved_bytes(saved, resident) if step == 1 else contextlib.nullcontext():
                        loss = run.step_module(run.batch(step, [0]))
                    loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if counter is not None:
                    flops = counter.get_total_flops()
            if cuda:
                torch.cuda.synchronize()
            ms = (time.perf_counter() - started) / args.steps * 1000
            memory = (f"peak {torch.cuda.max_memory_allocated() / 2 ** 30:.2f} GiB, " if cuda
                      else "") + f"saved for backward {sum(saved.values()) / 2 ** 20:.1f} MiB"
            mfu = f", MFU {flops / (ms / 1000) / (args.peak_tflops * 1e12):.1%}" if cuda else ""
            print(f"checkpointing={'on ' if checkpointing else 'off'}: {memory}, {ms:.0f} ms/step, "
                  f"{1000 / ms:.2f} images/s, {flops / 1e12:.2f} TFLOP/step{mfu}", flush=True)
        del run, optimizer
        if cuda:
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())

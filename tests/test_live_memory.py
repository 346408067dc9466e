"""The memory estimator behind bench/train_memory_estimate.py: exact counts on hand-made cases,
the CUDA-kernel stand-ins it relies on, and the trainer's step estimated on the meta device."""
import contextlib
import importlib

import torch

from bench.live_memory import LiveBytes, cuda_kernels_on_meta
from bench.train_memory_estimate import trainer_peaks

F32 = 4


def test_counts_each_storage_once_and_frees_it():
    weight = torch.ones(1000)
    with LiveBytes(known=[weight]) as live:
        view_of_weight = weight[::2] * 1  # a new tensor of 500 floats; the weight is not counted
        a = torch.empty(1000)
        view = a[::2]  # a view: no new storage
        b = a + 1
        assert live.live == (500 + 1000 + 1000) * F32
        del a, b
        assert live.live == (500 + 1000) * F32  # `a` lives on through its view
        del view
        assert live.live == 500 * F32
        live.reset_peak()
        assert live.peak == 500 * F32
        del view_of_weight
    assert live.peak == 500 * F32 and live.live == 0


def test_sees_what_autograd_keeps_until_backward_frees_it():
    x = torch.randn(256, 256, requires_grad=True)
    with LiveBytes(known=[x]) as live:
        y = x.exp()     # exp keeps its output for backward
        z = y.sin()     # sin keeps its input (y)
        del y           # still held by the graph
        assert live.live == 2 * 256 * 256 * F32
        z.sum().backward()
        del z
    # After backward the graph is gone: only x.grad is left.
    assert live.live == 256 * 256 * F32
    assert live.peak >= 4 * 256 * 256 * F32  # y, z, and the gradients flowing back


def test_device_filter_counts_only_that_device():
    with LiveBytes(device="meta") as live:
        keep = [torch.empty(100), torch.empty(300, device="meta")]
        assert live.live == 300 * F32
    del keep


def test_meta_run_counts_what_the_same_cpu_run_allocates():
    """The count depends on shapes only: a conv/norm/linear training step on meta gives the very
    peak of the same step on the CPU (what lets a GPU-sized step be counted without a GPU)."""
    def peak_on(device):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Conv2d(4, 32, 3, padding=1), torch.nn.GroupNorm(4, 32),
                                  torch.nn.SiLU(), torch.nn.Conv2d(32, 4, 3, padding=1),
                                  torch.nn.Flatten(), torch.nn.Linear(4 * 16 * 16, 8)).to(device)
        net[0].requires_grad_(False)
        # SGD: its state lives on the parameters' device (AdamW keeps step counts on the CPU).
        optimizer = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
        with LiveBytes(known=list(net.parameters()), device=device) as live:
            for _ in range(2):
                net(torch.randn(2, 4, 16, 16, device=device)).square().mean().backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        return live.peak
    assert peak_on("meta") == peak_on("cpu") > 0


def test_fused_attention_stand_in_keeps_no_attention_matrix():
    """On meta, plain scaled_dot_product_attention falls back to the math form and keeps the
    tokens x tokens matrix for backward; the CUDA stand-in keeps what the fused kernel keeps."""
    tokens, matrix = 4096, 4096 * 4096 * 2

    def kept(stand_in):
        q = torch.empty(1, 1, tokens, 64, device="meta", dtype=torch.bfloat16, requires_grad=True)
        with cuda_kernels_on_meta() if stand_in else contextlib.nullcontext():
            with LiveBytes(known=[q], device="meta") as live:
                out = torch.nn.functional.scaled_dot_product_attention(q, q, q)
                held = live.live
                del out
        return held
    assert kept(stand_in=False) > matrix
    assert kept(stand_in=True) < matrix / 16


def test_stand_ins_are_undone_and_cast_fp32_linear_to_bf16():
    original = torch.nn.functional.linear
    with cuda_kernels_on_meta():
        out = torch.nn.functional.linear(torch.empty(2, 8, device="meta"),
                                         torch.empty(4, 8, device="meta"))
        assert out.dtype == torch.bfloat16
    assert torch.nn.functional.linear is original


def test_trainer_step_estimate_on_meta_and_checkpointing_lowers_it(one_thread):
    """The trainer's real step (tiny SDXL-like UNet moved to meta) runs under the estimator;
    checkpointing what runs lowers the backward peak; the step holds more than the weights."""
    import multiref.families.tiny_models as tiny

    def pack(name):
        return importlib.import_module(f"multiref.{name}")
    results = {}
    for checkpointing in (False, True):
        patcher = tiny.tiny_unet("sdxl")
        patcher.model.diffusion_model.to("meta")
        patcher.model.model_sampling.to("meta")
        patcher.load_device = patcher.offload_device = torch.device("meta")
        peaks, flops, trainable = trainer_peaks(pack, patcher, 256, tiny.SDXL_CONTEXT,
                                                tiny.SDXL_ADM, 2, 8, checkpointing)
        results[checkpointing] = peaks
        assert flops > 0 and trainable > 0
        # AdamW keeps two states per trainable parameter.
        assert peaks["optimizer"] >= 2 * trainable
    assert results[True]["forward"] < results[False]["forward"]
    assert max(results[True].values()) < max(results[False].values())

"""Peak memory of a PyTorch program counted from tensor sizes, so that a GPU-sized run can be
measured on a machine without the GPU: run it on the `meta` device (shapes, no data, no compute)
under `LiveBytes` and the peak is what the CUDA allocator would have to hold for the tensors
(`torch.cuda.max_memory_allocated`, less the allocator's rounding and library workspaces).

`LiveBytes` sees every tensor an operator returns (below autograd, so the tensors autograd keeps
for backward, gradients and optimizer states are all seen) and counts each storage once, from its
first appearance until it is freed. Storages that existed before (`known`: the model's weights,
counted by the caller) are never counted, views of them included.

`cuda_kernels_on_meta` makes a meta run keep what a CUDA run keeps where the two differ:
  * attention: on CUDA `scaled_dot_product_attention` runs a fused kernel that keeps its output
    and the softmax statistics for backward; on meta it would fall back to the math form and keep
    the whole attention matrix. The fused kernels have meta implementations: call them.
  * autocast: CUDA bf16 autocast runs linear layers with fp32 weights (the trainer's LoRA) in
    bf16; meta has no autocast. fp32 operands of `linear` are cast the way autocast casts them.
  * `nonzero` (the foreground of a mask) has no size on meta: every element counts as
    foreground, the largest reference case (training draws full masks on purpose).
"""
import contextlib
import weakref

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    """with LiveBytes(known=model_tensors, device="meta") as live: ...; live.peak, live.live
    (bytes of tensors on `device`; None: every device). `reset_peak()` starts a new peak from
    what is live now (for a per-phase peak)."""

    def __init__(self, known=(), device=None):
        super().__init__()
        self.device = None if device is None else torch.device(device)
        self.live = self.peak = 0
        self._sizes = {}  # storage id -> bytes, while alive
        self._known = {t.untyped_storage()._cdata for t in known}

    def reset_peak(self):
        self.peak = self.live

    def _count(self, tensor):
        if self.device is not None and tensor.device != self.device:
            return
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self._sizes or key in self._known:
            return
        size = storage.nbytes()
        self._sizes[key] = size
        self.live += size
        self.peak = max(self.peak, self.live)
        # The storage's Python object lives exactly as long as the storage (PyTorch keeps it
        # alive while anything, autograd included, holds the storage).
        weakref.finalize(storage, self._free, key)

    def _free(self, key):
        self.live -= self._sizes.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for item in tree_flatten(out)[0]:
            if isinstance(item, torch.Tensor):
                self._count(item)
        return out


def _fused_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                     scale=None, **_):
    if attn_mask is None:
        return torch.ops.aten._scaled_dot_product_flash_attention(
            query, key, value, dropout_p, is_causal, scale=scale)[0]
    return torch.ops.aten._scaled_dot_product_efficient_attention(
        query, key, value, attn_mask, True, dropout_p, is_causal, scale=scale)[0]


@contextlib.contextmanager
def cuda_kernels_on_meta(dtype=torch.bfloat16):
    """Inside: meta runs keep for backward what a CUDA run with `dtype` autocast keeps (above)."""
    import torch.fx.experimental._config as fx_config

    linear, sdpa = F.linear, F.scaled_dot_product_attention
    nonzero = fx_config.meta_nonzero_assume_all_nonzero

    def autocast_linear(x, weight, bias=None):
        if torch.float32 in (x.dtype, weight.dtype):
            x, weight = x.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        return linear(x, weight, bias)

    F.linear, F.scaled_dot_product_attention = autocast_linear, _fused_attention
    fx_config.meta_nonzero_assume_all_nonzero = True
    try:
        yield
    finally:
        F.linear, F.scaled_dot_product_attention = linear, sdpa
        fx_config.meta_nonzero_assume_all_nonzero = nonzero

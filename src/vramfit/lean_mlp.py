"""kernels.lean_mlp: a checkpointed layer's recomputation leaves out
liger's SwiGLU kernel where nothing reads its output.

liger's SwiGLU (``LigerSiLUMulFunction``, installed by kernels.liger_ops) computes
``silu(gate) * up`` and saves ``gate`` and ``up`` for its backward. In a decoder layer that
ends in ``residual + mlp.down_proj(...)`` (model_shape.DOWN_PROJ_LAST), where down_proj is a
frozen bitsandbytes 4-bit layer with no adapter (QLoRA with the adapter on attention only,
as the 8 GB guide has it), nothing after the SwiGLU saves a tensor: bitsandbytes keeps its
weight as a plain attribute, not through save_for_backward, and the add saves nothing. So
torch's non-reentrant checkpoint, with its default early stop, ends the recomputation at the
SwiGLU's save, and the output the kernel wrote (micro_batch x seq x intermediate) is dropped
unread. Skipping it was to save about 1.5% of the 8 GB plan's step on an H100 (liger's forward
kernel, 330 us for each of 28 layers per micro-batch, by the session-16 profile); measured, the
speed did not change beyond the runs' spread, but the peak fell by that output's size (0.29
GiB: docs/benchmarks/speed/23-8gb-ab/), which memory.lean_mlp_skips_product counts.

In a recomputation (fused_lora.checkpoint_contexts flags it) ``_SavedOnly`` saves what
liger's function saves, the same tensors in the same order and shapes (its contiguous
inputs, viewed as rows x columns), and returns an empty *meta* tensor instead of running the
kernel. The saved tensors are what the backward of the *first* forward's node reads, so the
gradients are liger's, bit for bit (tests/test_lean_mlp.py). Were the meta output ever read
(a layer not as assumed, or early stop off), the op reading it fails on the device mismatch:
an error, never a wrong gradient. torch's checkpoint also compares each recomputed tensor's
shape, dtype and device with the first forward's, so a liger that saved other shapes fails
the same way.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from .fused_lora import in_lean_recomputation


class _SavedOnly(torch.autograd.Function):
    """What LigerSiLUMulFunction saves, without its kernel. Only ever recomputed: torch's
    checkpoint stops at its save, and the first forward's node runs the backward."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor):
        a, b = a.contiguous(), b.contiguous()  # liger's ensure_contiguous
        n = a.shape[-1]
        ctx.save_for_backward(a.view(-1, n), b.view(-1, n))
        return a.new_empty(a.shape, device="meta")

    @staticmethod
    def backward(ctx, grad):  # pragma: no cover - the recomputation's graph is never backpropagated
        raise RuntimeError("vramfit.lean_mlp: a recomputation's SwiGLU was backpropagated; turn kernels.lean_mlp off")


def _is_liger_swiglu(mlp: nn.Module) -> bool:
    try:
        from liger_kernel.transformers.swiglu import LigerSwiGLUMLP
    except ImportError:
        return False
    return getattr(mlp.forward, "__func__", None) is LigerSwiGLUMLP.forward


def saves_nothing(module: nn.Module) -> bool:
    """Whether calling ``module`` saves no tensor for the backward: a frozen bitsandbytes
    4-bit linear layer, no adapter around it (a 16-bit one saves its weight)."""
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return False
    return type(module) is Linear4bit and not any(p.requires_grad for p in module.parameters())


def install(layers, model_type: str, is_swiglu=_is_liger_swiglu) -> int:
    """Have each decoder layer's liger SwiGLU MLP skip its kernel in recomputations, where
    the layer ends in its 4-bit, unadapted down_proj. Call after liger has patched the MLPs
    (the Trainer does, before training begins). Returns how many MLPs. The skip happens only
    under fused_lora.checkpoint_contexts (fused_lora.lean_checkpointing installs it)."""
    from .memory import LEAN_MLP_TYPES  # the types the memory model counts the skip for

    if model_type not in LEAN_MLP_TYPES:
        return 0
    n = 0
    for layer in layers:
        mlp = getattr(layer, "mlp", None)
        if mlp is None or getattr(mlp, "_vramfit_lean", False) or not is_swiglu(mlp) or not saves_nothing(mlp.down_proj):
            continue
        full = mlp.forward

        def forward(self, x, _full=full):
            if in_lean_recomputation():
                _SavedOnly.apply(self.gate_proj(x), self.up_proj(x))  # torch's checkpoint stops here
                return x.new_empty(x.shape, device="meta")  # only without the stop: fails where read
            return _full(x)

        mlp.forward = types.MethodType(forward, mlp)
        mlp._vramfit_lean = True
        n += 1
    return n

"""LoRA's adapted linear layers as one autograd function (kernels.fused_lora).

PEFT computes ``base(x) + lora_B(lora_A(dropout(x))) * scaling`` as separate modules and
ops. On the GPU that is, per adapted layer and pass, a scaling ``mul`` and an ``add`` over
the layer's output (for 4-bit layers also a defensive ``clone`` of the base output), in the
backward the scaling again, a dropout backward over the input, and an ``add`` that joins the
base's and the adapter's input gradients. With r128 on every linear of a 7B those elementwise
kernels were 16% of the step (docs/benchmarks/speed-checks/15-24gb-lora-r128-profile/). Here
the same arithmetic runs with them folded into the matrix multiplies:

- 16-bit base (LoraLinearFunction): ``out = x W^T + b``, then ``out += s * (dropout(x) A^T)
  B^T`` as one ``addmm_`` (cuBLAS applies the scaling and the add in the multiply's epilogue);
  in the backward the scaling is applied to the r-wide product, not the output-wide one, and
  the adapter's input gradient is added into the base's with one ``addmm_`` (no dropout) or
  one ``addcmul_`` with the dropout mask;
- 4-bit base (bitsandbytes, LoraBranchFunction): the base runs as it is, and the adapter's
  scaling and add are one out-of-place ``addmm`` on its output (no clone needed); autograd
  adds the two input gradients, as under PEFT.

It is the same training: the dropout mask is drawn by the same op from the same generator
as PEFT's ``nn.Dropout``, so a seed gives the same masks (and torch.utils.checkpoint's RNG
replay gives the recomputation the same ones); only roundings differ, since the scaling and
the add happen in the multiply's fp32 accumulator instead of in 16-bit tensors
(tests/test_fused_lora.py checks outputs and gradients against PEFT's). What is saved for
the backward is what PEFT saves (the dropped-out input and its mask, the r-wide product),
less the 16-bit copies of the adapter weights that autocast keeps: those are cast again in
the backward.

kernels.lean_recompute: where a checkpointed decoder layer's last operation is
``residual + mlp.down_proj(...)`` (model_shape.DOWN_PROJ_LAST), nothing after down_proj is
saved for the backward, so its recomputation needs only what down_proj's own function saves
(the input, the adapter's product), not its output. torch.utils.checkpoint (non-reentrant,
with its default early stop) ends a recomputation at the last saved tensor, which here comes
after the base multiply: PEFT's layers and plain LoraLinearFunction recompute the 7B's largest
matrix multiply for nothing. ``mark_unused_outputs`` flags those layers; during a
recomputation (``checkpoint_contexts``, the checkpoint's context_fn, sets a flag) their
function saves the same tensors and returns an empty *meta* tensor instead of multiplying
(not while early stop is turned off). Were that output ever read (an architecture not as
assumed), the op reading it fails on the device mismatch: an error, never a wrong gradient.

Only the plain case is taken over: one active adapter, no DoRA or other variant, no LoRA
bias, the input in the compute dtype (and, outside autocast, the adapter in it too). Anything
else, and every call where the adapter is off or merged, runs PEFT's own forward. Not under
ZeRO-3, whose hooks gather a weight only when its module is called (train.py does not
install it there).
"""

from __future__ import annotations

import contextlib
import threading
import types

import torch
import torch.nn.functional as F


_state = threading.local()  # .recomputing: inside a checkpointed layer's recomputation


@contextlib.contextmanager
def _recomputing():
    was = getattr(_state, "recomputing", False)
    _state.recomputing = True
    try:
        yield
    finally:
        _state.recomputing = was


def checkpoint_contexts():
    """torch.utils.checkpoint's ``context_fn``: the forward as it is, the recomputation flagged
    (it runs in the autograd engine's thread, the flag's too)."""
    return contextlib.nullcontext(), _recomputing()


def _early_stop() -> bool:
    """Whether torch's checkpoint stops a recomputation at its last saved tensor: its default,
    unless someone turned it off (set_checkpoint_early_stop(False), a global while it lasts)."""
    from torch.utils import checkpoint

    return getattr(checkpoint, "_enable_checkpoint_early_stop", None) is not False


def in_lean_recomputation() -> bool:
    """Whether this call runs in a flagged recomputation that stops where its saved tensors
    end: where an output only later, unsaved work reads may be left unwritten."""
    return getattr(_state, "recomputing", False) and _early_stop()


def _skips_base(layer) -> bool:
    """Whether this call may leave the base multiply out: a recomputation, of a layer whose
    output it never reads, that stops where its saved tensors end."""
    return getattr(layer, "_vramfit_output_unused", False) and in_lean_recomputation()


def _unread(x: torch.Tensor, out_features: int) -> torch.Tensor:
    """The output a recomputation never reads: shaped, typed, no memory, and on the meta
    device, so an op that did read it would fail instead of using garbage."""
    return x.new_empty(x.shape[:-1] + (out_features,), device="meta")


def _adapter_forward(x2: torch.Tensor, lora_a, p: float):
    """(dropped-out input, its mask or None, the r-wide product), as PEFT's dropout and lora_A
    compute them: the mask from the same op and generator as nn.Dropout's."""
    if p > 0:
        dropped, mask = torch.native_dropout(x2, p, True)
    else:
        dropped, mask = x2, None
    return dropped, mask, dropped @ lora_a.to(x2.dtype).t()


def _adapter_weight_grads(g, dropped, a, lora_a, lora_b, s: float, need_a: bool, need_b: bool):
    """(lora_A's gradient, lora_B's, the r-wide gradient at lora_A's output): the scaling on the
    r-wide product, not on the output-wide gradient as PEFT's mul does."""
    grad_b = (g.t() @ a).to(lora_b.dtype).mul_(s) if need_b else None
    ga = (g @ lora_b.to(g.dtype)).mul_(s)
    grad_a = (ga.t() @ dropped).to(lora_a.dtype) if need_a else None
    return grad_a, grad_b, ga


class LoraLinearFunction(torch.autograd.Function):
    """``x W^T + b + s * dropout_p(x) A^T B^T``, with A and B cast to x's dtype: the base's
    multiply inside too, so the two input gradients are summed in one kernel."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float, p: float, skip_base: bool = False):
        dropped, mask, a = _adapter_forward(x.reshape(-1, x.shape[-1]), lora_a, p)
        if skip_base:  # the same tensors saved, in the same order; the output never read
            out = _unread(x, weight.shape[0])
        else:
            out = F.linear(x, weight, bias)
            out.view(-1, out.shape[-1]).addmm_(a, lora_b.to(x.dtype).t(), alpha=scaling)
        ctx.scaling, ctx.p = scaling, p
        ctx.save_for_backward(weight, dropped, mask, a, lora_a, lora_b)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        weight, dropped, mask, a, lora_a, lora_b = ctx.saved_tensors
        p = ctx.p
        g = grad_out.reshape(-1, grad_out.shape[-1]).to(a.dtype)
        need_x, _, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        grad_a, grad_b, ga = _adapter_weight_grads(g, dropped, a, lora_a, lora_b, ctx.scaling, need_a, need_b)
        grad_x = grad_bias = None
        if need_x:
            grad_x = g @ weight.to(g.dtype)
            a_w = lora_a.to(g.dtype)
            if mask is None:
                grad_x.addmm_(ga, a_w)
            else:
                grad_x.addcmul_(ga @ a_w, mask, value=1.0 / (1.0 - p))
            grad_x = grad_x.view(grad_out.shape[:-1] + (weight.shape[1],))
        if need_bias:
            grad_bias = g.sum(0).to(weight.dtype)
        return grad_x, None, grad_bias, grad_a, grad_b, None, None, None


class LoraBranchFunction(torch.autograd.Function):
    """``base_out + s * dropout_p(x) A^T B^T`` for a base layer computed outside (bitsandbytes'
    4-bit): the scaling and the add in one out-of-place ``addmm``, so PEFT's defensive clone of
    the base output is not needed either. The base's input gradient comes from its own
    backward, and autograd adds the adapter's to it."""

    @staticmethod
    def forward(ctx, base_out, x, lora_a, lora_b, scaling: float, p: float):
        dropped, mask, a = _adapter_forward(x.reshape(-1, x.shape[-1]), lora_a, p)
        ctx.scaling, ctx.p = scaling, p
        ctx.save_for_backward(dropped, mask, a, lora_a, lora_b)
        if base_out is None:  # a recomputation that skipped the base (_skips_base)
            return _unread(x, lora_b.shape[0])
        out = torch.addmm(base_out.reshape(-1, base_out.shape[-1]), a, lora_b.to(x.dtype).t(), alpha=scaling)
        return out.view(base_out.shape)

    @staticmethod
    def backward(ctx, grad_out):
        dropped, mask, a, lora_a, lora_b = ctx.saved_tensors
        p = ctx.p
        g = grad_out.reshape(-1, grad_out.shape[-1]).to(a.dtype)
        need_base, need_x, need_a, need_b = ctx.needs_input_grad[:4]
        grad_a, grad_b, ga = _adapter_weight_grads(g, dropped, a, lora_a, lora_b, ctx.scaling, need_a, need_b)
        grad_x = None
        if need_x:
            grad_x = ga @ lora_a.to(g.dtype)
            if mask is not None:
                grad_x = torch.ops.aten.native_dropout_backward(grad_x, mask, 1.0 / (1.0 - p))
            grad_x = grad_x.view(grad_out.shape[:-1] + (lora_a.shape[1],))
        return (grad_out if need_base else None), grad_x, grad_a, grad_b, None, None


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    kind = x.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return x.dtype


def _plain_adapter(layer, x: torch.Tensor, args, kwargs):
    """(lora_A weight, lora_B weight, scaling, dropout p) when this call is the plain case:
    one active adapter, no variant (DoRA), no LoRA bias, the input in the compute dtype;
    else None."""
    if args or kwargs or layer.disable_adapters or layer.merged:
        return None
    active = layer.active_adapters
    if len(active) != 1:
        return None
    name = active[0]
    if name not in layer.lora_A or name in getattr(layer, "lora_variant", {}) or getattr(layer, "use_dora", {}).get(name, False):
        return None
    if getattr(layer, "lora_bias", {}).get(name, False) or getattr(layer, "fan_in_fan_out", False):
        return None
    if x.dtype != _compute_dtype(x) or not x.dtype.is_floating_point:
        return None
    a_weight = layer.lora_A[name].weight
    if a_weight.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
        return None  # PEFT then runs the adapter in its own (fp32) dtype: so must we, so we don't
    dropout = layer.lora_dropout[name]
    p = float(dropout.p) if isinstance(dropout, torch.nn.Dropout) and dropout.training else 0.0
    return a_weight, layer.lora_B[name].weight, float(layer.scaling[name]), p


def _fused_args(layer, x: torch.Tensor, args, kwargs):
    """LoraLinearFunction's arguments when this call is the plain case over a 16-bit
    nn.Linear in x's dtype, else None."""
    adapter = _plain_adapter(layer, x, args, kwargs)
    base = layer.base_layer
    if adapter is None or type(base) is not torch.nn.Linear or base.weight.requires_grad or base.weight.dtype != x.dtype:
        return None
    if base.bias is not None and base.bias.dtype != x.dtype:
        return None
    a, b, s, p = adapter
    return (x, base.weight, base.bias, a, b, s, p)


def _forward(self, x, *args, **kwargs):
    fused = _fused_args(self, x, args, kwargs)
    if fused is None:
        return self._vramfit_peft_forward(x, *args, **kwargs)
    return LoraLinearFunction.apply(*fused, _skips_base(self))


def _forward_4bit(self, x, *args, **kwargs):
    adapter = _plain_adapter(self, x, args, kwargs)
    if adapter is None:
        return self._vramfit_peft_forward(x, *args, **kwargs)
    base_out = None if _skips_base(self) else self.base_layer(x)  # bitsandbytes returns x's dtype
    return LoraBranchFunction.apply(base_out, x, *adapter)


def _lora_4bit_class():
    """PEFT's LoRA layer over bitsandbytes' Linear4bit, or None without bitsandbytes."""
    try:
        from peft.tuners.lora import bnb as peft_bnb
    except ImportError:
        return None
    return getattr(peft_bnb, "Linear4bit", None)


def install(model) -> int:
    """Route every PEFT ``lora.Linear`` over a plain ``nn.Linear`` through LoraLinearFunction,
    and every LoRA layer over bitsandbytes' 4-bit linear through LoraBranchFunction (per
    call: each falls back to PEFT's forward whenever the call is not the plain case).
    Returns how many layers were routed."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    lora_4bit = _lora_4bit_class()
    n = 0
    for module in model.modules():
        if hasattr(module, "_vramfit_peft_forward"):
            continue
        if type(module) is LoraLinear and type(module.base_layer) is torch.nn.Linear:
            forward = _forward
        elif lora_4bit is not None and type(module) is lora_4bit:
            forward = _forward_4bit
        else:
            continue
        module._vramfit_peft_forward = module.forward
        module.forward = types.MethodType(forward, module)
        n += 1
    return n


def mark_unused_outputs(model) -> int:
    """kernels.lean_recompute: flag each routed down_proj of a decoder layer that ends in
    ``residual + mlp.down_proj(...)`` (model_shape.DOWN_PROJ_LAST: the model's type says so),
    so that its recomputation skips the base multiply. Returns how many were flagged; they
    skip only where checkpoint_contexts runs the recomputation (train.py installs it)."""
    from .model_shape import DOWN_PROJ_LAST
    from .offload import outermost_layers

    if getattr(getattr(model, "config", None), "model_type", None) not in DOWN_PROJ_LAST:
        return 0
    n = 0
    for layer in outermost_layers(model):
        down = getattr(getattr(layer, "mlp", None), "down_proj", None)
        if down is not None and hasattr(down, "_vramfit_peft_forward"):
            down._vramfit_output_unused = True
            n += 1
    return n


def lean_checkpointing(layers) -> int:
    """Run each decoder layer's recomputation under checkpoint_contexts. Only where the layer
    checkpoints through transformers' partial of non-reentrant torch.utils.checkpoint with no
    context of its own (what TrainingArguments' gradient_checkpointing_kwargs give): the skip
    rests on that checkpoint's early stop. Returns how many layers it applies to."""
    import functools

    from torch.utils.checkpoint import checkpoint

    n = 0
    for layer in layers:
        f = getattr(layer, "_gradient_checkpointing_func", None)
        if isinstance(f, functools.partial) and f.keywords.get("context_fn") is checkpoint_contexts:
            n += 1
        elif (isinstance(f, functools.partial) and f.func is checkpoint and f.keywords.get("use_reentrant") is False
              and "context_fn" not in f.keywords and "early_stop" not in f.keywords):  # fmt: skip
            layer._gradient_checkpointing_func = functools.partial(f, context_fn=checkpoint_contexts)
            n += 1
    return n

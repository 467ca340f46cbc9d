"""LoRA's adapted linear layers as one autograd function (kernels.fused_lora).

PEFT computes ``base(x) + lora_B(lora_A(dropout(x))) * scaling`` as separate modules and
ops. On the GPU that is, per adapted layer and pass, a scaling ``mul`` and an ``add`` over
the layer's output, in the backward the scaling again, a dropout backward over the input,
and an ``add`` that joins the base's and the adapter's input gradients. With r128 on every
linear of a 7B those elementwise kernels were 16% of the step
(docs/benchmarks/speed-checks/15-24gb-lora-r128-profile/). Here the same arithmetic runs
with them folded into the matrix multiplies:

- forward: ``out = x W^T + b``, then ``out += s * (dropout(x) A^T) B^T`` as one ``addmm_``
  (cuBLAS applies the scaling and the add in the multiply's epilogue);
- backward: the scaling is applied to the r-wide product, not the output-wide one; the
  adapter's input gradient is added into the base's with one ``addmm_`` (no dropout) or
  one ``addcmul_`` with the dropout mask (dropout), never as tensors of their own.

It is the same training: the dropout mask is drawn by the same op from the same generator
as PEFT's ``nn.Dropout``, so a seed gives the same masks (and torch.utils.checkpoint's RNG
replay gives the recomputation the same ones); only roundings differ, since the scaling and
the add happen in the multiply's fp32 accumulator instead of in 16-bit tensors
(tests/test_fused_lora.py checks outputs and gradients against PEFT's). What is saved for
the backward is what PEFT saves (the dropped-out input and its mask, the r-wide product),
less the 16-bit copies of the adapter weights that autocast keeps: those are cast again in
the backward.

Only the plain case is taken over: a PEFT ``lora.Linear`` on a ``torch.nn.Linear`` with
one active adapter, no DoRA or other variant, no LoRA bias, weights (and, under autocast,
the compute dtype) in one dtype. Anything else, and every call where the adapter is off
or merged, runs PEFT's own forward. Not under ZeRO-3, whose hooks gather a weight only
when its module is called (train.py does not install it there).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F


class LoraLinearFunction(torch.autograd.Function):
    """``x W^T + b + s * dropout_p(x) A^T B^T``, with A and B cast to x's dtype."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float, p: float):
        out = F.linear(x, weight, bias)
        x2 = x.reshape(-1, x.shape[-1])
        if p > 0:
            dropped, mask = torch.native_dropout(x2, p, True)
        else:
            dropped, mask = x2, None
        a = dropped @ lora_a.to(x.dtype).t()  # (tokens, r)
        out.view(-1, out.shape[-1]).addmm_(a, lora_b.to(x.dtype).t(), alpha=scaling)
        ctx.scaling, ctx.p = scaling, p
        ctx.save_for_backward(weight, dropped, mask, a, lora_a, lora_b)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        weight, dropped, mask, a, lora_a, lora_b = ctx.saved_tensors
        s, p = ctx.scaling, ctx.p
        g = grad_out.reshape(-1, grad_out.shape[-1])
        if g.dtype != a.dtype:
            g = g.to(a.dtype)
        need_x, _, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        grad_x = grad_bias = grad_a = grad_b = None
        if need_b:
            grad_b = (g.t() @ a).to(lora_b.dtype).mul_(s)
        ga = (g @ lora_b.to(g.dtype)).mul_(s)  # the gradient at lora_A's output, r wide
        if need_a:
            grad_a = (ga.t() @ dropped).to(lora_a.dtype)
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
        return grad_x, None, grad_bias, grad_a, grad_b, None, None


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    kind = x.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return x.dtype


def _fused_args(layer, x: torch.Tensor, args, kwargs):
    """The function's arguments when this call is the plain case, else None."""
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
    base = layer.base_layer
    if type(base) is not torch.nn.Linear or base.weight.requires_grad:
        return None
    dtype = _compute_dtype(x)
    if x.dtype != dtype or base.weight.dtype != dtype or not dtype.is_floating_point:
        return None
    bias = base.bias
    if bias is not None and bias.dtype != dtype:
        return None
    dropout = layer.lora_dropout[name]
    p = float(dropout.p) if isinstance(dropout, torch.nn.Dropout) and dropout.training else 0.0
    return (x, base.weight, bias, layer.lora_A[name].weight, layer.lora_B[name].weight, float(layer.scaling[name]), p)


def _forward(self, x, *args, **kwargs):
    fused = _fused_args(self, x, args, kwargs)
    if fused is None:
        return self._vramfit_peft_forward(x, *args, **kwargs)
    return LoraLinearFunction.apply(*fused)


def install(model) -> int:
    """Route every PEFT ``lora.Linear`` over a plain ``nn.Linear`` through the fused function
    (per call: it falls back to PEFT's forward whenever the call is not the plain case).
    Returns how many layers were routed."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    n = 0
    for module in model.modules():
        if type(module) is LoraLinear and type(module.base_layer) is torch.nn.Linear and not hasattr(module, "_vramfit_peft_forward"):
            module._vramfit_peft_forward = module.forward
            module.forward = types.MethodType(_forward, module)
            n += 1
    return n

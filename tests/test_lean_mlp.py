"""kernels.lean_mlp (lean_mlp.py): in a checkpointed layer's recomputation,
liger's SwiGLU before an unadapted 4-bit down_proj saves its tensors and skips its kernel.
On the CPU with a stand-in for liger's function (liger's kernels need a GPU) that saves
exactly what liger 0.8's does; on a GPU with liger itself."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from test_fused_lora import tiny_qlora


class StandInSiLUMul(torch.autograd.Function):
    """LigerSiLUMulFunction's saving, in plain torch: contiguous inputs, saved as rows x
    columns after the output is computed; gradients in the output's shape."""

    forwards = 0

    @staticmethod
    def forward(ctx, a, b):
        StandInSiLUMul.forwards += 1
        a, b = a.contiguous(), b.contiguous()
        shape, n = a.shape, a.shape[-1]
        a, b = a.view(-1, n), b.view(-1, n)
        c = (F.silu(a.float()) * b.float()).to(a.dtype)
        ctx.save_for_backward(a, b)
        return c.view(shape)

    @staticmethod
    def backward(ctx, dc):
        a, b = ctx.saved_tensors
        with torch.enable_grad():
            a_, b_ = a.detach().requires_grad_(), b.detach().requires_grad_()
            c = (F.silu(a_.float()) * b_.float()).to(a.dtype)
            da, db = torch.autograd.grad(c, (a_, b_), dc.reshape(c.shape))
        return da.view(dc.shape), db.view(dc.shape)


def stand_in_forward(self, x):
    return self.down_proj(StandInSiLUMul.apply(self.gate_proj(x), self.up_proj(x)))


@pytest.fixture(scope="module")
def qlora_qv(tmp_path_factory):
    """LoRA on q and v only: down_proj stays a frozen Linear4bit, as in the 8 GB plan."""
    return tiny_qlora(tmp_path_factory.mktemp("tiny-4bit-qv"), ["q_proj", "v_proj"])


def _step(model, lean: bool, ids, is_swiglu=lambda mlp: True):
    """One checkpointed step, the MLPs running the stand-in: (loss, gradients, how many
    SwiGLU forwards ran, how many MLPs lean_mlp took)."""
    import types

    from vramfit.fused_lora import lean_checkpointing
    from vramfit.lean_mlp import install
    from vramfit.offload import outermost_layers

    model = copy.deepcopy(model)
    layers = outermost_layers(model)
    for layer in layers:
        layer.mlp.forward = types.MethodType(stand_in_forward, layer.mlp)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    took = 0
    if lean:
        took = install(layers, model.config.model_type, is_swiglu=is_swiglu)
        assert install(layers, model.config.model_type, is_swiglu=is_swiglu) == 0  # once per MLP
        lean_checkpointing(layers)
    StandInSiLUMul.forwards = 0
    torch.manual_seed(7)  # the same dropout masks
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, StandInSiLUMul.forwards, took


def test_recomputation_skips_the_swiglu_and_keeps_every_gradient(qlora_qv):
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    layers = qlora_qv.config.num_hidden_layers
    loss, grads, ran, _ = _step(qlora_qv, False, ids)
    loss_l, grads_l, ran_l, took = _step(qlora_qv, True, ids)
    assert took == layers
    assert ran == 2 * layers and ran_l == layers  # the forward's only: no recomputation ran it
    assert loss_l == loss and grads.keys() == grads_l.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads_l[name], grads[name], rtol=0, atol=0, msg=name)


def test_without_early_stop_the_skip_stands_down(qlora_qv):
    from torch.utils.checkpoint import set_checkpoint_early_stop

    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(2))
    loss, grads, _, _ = _step(qlora_qv, False, ids)
    with set_checkpoint_early_stop(False):
        loss_l, grads_l, ran_l, took = _step(qlora_qv, True, ids)
    assert took and ran_l == 2 * qlora_qv.config.num_hidden_layers and loss_l == loss
    for name in grads:
        torch.testing.assert_close(grads_l[name], grads[name], rtol=0, atol=0, msg=name)


def test_only_liger_mlps_before_an_unadapted_4bit_down_proj_are_taken(qlora_qv):
    from vramfit.lean_mlp import install, saves_nothing
    from vramfit.offload import outermost_layers

    model = copy.deepcopy(qlora_qv)
    layers = outermost_layers(model)
    assert all(saves_nothing(layer.mlp.down_proj) for layer in layers)
    assert install(layers, "qwen2") == 0  # the MLPs are transformers' own, not liger's
    assert install(layers, "gemma2", is_swiglu=lambda m: True) == 0  # a norm after the MLP reads its output
    assert not saves_nothing(torch.nn.Linear(4, 4).requires_grad_(False))  # 16-bit: its weight is saved
    assert not saves_nothing(layers[0].self_attn.q_proj)  # an adapter around it


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_cuda_liger_swiglu_recomputation_skips_its_kernel_same_gradients(tmp_path):
    pytest.importorskip("liger_kernel")
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction
    from liger_kernel.transformers import apply_liger_kernel_to_qwen2
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Qwen2Config, Qwen2ForCausalLM

    from vramfit.fused_lora import lean_checkpointing
    from vramfit.lean_mlp import install
    from vramfit.offload import outermost_layers

    torch.manual_seed(0)
    cfg = Qwen2Config(hidden_size=256, intermediate_size=704, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=512)  # fmt: skip
    Qwen2ForCausalLM(cfg).save_pretrained(tmp_path)
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                             bnb_4bit_use_double_quant=True)  # fmt: skip
    base = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, quantization_config=bnb, device_map={"": 0})
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"]))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    model.train()  # from_pretrained gives eval mode, where transformers does not checkpoint
    apply_liger_kernel_to_qwen2(model=model.get_base_model(), rope=True, rms_norm=True, swiglu=True, cross_entropy=False)
    ids = torch.randint(0, 512, (2, 128), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    runs = []
    real = LigerSiLUMulFunction.forward
    for lean in (False, True):
        m = copy.deepcopy(model)
        layers = outermost_layers(m)
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if lean:
            assert install(layers, "qwen2") == len(layers)
            lean_checkpointing(layers)
        calls = []
        LigerSiLUMulFunction.forward = staticmethod(lambda ctx, *a: calls.append(1) or real(ctx, *a))
        try:
            torch.manual_seed(7)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = m(input_ids=ids, labels=ids).loss
            loss.backward()
        finally:
            LigerSiLUMulFunction.forward = real
        runs.append((loss.item(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}, len(calls)))
    (loss, grads, calls), (loss_l, grads_l, calls_l) = runs
    assert calls == 2 * cfg.num_hidden_layers and calls_l == cfg.num_hidden_layers
    assert loss_l == loss and grads
    for name in grads:
        torch.testing.assert_close(grads_l[name], grads[name], rtol=0, atol=0, msg=name)

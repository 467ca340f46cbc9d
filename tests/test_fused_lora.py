"""kernels.fused_lora: PEFT's adapted linear layers as one autograd function. The same masks,
loss and gradients as PEFT's own forward, and PEFT's forward wherever the call is not the
plain case."""

from __future__ import annotations

import copy

import pytest
import torch

from test_memory_savers import _lora_bf16
from test_offload import LORA, tiny_model
from vramfit.fused_lora import LoraLinearFunction, install


def _lora_linears(model):
    """PEFT's LoRA layers that install() routes: over nn.Linear, and over bitsandbytes' 4-bit."""
    from peft.tuners.lora.layer import Linear

    from vramfit.fused_lora import _lora_4bit_class

    kinds = tuple(k for k in (Linear, _lora_4bit_class()) if k is not None)
    return [m for m in model.modules() if isinstance(m, kinds)]


def _step(model, fused: bool, ids, ckpt: bool = False, autocast: bool = False):
    model = copy.deepcopy(model)
    if fused:
        assert install(model) == len(_lora_linears(model)) > 0
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(7)  # the same dropout masks, if the same ops draw them
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
    with ctx:
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("ckpt", [False, True])
def test_fp32_step_is_peft_s(dropout, ckpt):
    model = tiny_model({**LORA, "lora_dropout": dropout})
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)  # a trained adapter, so its path and A's gradients count
    ids = torch.randint(3, 262, (2, 37))
    loss, grads = _step(model, False, ids, ckpt)
    loss_f, grads_f = _step(model, True, ids, ckpt)
    torch.testing.assert_close(loss_f, loss, rtol=1e-6, atol=1e-6)
    assert grads.keys() == grads_f.keys() and any("lora_A" in k for k in grads)
    for name in grads:
        torch.testing.assert_close(grads_f[name], grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("dropout", [0.0, 0.05])
def test_bf16_step_under_autocast_matches_peft_s_to_rounding(dropout):
    # bf16 weights, fp32 adapters, autocast: how the Trainer trains 16-bit LoRA. The fused
    # path adds the scaled adapter output in the multiply's fp32 accumulator, so the roundings
    # differ from PEFT's separate 16-bit mul and add; nothing else does.
    model = _lora_bf16(dropout)
    ids = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(1))
    loss, grads = _step(model, False, ids, autocast=True)
    loss_f, grads_f = _step(model, True, ids, autocast=True)
    assert abs(loss_f.item() - loss.item()) < 2e-3
    assert grads.keys() == grads_f.keys()
    for name in grads:
        if "lora_" in name:
            assert grads_f[name].dtype == torch.float32
            rel = (grads_f[name] - grads[name]).norm() / grads[name].norm()
            assert rel < 0.03, (name, rel.item())


def test_the_same_dropout_masks_as_peft_s():
    # If the fused path drew its masks differently, the outputs would differ far beyond rounding.
    torch.manual_seed(0)
    lin = _lora_linears(tiny_model({**LORA, "lora_dropout": 0.5}))[0]
    torch.nn.init.normal_(lin.lora_B["default"].weight, std=1.0)
    x = torch.randn(4, 9, lin.in_features)
    torch.manual_seed(3)
    ref = lin(x)
    install_on = copy.deepcopy(lin)
    install(install_on)
    torch.manual_seed(3)
    torch.testing.assert_close(install_on(x), ref, rtol=1e-5, atol=1e-5)
    torch.manual_seed(4)
    assert not torch.allclose(install_on(x), ref, rtol=1e-3, atol=1e-3)  # another draw is another mask


def test_peft_s_forward_runs_where_the_call_is_not_the_plain_case(monkeypatch):
    model = tiny_model({**LORA, "lora_dropout": 0.0})
    install(model)
    calls = []
    monkeypatch.setattr(LoraLinearFunction, "apply", lambda *a: calls.append(1) or pytest.fail("fused"))
    ids = torch.randint(3, 262, (1, 11))
    with model.disable_adapter():
        model(input_ids=ids)
    lin = _lora_linears(model)[0]
    lin.merge()
    lin(torch.randn(2, lin.in_features))
    lin.unmerge()
    assert calls == []
    monkeypatch.undo()
    # and the plain case does take the fused path
    monkeypatch.setattr(LoraLinearFunction, "apply", lambda *a: calls.append(1) or torch.zeros(()))
    lin(torch.randn(2, lin.in_features))
    assert calls == [1]


def test_installing_twice_routes_each_layer_once():
    model = tiny_model(LORA)
    n = install(model)
    assert n == len(_lora_linears(model)) and install(model) == 0


def test_eval_mode_draws_no_mask():
    model = tiny_model({**LORA, "lora_dropout": 0.5}).eval()
    ref = copy.deepcopy(model)
    install(model)
    ids = torch.randint(3, 262, (1, 11))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("dropout", [0.0, 0.05])
def test_cuda_bf16_step_matches_peft_s_to_rounding(dropout):
    # The reference is PEFT as train.py runs it under mixed precision: its fp32 input cast off
    # (_lora_inputs_uncast), so the dropout mask is drawn on the same 16-bit tensor. With the
    # cast on, CUDA's fused dropout maps its random numbers to elements differently for fp32
    # and bf16 (the CPU's does not), and the masks, though alike in law, differ.
    from peft.helpers import disable_input_dtype_casting

    model = _lora_bf16(dropout).cuda()
    ids = torch.randint(0, 300, (4, 64), generator=torch.Generator().manual_seed(1)).cuda()

    def run(fused):
        m = copy.deepcopy(model)
        if fused:
            install(m)
        torch.manual_seed(7)
        with torch.autocast("cuda", dtype=torch.bfloat16), disable_input_dtype_casting(m):
            loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in m.named_parameters() if p.grad is not None}

    (loss, grads), (loss_f, grads_f) = run(False), run(True)
    assert abs(loss_f.item() - loss.item()) < 2e-3
    for name in grads:
        rel = (grads_f[name] - grads[name]).norm() / grads[name].norm()
        assert rel < 0.03, (name, rel.item())


@pytest.mark.parametrize("ckpt", [False, True])
def test_fused_layers_with_their_saved_tensors_in_host_ram_train_the_same(ckpt):
    # train.offload_activations packs whatever the function saves (the mask among them) through
    # saved-tensor hooks: the step must be the one without them.
    from test_offload import step as offload_step

    model = tiny_model(LORA)
    install(model)
    ids = torch.randint(3, 262, (2, 37))
    loss, grads, _ = offload_step(model, ckpt, False, ids)
    loss_off, grads_off, moved = offload_step(model, ckpt, True, ids)
    assert moved[0] > 0 and loss_off == loss
    for name in grads:
        torch.testing.assert_close(grads_off[name], grads[name], rtol=0, atol=0, msg=name)


# ---------------------------------------------------------------- 4-bit (QLoRA) layers


def tiny_qlora(path, target_modules):
    """A tiny Qwen2 saved under ``path``, loaded in 4 bits by bitsandbytes (its CPU backend)
    with PEFT's LoRA on ``target_modules``, as QLoRA trains it; in training mode."""
    pytest.importorskip("bitsandbytes")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=300)  # fmt: skip
    Qwen2ForCausalLM(cfg).save_pretrained(path)
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    # On the CPU wherever the tests run (a GPU machine would place it on the GPU): these
    # tests compare CPU steps; the fused path's CUDA step has a test of its own.
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, quantization_config=bnb, device_map="cpu")
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=target_modules))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    return model.train()


@pytest.fixture(scope="module")
def qlora_model(tmp_path_factory):
    """PEFT's LoRA on every linear: PEFT's bnb Linear4bit layers."""
    return tiny_qlora(tmp_path_factory.mktemp("tiny-4bit"), "all-linear")


def test_4bit_layers_are_routed_and_train_as_peft_s_to_rounding(qlora_model):
    from vramfit.fused_lora import _lora_4bit_class

    layers = [m for m in qlora_model.modules() if type(m) is _lora_4bit_class()]
    assert layers and install(copy.deepcopy(qlora_model)) == len(layers)
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    for ckpt in (False, True):
        loss, grads = _step(qlora_model, False, ids, ckpt=ckpt, autocast=True)
        loss_f, grads_f = _step(qlora_model, True, ids, ckpt=ckpt, autocast=True)
        assert abs(loss_f.item() - loss.item()) < 2e-3
        assert grads.keys() == grads_f.keys() and any("lora_A" in k for k in grads)
        for name in grads:
            rel = (grads_f[name] - grads[name]).norm() / grads[name].norm()
            assert rel < 0.03, (name, rel.item())


def test_4bit_layers_outside_autocast_keep_peft_s_fp32_adapter_path(qlora_model, monkeypatch):
    # Without autocast PEFT runs the fp32 adapter in fp32: the fused path must not take it over.
    from vramfit.fused_lora import LoraBranchFunction

    model = copy.deepcopy(qlora_model)
    install(model)
    monkeypatch.setattr(LoraBranchFunction, "apply", lambda *a: pytest.fail("fused outside autocast"))
    model(input_ids=torch.randint(0, 300, (1, 8)))


# ---------------------------------------------------------------- kernels.lean_recompute


def _lean_step(model, lean: bool, ids, autocast: bool = False, device: str = "cpu"):
    """One checkpointed step with the layers routed (and, with ``lean``, down_proj flagged and
    the recomputation under checkpoint_contexts, as train.py sets it up): (loss, gradients,
    how many recomputations skipped the base multiply)."""
    from vramfit import fused_lora
    from vramfit.offload import outermost_layers

    model = copy.deepcopy(model)
    install(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    skipped = []
    if lean:
        layers = outermost_layers(model)
        assert fused_lora.mark_unused_outputs(model) == len(layers) > 0
        assert fused_lora.lean_checkpointing(layers) == len(layers)
        assert fused_lora.lean_checkpointing(layers) == len(layers)  # twice: wrapped once
        real = fused_lora._skips_base
        fused_lora_skips = lambda layer: skipped.append(real(layer)) or skipped[-1]  # noqa: E731
        fused_lora._skips_base = fused_lora_skips
    try:
        torch.manual_seed(7)
        ctx = torch.autocast(device, dtype=torch.bfloat16) if autocast else torch.autocast(device, enabled=False)
        with ctx:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    finally:
        if lean:
            fused_lora._skips_base = real
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, sum(skipped)


def test_lean_recompute_skips_down_proj_s_multiply_and_keeps_every_gradient():
    # dropout on: the recomputation must draw the same masks with the multiply left out
    model = tiny_model(LORA)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    ids = torch.randint(3, 262, (2, 37))
    loss, grads, none = _lean_step(model, False, ids)
    loss_l, grads_l, skipped = _lean_step(model, True, ids)
    layers = model.config.num_hidden_layers
    assert none == 0 and skipped == layers  # once per layer: each down_proj's recomputation
    assert loss_l == loss and grads.keys() == grads_l.keys()
    for name in grads:
        torch.testing.assert_close(grads_l[name], grads[name], rtol=0, atol=0, msg=name)


def test_lean_recompute_on_4bit_layers_skips_bitsandbytes_call_same_gradients(qlora_model):
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    loss, grads, _ = _lean_step(qlora_model, False, ids, autocast=True)
    loss_l, grads_l, skipped = _lean_step(qlora_model, True, ids, autocast=True)
    assert skipped == qlora_model.config.num_hidden_layers
    assert loss_l == loss
    for name in grads:
        torch.testing.assert_close(grads_l[name], grads[name], rtol=0, atol=0, msg=name)


def test_lean_recompute_output_that_is_read_fails_loudly_never_a_wrong_gradient(monkeypatch):
    # Without checkpoint's early stop the recomputation runs past down_proj into the residual
    # add. With early stop turned off, the skip stands down; were it taken anyway (forced
    # here), the meta output must make that an error, not garbage in a gradient.
    from torch.utils.checkpoint import set_checkpoint_early_stop

    from vramfit import fused_lora

    model = tiny_model(LORA)
    ids = torch.randint(3, 262, (2, 9))
    loss, grads, _ = _lean_step(model, False, ids)
    with set_checkpoint_early_stop(False):
        loss_l, grads_l, skipped = _lean_step(model, True, ids)
        assert skipped == 0 and loss_l == loss
        monkeypatch.setattr(fused_lora, "_early_stop", lambda: True)
        with pytest.raises(RuntimeError, match="meta"):
            _lean_step(model, True, ids)


def test_lean_recompute_flags_nothing_where_the_layer_does_not_end_in_down_proj():
    from vramfit.fused_lora import lean_checkpointing, mark_unused_outputs
    from vramfit.offload import outermost_layers

    model = tiny_model(LORA)
    install(model)
    model.config.model_type = "gemma2"  # a norm after the MLP: its output is read
    assert mark_unused_outputs(model) == 0
    model.config.model_type = "qwen2"
    unrouted = tiny_model(LORA)  # PEFT's own layers: nothing of ours to skip
    assert mark_unused_outputs(unrouted) == 0
    # a reentrant checkpoint (no early stop to rest on) is left alone
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    assert lean_checkpointing(outermost_layers(model)) == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_cuda_lean_recompute_keeps_every_gradient():
    # bf16 weights, fp32 adapters, autocast, dropout on: as the Trainer trains 16-bit LoRA on a GPU.
    model = tiny_model({**LORA, "lora_dropout": 0.05}).to("cuda", torch.bfloat16)
    for n, p in model.named_parameters():
        if "lora_" in n:
            p.data = p.data.float()
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    ids = torch.randint(3, 262, (2, 64), device="cuda")
    loss, grads, _ = _lean_step(model, False, ids, autocast=True, device="cuda")
    loss_l, grads_l, skipped = _lean_step(model, True, ids, autocast=True, device="cuda")
    assert skipped == model.config.num_hidden_layers and torch.equal(loss_l, loss)
    for name in grads:
        torch.testing.assert_close(grads_l[name], grads[name], rtol=1e-6, atol=0, msg=name)

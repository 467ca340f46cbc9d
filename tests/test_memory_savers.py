"""train.offload_embeddings (offload.embeddings_on_host) and kernels.tiled_mlp (tiled_mlp.py),
in process on CPU: training computes the same loss and gradients with them, and the memory
model and auto-fit count what they save."""

from __future__ import annotations

import copy

import pytest
import torch

from test_offload import LORA, tiny_model
from vramfit.config import RunConfig
from vramfit.errors import ConfigError
from vramfit.fit import auto_fit
from vramfit.hardware import fake_facts
from vramfit.memory import estimate, layer_activation_bytes, mlp_shards
from vramfit.model_shape import shape_from_config
from vramfit.offload import embeddings_on_host
from vramfit.plan import build_plan


def step(model, ckpt: bool, embeddings: bool = False, tiled: bool = False, ids=None, overlap: bool = False, host_ids=None):
    model = copy.deepcopy(model)
    if embeddings:
        host = embeddings_on_host(model, overlap=overlap)
        host.expect(host_ids)  # the collator's CPU copy of the ids (train.py hands it over)
        if ids is not None and ids.is_cuda:
            model.get_input_embeddings().to("cpu")  # the rest of the model stays where it is
    if tiled:
        from vramfit.tiled_mlp import install

        assert install(model) == model.config.num_hidden_layers
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(1)  # same dropout masks in both runs
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("ckpt", [False, True])
def test_embeddings_in_host_ram_train_the_same(ckpt):
    model = tiny_model(LORA, tie_word_embeddings=False)
    ids = torch.randint(3, 262, (2, 37))
    loss, grads = step(model, ckpt, ids=ids)
    loss_h, grads_h = step(model, ckpt, embeddings=True, ids=ids)
    assert loss_h == loss
    assert grads.keys() == grads_h.keys()
    for name in grads:
        torch.testing.assert_close(grads_h[name], grads[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("overlap", [False, True])
def test_overlapped_lookup_on_a_cpu_run_is_the_plain_one(overlap):
    # train.offload_embeddings_async takes over only where the ids come from a GPU.
    model = tiny_model(LORA, tie_word_embeddings=False)
    ids = torch.randint(3, 262, (2, 37))
    loss, grads = step(model, True, ids=ids)
    loss_h, grads_h = step(model, True, embeddings=True, ids=ids, overlap=overlap)
    assert loss_h == loss
    for name in grads:
        torch.testing.assert_close(grads_h[name], grads[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("rows", [37, 5000])
def test_overlapped_lookups_gather_split_over_threads_is_index_select(rows):
    from vramfit.offload import _OverlappedLookup

    lookup = _OverlappedLookup()
    lookup.threads = 3  # whatever this machine's cores: 5000 rows make three slices
    weight = torch.randn(700, 24, dtype=torch.bfloat16)
    ids = torch.randint(0, 700, (rows,))
    out = torch.empty(rows, 24, dtype=torch.bfloat16)
    lookup.gather(weight, ids, out)
    assert torch.equal(out, weight.index_select(0, ids))
    assert (lookup.pool is not None) == (rows >= 2 * lookup.GATHER_SPLIT_ROWS)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("shape", [(2, 37), (4, 600)])  # the second splits the gather over threads
@pytest.mark.parametrize("host_ids", [False, True])  # the collator's CPU ids, or read back on a side stream
def test_cuda_overlapped_lookup_gives_the_same_rows_and_gradients(shape, host_ids):
    from vramfit import offload

    model = tiny_model(LORA, tie_word_embeddings=False).to("cuda")
    ids = torch.randint(3, 262, shape, device="cuda")
    used, read_back = [], []
    real, real_ids = offload._OverlappedLookup.rows, offload._OverlappedLookup.ids
    offload._OverlappedLookup.rows = lambda self, w, i: used.append(1) or real(self, w, i)
    offload._OverlappedLookup.ids = lambda self, i: read_back.append(1) or real_ids(self, i)
    try:
        loss, grads = step(model, True, embeddings=True, ids=ids)
        loss_o, grads_o = step(model, True, embeddings=True, ids=ids, overlap=True, host_ids=ids.cpu() if host_ids else None)
    finally:
        offload._OverlappedLookup.rows, offload._OverlappedLookup.ids = real, real_ids
    assert used and loss_o == loss
    assert bool(read_back) != host_ids  # with the CPU ids nothing is read back from the GPU
    for name in grads:
        torch.testing.assert_close(grads_o[name], grads[name], rtol=0, atol=0, msg=name)


def test_embeddings_in_host_ram_are_moved_back_after_the_model_is():
    """Accelerate's prepare moves a non-quantized model to its device whole: place() undoes it
    for the table alone, and the lookup's rows go back to the device the ids came from."""
    model = tiny_model(LORA, tie_word_embeddings=False)
    place = embeddings_on_host(model).place
    emb = model.get_input_embeddings()
    assert emb.weight.device.type == "cpu"
    seen = []
    emb.register_forward_hook(lambda m, a, out: seen.append((a[0].device.type, out.device.type)))
    model.to("meta")  # stands in for the GPU: every parameter leaves host RAM
    assert emb.weight.device.type == "meta"
    emb.to_empty(device="cpu")  # a meta tensor has no values to copy back
    place()
    assert emb.weight.device.type == "cpu"
    out = emb(torch.tensor([[3, 4]]))
    assert out.device.type == "cpu" and seen == [("cpu", "cpu")]


def test_trainable_embeddings_are_refused():
    model = tiny_model(None, tie_word_embeddings=False)  # full fine-tuning: every weight trains
    with pytest.raises(ValueError, match="trainable"):
        embeddings_on_host(model)


NO_DROPOUT = [{"r": 4, "target_modules": "all-linear", "lora_dropout": 0.0}, {"r": 4, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0}]


@pytest.mark.parametrize("ckpt", [False, True])
@pytest.mark.parametrize("lora", NO_DROPOUT)
def test_tiled_mlp_trains_the_same(ckpt, lora):
    """Without dropout the chunked MLP computes what the whole one does. (With dropout the
    chunks draw other masks than the whole tensor would: a different sample, not an error.)"""
    model = tiny_model(lora)
    hidden = model.config.hidden_size
    seq = 3 * hidden + 5  # four chunks, the last one short
    assert mlp_shards(hidden, seq) == 4
    ids = torch.randint(3, 262, (2, seq))
    loss, grads = step(model, ckpt, ids=ids)
    loss_t, grads_t = step(model, ckpt, tiled=True, ids=ids)
    assert loss_t == pytest.approx(loss, rel=1e-6)
    assert grads.keys() == grads_t.keys()
    for name in grads:
        torch.testing.assert_close(grads_t[name], grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("ckpt", [False, True])
def test_tiled_mlp_with_dropout_computes_the_losss_own_gradient(ckpt):
    """TiledMLP recomputes each chunk in the backward; unless that replays the forward's
    dropout masks, the gradient is not the one of the loss it returned. Checked against a
    central difference along the gradient, in float64, each forward from the same seed."""
    from vramfit.tiled_mlp import install

    model = tiny_model({"r": 4, "target_modules": "all-linear", "lora_dropout": 0.3}, dtype=torch.float64)
    with torch.no_grad():  # LoRA's B starts at zero, which would hide the masks from the loss
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    install(model)
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(3, 262, (2, 2 * model.config.hidden_size + 9))
    params = [p for p in model.parameters() if p.requires_grad]

    def loss_at() -> torch.Tensor:
        torch.manual_seed(7)
        return model(input_ids=ids, labels=ids).loss

    loss_at().backward()
    grad = [p.grad.clone() for p in params]
    norm = torch.sqrt(sum((g * g).sum() for g in grad))
    # The loss comes out of transformers in fp32 (it upcasts the logits): eps large enough
    # for its rounding, small enough for the curvature.
    eps = 1e-2
    with torch.no_grad():
        for p, g in zip(params, grad):
            p.add_(eps * g / norm)
    up = loss_at().item()  # with gradients on, as in training: without, the MLP takes the plain path
    with torch.no_grad():
        for p, g in zip(params, grad):
            p.sub_(2 * eps * g / norm)
    down = loss_at().item()
    assert (up - down) / (2 * eps) == pytest.approx(norm.item(), rel=2e-3)


def test_tiled_mlp_leaves_short_sequences_and_evaluation_alone():
    from vramfit.tiled_mlp import install

    model = tiny_model(LORA)
    install(model)
    mlp = model.get_base_model().model.layers[0].mlp
    hidden = model.config.hidden_size

    def tiled(out: torch.Tensor) -> bool:
        seen, todo = set(), [out.grad_fn]
        while todo:
            fn = todo.pop()
            if fn is not None and fn not in seen:
                seen.add(fn)
                todo += [f for f, _ in fn.next_functions]
        return any("TiledMLP" in fn.name() for fn in seen)

    assert not tiled(mlp(torch.randn(2, hidden, hidden, requires_grad=True)))  # one chunk: the plain path
    assert tiled(mlp(torch.randn(2, hidden + 1, hidden, requires_grad=True)))
    with torch.no_grad():
        assert mlp(torch.randn(1, 4 * hidden, hidden)).grad_fn is None


# ------------------------------------------------------------------ the memory model and auto-fit

QWEN7B = {
    "model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
    "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064, "tie_word_embeddings": False,
}  # fmt: skip


def cfg(**sets) -> RunConfig:
    data = {"method": "qlora", "lora": {"r": 8, "target_modules": ["q_proj", "v_proj"]}}
    for key, value in sets.items():
        section, _, name = key.partition("__")
        data.setdefault(section, {})[name] = value
    return RunConfig.model_validate(data)


def test_embeddings_in_host_ram_leave_the_gpu_by_their_bytes():
    shape = shape_from_config(QWEN7B)
    plain, host = cfg(), cfg(train__offload_embeddings=True)
    table = shape.embed_params * 2
    assert estimate(shape, plain).weights - estimate(shape, host).weights == table
    # On a CPU run the table is in host RAM either way.
    assert estimate(shape, plain, device="cpu").weights == estimate(shape, host, device="cpu").weights


def test_tiled_mlp_shrinks_a_layers_activations_only_past_one_chunk():
    shape = shape_from_config(QWEN7B)
    for seq, smaller in ((2048, False), (16384, True)):
        plain = layer_activation_bytes(shape, cfg(data__seq_len=seq), 2)
        tiled = layer_activation_bytes(shape, cfg(data__seq_len=seq, kernels__tiled_mlp=True), 2)
        assert (tiled < plain) == smaller and tiled <= plain
    # Most of a 7B layer's activations are the MLP's: tiling 16k tokens in 5 chunks removes
    # 4/5 of its three intermediates.
    from vramfit.memory import ACT_OTHER

    plain = layer_activation_bytes(shape, cfg(data__seq_len=16384), 2)
    tiled = layer_activation_bytes(shape, cfg(data__seq_len=16384, kernels__tiled_mlp=True), 2)
    i = shape.intermediate
    mlp = 2 * 3 * i  # bytes per token (this adapter, q/v, has no copies of the MLP's inputs)
    assert plain - tiled == pytest.approx(16384 * mlp * (1 - 1 / 5) * (1 + ACT_OTHER))
    assert tiled < 0.6 * plain


@pytest.mark.parametrize(
    "sets, match",
    [
        ({"method": "full", "train": {"offload_embeddings": True}}, "lora or qlora"),
        ({"train": {"offload_embeddings": True}, "deepspeed": {"stage": 2}}, "one GPU"),
        ({"train": {"offload_embeddings": True}, "launch": {"gpus": 2}}, "one GPU"),
    ],
)
def test_offload_embeddings_is_refused_where_it_cannot_work(sets, match):
    with pytest.raises(ValueError, match=match):
        RunConfig.model_validate(sets)


def test_a_tied_model_cannot_keep_its_embeddings_in_host_ram():
    shape = shape_from_config({**QWEN7B, "tie_word_embeddings": True})
    with pytest.raises(ConfigError, match="shares the input embedding"):
        build_plan(cfg(train__offload_embeddings=True), shape, fake_facts(80))


def test_auto_fit_uses_the_savers_on_a_fake_8gb_card_only_where_they_pay():
    """Qwen2.5-7B QLoRA r8 q/v at micro-batch 1 on an 8 GB card, the sequence pinned: at 2048
    tokens with every layer checkpointed (pinned) freeing the embedding table buys nothing;
    left to the planner, it buys fewer layers checkpointed (train.grad_ckpt_layers); at 512
    it buys dropping checkpointing, at 8192 a plan that fits at all without the slower tiled
    MLP. Each choice is explained."""
    shape = shape_from_config(QWEN7B)
    pinned = {"method", "lora.r", "lora.target_modules", "train.micro_batch", "train.grad_accum", "data.seq_len"}

    def fit(seq: int, also: frozenset = frozenset()):
        base = cfg(train__micro_batch=1, train__grad_accum=1, data__seq_len=seq, train__grad_ckpt=True)
        plan, lines = auto_fit(base, pinned | also, shape, 8, "NVIDIA H200", None, fused_available=True)
        assert estimate(shape, plan).peak_gib <= 8 * 0.95
        return plan, lines

    mid, lines = fit(2048, frozenset({"train.grad_ckpt"}))
    assert not mid.train.offload_embeddings and mid.train.grad_ckpt and mid.train.grad_ckpt_layers is None
    assert "train.offload_embeddings false: freeing the embedding table would fit nothing faster here" in lines
    fewer, lines = fit(2048)
    assert fewer.train.offload_embeddings and 0 < fewer.train.grad_ckpt_layers < shape.layers
    assert any(line.startswith("train.offload_embeddings true: ") and "faster plan fits" in line for line in lines)
    short, lines = fit(512)
    assert short.train.offload_embeddings and not short.train.grad_ckpt
    assert any(line.startswith("train.offload_embeddings true: ") and "faster plan fits" in line for line in lines)
    assert not short.kernels.tiled_mlp  # 512 tokens are one chunk
    long, _ = fit(8192)
    assert long.train.offload_embeddings and not long.kernels.tiled_mlp


# ---------------------------------------------------------------- 16-bit LoRA inputs kept in 16 bits


def _lora_bf16(dropout: float):
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=300)  # fmt: skip
    model = get_peft_model(Qwen2ForCausalLM(cfg).to(torch.bfloat16), LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules="all-linear"))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)  # a trained adapter: its path counts
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}  # PEFT's fp32 adapters
    return model


def _bf16_step(model, uncast: bool):
    from types import SimpleNamespace

    from vramfit.train import _lora_inputs_uncast

    model = copy.deepcopy(model)
    ids = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(123)
    args = SimpleNamespace(bf16=uncast, fp16=False)
    with _lora_inputs_uncast(model, RunConfig(method="lora"), args), torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def test_16bit_lora_inputs_kept_in_16_bits_train_the_same_under_autocast():
    # PEFT casts each adapted layer's input to the adapters' fp32; under autocast lora_A's matmul
    # runs in 16 bits either way, so without the cast the loss and every gradient are the same.
    model = _lora_bf16(dropout=0.0)
    (l1, g1), (l2, g2) = _bf16_step(model, uncast=False), _bf16_step(model, uncast=True)
    assert torch.equal(l1, l2) and g1.keys() == g2.keys() and len(g1) > 0
    assert all(torch.equal(g1[k], g2[k]) for k in g1)


def test_16bit_lora_inputs_are_cast_outside_mixed_precision():
    from contextlib import nullcontext
    from types import SimpleNamespace

    from vramfit.train import _lora_inputs_uncast

    model = _lora_bf16(dropout=0.05)
    assert isinstance(_lora_inputs_uncast(model, RunConfig(method="lora"), SimpleNamespace(bf16=False, fp16=False)), nullcontext)
    assert isinstance(_lora_inputs_uncast(model, RunConfig(method="qlora"), SimpleNamespace(bf16=True, fp16=False)), nullcontext)
    with _lora_inputs_uncast(model, RunConfig(method="lora"), SimpleNamespace(bf16=True, fp16=False)):
        assert not any(getattr(m, "cast_input_dtype_enabled", False) for m in model.modules() if hasattr(m, "lora_A"))
    assert all(m.cast_input_dtype_enabled for m in model.modules() if hasattr(m, "lora_A"))  # restored after training

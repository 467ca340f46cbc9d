"""train.grad_ckpt_layers: checkpointing only the first N decoder layers. The Trainer
recomputes exactly those in the backward and trains the same; the memory and speed models
count N layers' inputs and recomputation and the other layers' saved activations; auto-fit
checkpoints as few layers as fit where that pays, and leaves what the user pinned alone."""

from __future__ import annotations

import copy

import pytest
import torch

from test_memory_savers import QWEN7B
from test_offload import LORA, tiny_model
from vramfit.config import RunConfig
from vramfit.errors import ConfigError
from vramfit.fit import PARTIAL_CKPT_MIN_GAIN, SAFETY_MARGIN, auto_fit
from vramfit.memory import _activation_sizes, checkpointed_layers, estimate
from vramfit.model_shape import shape_from_config
from vramfit.offload import outermost_layers
from vramfit.speed import LengthStats, estimate_speed
from vramfit.train import PartialCheckpointing


def count_mlp_calls(model) -> list[int]:
    """How often each decoder layer's MLP starts; a recomputed layer starts it twice per step.
    (The MLP, not the layer: transformers' own hooks sit outside the checkpoint. A pre-hook:
    torch's recomputation stops early once it has what the backward needs, inside the MLP.)"""
    calls = [0] * len(outermost_layers(model))
    for i, layer in enumerate(outermost_layers(model)):
        layer.mlp.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    return calls


def step(model, ckpt_layers: int | None, ids):
    model = copy.deepcopy(model)
    calls = count_mlp_calls(model)
    if ckpt_layers is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        PartialCheckpointing(outermost_layers(model), ckpt_layers).on_train_begin(None, None, None)
    torch.manual_seed(1)  # same dropout masks in every run
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, calls


def test_only_the_first_layers_are_recomputed_and_the_step_is_the_same():
    model = tiny_model(LORA)
    layers = model.config.num_hidden_layers
    assert layers >= 3
    ids = torch.randint(3, 262, (2, 29))
    loss, grads, calls = step(model, None, ids)
    assert calls == [1] * layers
    for n in (1, layers - 1, layers):
        loss_p, grads_p, calls_p = step(model, n, ids)
        assert calls_p == [2] * n + [1] * (layers - n)
        assert loss_p == loss
        for name in grads:
            torch.testing.assert_close(grads_p[name], grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_the_trainer_keeps_the_split_after_it_turns_checkpointing_on(tmp_path):
    """The Trainer turns checkpointing on for every layer when training begins; the callback
    must run after that, in the installed transformers (CI runs this on 5.17 too)."""
    from transformers import Trainer, TrainingArguments

    model = tiny_model(LORA)
    layers = outermost_layers(model)
    calls = count_mlp_calls(model)
    ids = torch.randint(3, 262, (17,))
    rows = [{"input_ids": ids, "labels": ids} for _ in range(2)]
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False}, report_to=[], use_cpu=True, save_strategy="no",
    )  # fmt: skip
    Trainer(model=model, args=args, train_dataset=rows, callbacks=[PartialCheckpointing(layers, 1)]).train()
    assert calls == [2] + [1] * (len(layers) - 1)


@pytest.mark.parametrize(
    "sets, match",
    [
        ({"train": {"grad_ckpt": False, "grad_ckpt_layers": 4}}, "needs train.grad_ckpt true"),
        ({"train": {"grad_ckpt_layers": 4, "offload_activations": True}}, "does not combine"),
        ({"train": {"grad_ckpt_layers": 0}}, "greater than 0"),
    ],
)
def test_bad_combinations_are_refused(sets, match):
    with pytest.raises(ValueError, match=match):
        RunConfig.model_validate(sets)


def lora24(**train) -> RunConfig:
    return RunConfig.model_validate(
        {"method": "lora", "data": {"seq_len": 1024}, "train": {"micro_batch": 4, "grad_accum": 4, **train},
         "kernels": {"fused_loss": True}}  # fmt: skip
    )


def test_the_memory_model_counts_inputs_for_checkpointed_layers_and_activations_for_the_rest():
    shape = shape_from_config(QWEN7B)
    L = shape.layers
    every, none = lora24(), lora24(grad_ckpt=False)
    assert checkpointed_layers(shape, every) == L and checkpointed_layers(shape, none) == 0
    assert checkpointed_layers(shape, lora24(grad_ckpt_layers=10 * L)) == L
    assert estimate(shape, lora24(grad_ckpt_layers=L)).peak == estimate(shape, every).peak
    block_input, layer_acts, _ = _activation_sizes(shape, every, 2, None)
    peaks = []
    for n in (1, L // 2):
        bd = estimate(shape, lora24(grad_ckpt_layers=n))
        assert bd.phase == "loss"  # the fused loss's peak: every saved activation held
        assert bd.activations == pytest.approx(n * block_input + (L - n) * layer_acts)
        peaks.append(bd.peak)
    # Each layer recomputed instead of kept saves its activations less its input.
    assert estimate(shape, none).peak > peaks[0] > peaks[1] > estimate(shape, every).peak
    # With one layer kept the backward is the peak: the recomputation holds the checkpointed
    # layers' inputs, one fewer than with every layer checkpointed.
    bd = estimate(shape, lora24(grad_ckpt_layers=L - 1))
    assert bd.phase == "backward" and bd.activations == pytest.approx(estimate(shape, every).activations - block_input)


def test_the_speed_model_counts_the_recomputation_of_the_checkpointed_layers_only():
    shape = shape_from_config(QWEN7B)
    lengths = LengthStats((1024,))
    speeds = [estimate_speed(shape, lora24(grad_ckpt_layers=n), lengths, "NVIDIA H200").tokens_per_s for n in range(1, shape.layers + 1)]
    assert speeds == sorted(speeds, reverse=True) and len(set(speeds)) == len(speeds)
    assert speeds[-1] == estimate_speed(shape, lora24(), lengths, "NVIDIA H200").tokens_per_s
    assert speeds[0] < estimate_speed(shape, lora24(grad_ckpt=False), lengths, "NVIDIA H200").tokens_per_s


def fit24(pinned: set[str] = frozenset(), **train):
    """The 7B's LoRA at 1024 tokens on a fake 24 GiB card: with 16-bit weights every layer
    checkpointed leaves room, but not for every layer's activations."""
    shape = shape_from_config(QWEN7B)
    base = RunConfig.model_validate({"method": "lora", "data": {"seq_len": 1024}, "train": {"micro_batch": 4, "grad_accum": 4, **train}})
    pins = {"method", "data.seq_len", *pinned}
    cfg, lines = auto_fit(base, pins, shape, 24, "NVIDIA H200", LengthStats((1024,)), host_ram_bytes=256 << 30, fused_available=True)
    return shape, cfg, lines


def test_auto_fit_checkpoints_as_few_layers_as_fit_where_that_pays():
    shape, cfg, lines = fit24()
    n = cfg.train.grad_ckpt_layers
    assert cfg.train.grad_ckpt and n is not None and 0 < n < shape.layers
    limit = 24 * (1 - SAFETY_MARGIN)
    def peak(c):  # as auto-fit asks: every example 1024 tokens
        return estimate(shape, c, "bfloat16", "cuda", 1024, 1024).peak_gib

    assert peak(cfg) <= limit
    fewer = cfg.model_copy(update={"train": cfg.train.model_copy(update={"grad_ckpt_layers": n - 1})})
    assert peak(fewer) > limit  # the fewest that fit
    every = cfg.model_copy(update={"train": cfg.train.model_copy(update={"grad_ckpt_layers": None})})
    lengths = LengthStats((1024,))
    gain = estimate_speed(shape, cfg, lengths, "NVIDIA H200").tokens_per_s / estimate_speed(shape, every, lengths, "NVIDIA H200").tokens_per_s
    assert gain >= 1 + PARTIAL_CKPT_MIN_GAIN
    line = next(x for x in lines if x.startswith("train.grad_ckpt "))
    assert f"train.grad_ckpt_layers {n}: only the first {n} layers are recomputed" in line
    assert "with every layer checkpointed" in line


def test_auto_fit_leaves_pinned_checkpointing_alone():
    _, cfg, lines = fit24({"train.grad_ckpt"}, grad_ckpt=True)
    assert cfg.train.grad_ckpt and cfg.train.grad_ckpt_layers is None
    assert "train.grad_ckpt true: pinned" in lines
    _, cfg, lines = fit24({"train.grad_ckpt_layers"}, grad_ckpt_layers=20)
    assert cfg.train.grad_ckpt and cfg.train.grad_ckpt_layers == 20
    assert "train.grad_ckpt true, train.grad_ckpt_layers 20: pinned" in lines


def test_a_pinned_count_is_refused_with_a_one_line_error_where_it_conflicts(tmp_path):
    from vramfit.presets import resolve_layers

    with pytest.raises(ConfigError, match="grad_ckpt_layers needs train.grad_ckpt true"):
        resolve_layers("cpu", None, {}, ["train.grad_ckpt_layers=2"])

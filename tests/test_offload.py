"""train.offload_activations' hooks (offload.py), in process on CPU: what they move, and
that training computes the same gradients with them."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from vramfit.config import RunConfig
from vramfit.memory import OFFLOAD_SAVED_COPIES, layer_activation_bytes
from vramfit.model_shape import shape_from_config
from vramfit.offload import HostActivations, InlineCopies, install, outermost_layers

def tiny_config(**over) -> dict:
    from importlib.resources import files

    cfg = json.loads(files("vramfit.embedded").joinpath("tiny_config.json").read_text())
    cfg.update(over)
    return cfg


def tiny_model(lora: dict | None, dtype=torch.float32, **over) -> nn.Module:
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**tiny_config(**over))).to(dtype)
    if lora is not None:
        model = get_peft_model(model, LoraConfig(**lora))
    return model.train()


def step(model: nn.Module, ckpt: bool, offload: bool, ids: torch.Tensor):
    """One forward and backward: (loss, gradients, (tensors, bytes) moved or None)."""
    model = copy.deepcopy(model)
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    hooks = HostActivations(pin_memory=False) if offload else None
    if hooks:
        assert install(model, hooks) == model.config.num_hidden_layers
    torch.manual_seed(1)  # same dropout masks in both runs
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.item(), grads, hooks.reset() if hooks else None


LORA = {"r": 4, "target_modules": "all-linear", "lora_dropout": 0.1}


@pytest.mark.parametrize("ckpt", [False, True])
def test_same_loss_and_gradients_with_activations_in_host_ram(ckpt):
    model = tiny_model(LORA)
    ids = torch.randint(3, 262, (2, 37))
    loss, grads, _ = step(model, ckpt, False, ids)
    loss_off, grads_off, moved = step(model, ckpt, True, ids)
    assert moved[0] > 0  # the hooks ran
    assert loss_off == loss
    assert grads.keys() == grads_off.keys()
    for name in grads:
        torch.testing.assert_close(grads_off[name], grads[name], rtol=0, atol=0, msg=name)


def test_with_checkpointing_only_each_layers_input_goes_to_host_ram():
    """Non-reentrant checkpoint saves the layer's input under our hooks, then pushes its own:
    the block's insides are recomputed in backward, never copied."""
    model = tiny_model(LORA)
    batch, seq = 2, 37
    _, _, (tensors, moved) = step(model, True, True, torch.randint(3, 262, (batch, seq)))
    layers, hidden = model.config.num_hidden_layers, model.config.hidden_size
    assert tensors == layers
    assert moved == layers * batch * seq * hidden * 4  # fp32


def test_without_checkpointing_every_saved_tensor_moves_but_no_weight():
    model = tiny_model(LORA)
    _, _, (tensors, moved) = step(model, False, True, torch.randint(3, 262, (1, 2)))
    assert tensors > 10 * model.config.num_hidden_layers
    # Each frozen linear saves its weight (as weight.t(), a view) for its input's gradient:
    # copied, they would outweigh two tokens' activations many times over.
    frozen = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if n.endswith("base_layer.weight"))
    assert moved < frozen / 10


class Block(GradientCheckpointingLayer):
    def __init__(self, trainable: bool) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 8, bias=False)
        self.linear.weight.requires_grad_(trainable)

    def forward(self, x):
        return self.linear(x)


def test_weights_pass_through_and_inputs_are_copied():
    x = torch.randn(4, 8, requires_grad=True)
    frozen = Block(trainable=False)
    hooks = HostActivations(pin_memory=False)
    install(frozen, hooks)
    frozen(x).sum().backward()
    # F.linear saves only the weight (for x's gradient); it is a parameter and stays put.
    assert hooks.reset() == (0, 0)
    trained = Block(trainable=True)
    hooks = HostActivations(pin_memory=False)
    install(trained, hooks)
    trained(x).sum().backward()
    assert hooks.reset() == (1, 4 * 8 * 4)  # now x is saved too, for the weight's gradient: copied
    assert hooks.last_pinned_bytes == 4 * 8 * 4  # unpinned (CPU): no power-of-two blocks


def test_pinned_blocks_round_up_to_a_power_of_two():
    # torch's CachingHostAllocator: what metrics.json's pinned_gib and the host-RAM bound count.
    from vramfit.memory import pinned_block_bytes

    assert [pinned_block_bytes(n) for n in (1, 2, 3, 4096, 4097, 56 * 2**20)] == [1, 2, 4, 4096, 8192, 64 * 2**20]


def test_hooks_apply_only_inside_layers_and_only_while_recording():
    block = Block(trainable=True)
    hooks = HostActivations(pin_memory=False)
    install(block, hooks)
    x = torch.randn(4, 8, requires_grad=True)
    with torch.no_grad():
        block(x)  # an evaluation forward saves nothing
    (x * x).sum().backward()  # outside any layer: not ours
    assert hooks.reset() == (0, 0)
    # A forward that raises still pops what it pushed.
    block.linear.register_forward_hook(lambda *_: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        block(x)
    hooks.reset()  # what the linear saved before the raise
    (x * x).sum().backward()
    assert hooks.reset() == (0, 0)


class Outer(GradientCheckpointingLayer):
    def __init__(self) -> None:
        super().__init__()
        self.inner = Block(trainable=True)

    def forward(self, x):
        return self.inner(x)


def test_only_outermost_layers_get_hooks():
    # An inner layer's hooks would sit above checkpoint's own inside a checkpointed block.
    model = nn.Sequential(Outer(), Block(trainable=True))
    assert outermost_layers(model) == [model[0], model[1]]


SHAPES = [
    ("lora", ["q_proj", "k_proj", "v_proj", "o_proj"], 0.05),
    ("lora", "all-linear", 0.05),
    ("lora", "all-linear", 0.0),
    ("lora", ["q_proj", "v_proj"], 0.0),
    ("full", "all-linear", 0.0),
]


@pytest.mark.parametrize("method,targets,dropout", SHAPES)
def test_copies_without_checkpointing_stay_within_the_memory_models_bound(method, targets, dropout):
    """memory.OFFLOAD_SAVED_COPIES: without checkpointing, a tensor several ops save is copied
    once per op. Measured here on a Qwen2.5-7B-proportioned model (16x narrower), bf16."""
    over = dict(hidden_size=224, intermediate_size=1184, num_attention_heads=14, num_key_value_heads=2, num_hidden_layers=2)
    lora = {"r": 8, "target_modules": targets, "lora_dropout": dropout} if method == "lora" else None
    model = tiny_model(lora, torch.bfloat16, **over)
    seq = 512
    _, _, (_, moved) = step(model, False, True, torch.randint(3, 262, (1, seq)))
    shape = shape_from_config({**tiny_config(**over), "architectures": ["Qwen2ForCausalLM"]})
    cfg = RunConfig.model_validate(
        {"method": method, "lora": {"r": 8, "target_modules": targets, "dropout": dropout}, "data": {"seq_len": seq}}
    )
    predicted = shape.layers * layer_activation_bytes(shape, cfg, 2)
    assert predicted <= moved <= OFFLOAD_SAVED_COPIES * predicted


def test_checkpointing_that_recomputes_through_call_copies_only_the_inputs(monkeypatch):
    """transformers up to 5.17 checkpointed a layer's __call__, so module hooks fire again in
    the backward's recomputation. The hooks must not push there, or every recomputed tensor
    goes out to host RAM and back (an H200 run was 2.7x slower per step for it)."""
    import functools

    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

    def old_call(self, *args, **kwargs):  # transformers 5.17's GradientCheckpointingLayer.__call__
        if self.gradient_checkpointing and self.training:
            return self._gradient_checkpointing_func(functools.partial(nn.Module.__call__, self, **kwargs), *args)
        return nn.Module.__call__(self, *args, **kwargs)

    forward = getattr(Qwen2DecoderLayer.forward, "__wrapped__", Qwen2DecoderLayer.forward)  # unwrap 5.23's own checkpointing
    monkeypatch.setattr(Qwen2DecoderLayer, "forward", forward)
    monkeypatch.setattr(GradientCheckpointingLayer, "__call__", old_call, raising=False)
    model = tiny_model(LORA)
    batch, seq = 2, 37
    ids = torch.randint(3, 262, (batch, seq))
    loss, grads, _ = step(model, True, False, ids)
    loss_off, grads_off, (tensors, moved) = step(model, True, True, ids)
    layers, hidden = model.config.num_hidden_layers, model.config.hidden_size
    assert tensors == layers and moved == layers * batch * seq * hidden * 4
    assert loss_off == loss
    for name in grads:
        torch.testing.assert_close(grads_off[name], grads[name], rtol=0, atol=0, msg=name)


# ---------------------------------------------------------------- copies beside the compute


class RecordingCopies(InlineCopies):
    """InlineCopies that say they overlap (so HostActivations fetches ahead, as with
    StreamCopies on a GPU), recording which packed tensor each copy back is for."""

    overlaps = True

    def __init__(self, events: list) -> None:
        self.outs: list[torch.Tensor] = []
        self.fetched: list[int] = []
        self.events = events  # ("fetch", layer), shared with the test's recomputation marks

    def out(self, t, host):
        super().out(t, host)
        self.outs.append(host)

    def back(self, host, device):
        i = next(i for i, h in enumerate(self.outs) if h is host)
        self.fetched.append(i)
        self.events.append(("fetch", i))
        return super().back(host, device)


def test_overlapping_copies_fetch_each_layer_input_once_a_layer_ahead_and_train_the_same():
    model = tiny_model(LORA)
    layers = model.config.num_hidden_layers
    ids = torch.randint(3, 262, (2, 37))
    loss, grads, _ = step(model, True, False, ids)

    model = copy.deepcopy(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    events: list = []
    copies = RecordingCopies(events)
    hooks = HostActivations(pin_memory=False, copies=copies)
    install(model, hooks)
    for i, layer in enumerate(outermost_layers(model)):  # marks each layer's MLP running
        layer.mlp.register_forward_pre_hook(lambda *_, i=i: events.append(("mlp", i)))
    for micro_batch in range(2):  # gradient accumulation: a new order for each forward
        copies.outs, copies.fetched = [], []
        torch.manual_seed(1)
        out = model(input_ids=ids, labels=ids).loss
        events.clear()  # the forward's MLP marks
        out.backward()
        assert len(copies.outs) == layers  # one input per layer
        # The last layer's input is fetched when its recomputation asks for it; each unpack
        # then fetches the previous layer's input ahead: every input once, last to first,
        # and layer k-1's before layer k's recomputation runs (its copy overlaps it).
        assert copies.fetched == list(range(layers - 1, -1, -1)), copies.fetched
        for k in range(layers - 1, 0, -1):
            assert events.index(("fetch", k - 1)) < events.index(("mlp", k)), events
        if micro_batch == 0:
            assert out.item() == loss
            params = dict(model.named_parameters())
            for name, g in grads.items():
                torch.testing.assert_close(params[name].grad, g, rtol=0, atol=0, msg=name)
            model.zero_grad()


def test_an_empty_leaf_saved_beside_a_layer_input_is_not_moved_or_put_in_the_fetch_order():
    # torch 2.11's non-reentrant checkpoint saves torch.empty(0, requires_grad=True) with the
    # layer's input (_NoopSaveInputs). Copied, it was counted as an input and put between two
    # inputs in the fetch-ahead order (and handed to StreamCopies as a CPU tensor on a GPU run).
    class SaveWithDummy(torch.autograd.Function):
        @staticmethod
        def forward(ctx, dummy, x):
            ctx.save_for_backward(dummy, x)
            return x * 3

        @staticmethod
        def backward(ctx, g):
            dummy, x = ctx.saved_tensors
            assert dummy.numel() == 0 and x.shape == g.shape
            return None, g * 3

    events: list = []
    copies = RecordingCopies(events)
    hooks = HostActivations(pin_memory=False, copies=copies)
    x = torch.randn(3, 4, requires_grad=True)
    ys = []
    for _ in range(2):  # two "layers"
        with hooks:
            ys.append(SaveWithDummy.apply(torch.empty(0, requires_grad=True), x * 2))
    assert len(hooks._order) == 2 and len(copies.outs) == 2
    sum(y.sum() for y in ys).backward()
    assert copies.fetched == [1, 0]  # the second input, then the first fetched ahead
    assert hooks.reset() == (2, 2 * 3 * 4 * 4)
    torch.testing.assert_close(x.grad, torch.full_like(x, 12.0))


def test_async_offload_is_inert_without_checkpointing_or_offload():
    # A pin that cannot apply does nothing (auto-fit may still plan without offload).
    assert RunConfig.model_validate({"train": {"offload_async": True}}).train.offload_async
    assert RunConfig.model_validate({"train": {"offload_async": True, "offload_activations": True, "grad_ckpt": False}})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_stream_copies_on_a_gpu_train_the_same():
    from vramfit.offload import StreamCopies

    model = tiny_model(LORA).cuda()
    ids = torch.randint(3, 262, (2, 37)).cuda()
    loss, grads, _ = step(model, True, False, ids)
    model = copy.deepcopy(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    hooks = HostActivations(pin_memory=True, copies=StreamCopies(torch.device("cuda")))
    install(model, hooks)
    torch.manual_seed(1)
    out = model(input_ids=ids, labels=ids).loss
    out.backward()
    torch.cuda.synchronize()
    assert out.item() == loss and hooks.reset()[0] == model.config.num_hidden_layers
    for name, g in grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, g, rtol=0, atol=0, msg=name)

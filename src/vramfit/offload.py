"""``train.offload_activations``: what the decoder layers save for backward lives in host RAM;
``train.offload_embeddings``: so does the input embedding table (``embeddings_on_host``).

Imported only by ``train.py`` (it imports torch at top level, like the trainer).

``HostActivations`` is ``torch.autograd.graph.save_on_cpu`` with three changes:

- parameters pass through untouched. save_on_cpu would copy every weight an op saves
  (``F.linear`` saves its weight to compute the input's gradient) to host RAM and, in
  backward, back to a second GPU copy: more GPU memory at the backward, not less. Under
  ZeRO-3 the weight saved is the Parameter itself, gathered only while it computes;
  DeepSpeed gathers it again for backward, so it must be saved as the Parameter.
- it counts what it moves (``tensors``, ``bytes``), for metrics.json and the tests.
- it copies into a new host tensor even when the tensor is already on the CPU, so a
  CPU run exercises the same pack/unpack path as a GPU run (save_on_cpu's unpinned
  path returns a CPU tensor itself).

Where the hooks apply (``install``): around each outermost transformers
``GradientCheckpointingLayer`` call, not around the whole forward. Saved-tensor hooks
form a stack and only the innermost pair applies (torch/autograd/graph.py). With
``grad_ckpt`` (non-reentrant ``torch.utils.checkpoint``, as render.py sets it) the layer's
call is ``checkpoint(forward, hidden_states)`` (up to transformers 5.17 ``checkpoint(__call__,
...)``; ``install`` pushes our hooks around ``GradientCheckpointingLayer.__call__``, outside
either): checkpoint saves its positional inputs
for backward *before* pushing its own hooks (``_checkpoint_without_reentrant_generator``
in torch/utils/checkpoint.py), so our pack hook sees exactly the layer's input; inside
the block, checkpoint's own hook is innermost and keeps only placeholders. In backward the block is recomputed (without our
wrapper) under checkpoint's ``_recomputation_hook``, outside our forward
scope, so the recomputed tensors stay on the GPU for the moment they are needed and
nothing is copied twice. Without ``grad_ckpt`` every tensor a layer saves goes to host
RAM. Either way the embeddings, the final norm, the head and the loss stay on the GPU:
the loss's tensors are needed again at once (the backward starts there), so moving
them would cost PCIe time for no memory.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from .memory import pinned_block_bytes


class _OnHost:
    """One saved tensor's host copy. Every op that saved it unpacks the same GPU copy, made
    at the first unpack and freed when the last of them has run its backward."""

    __slots__ = ("device", "host", "non_blocking", "gpu")

    def __init__(self, device: torch.device, host: torch.Tensor, non_blocking: bool) -> None:
        self.device, self.host, self.non_blocking = device, host, non_blocking
        self.gpu: torch.Tensor | None = None

    def back(self) -> torch.Tensor:
        if self.gpu is None:
            self.gpu = self.host.to(self.device, non_blocking=self.non_blocking)
        return self.gpu


class HostActivations(torch.autograd.graph.saved_tensors_hooks):
    """Saved-tensor hooks that keep tensors in (pinned, on CUDA) host RAM until backward."""

    def __init__(self, pin_memory: bool) -> None:
        self.pin_memory = pin_memory
        self.tensors = 0
        self.bytes = 0
        # What the pinned copies take: torch's CachingHostAllocator hands out blocks of a
        # power of two bytes (memory.OFFLOAD_PINNED_ROUNDING is its average over sizes).
        self.pinned_bytes = 0
        self.last_pinned_bytes = 0

        # Tensors already copied in this layer's forward, by id (with a weak reference, so a
        # freed tensor whose id is reused never matches): without checkpointing several ops
        # save the same tensor (q, k and v's LoRA A all save the normed input when dropout is
        # off), and each save would otherwise be its own host copy and, in the backward, its
        # own GPU copy. Cleared when the layer's call ends (__exit__).
        self._copied: dict[int, tuple[weakref.ref, _OnHost]] = {}

        def pack(t: torch.Tensor):
            # A parameter, or a view of one (``F.linear`` saves ``weight.t()``). By identity,
            # not by storage address: DeepSpeed re-points parameters at new buffers (ZeRO-2
            # flattens them, ZeRO-3 gathers them anew for every use).
            if t.is_sparse or isinstance(t, nn.Parameter) or isinstance(t._base, nn.Parameter):
                return t  # a leaf or a view of one: holding it makes no reference cycle
            seen = self._copied.get(id(t))
            if seen is not None and seen[0]() is t:
                return seen[1]
            # With pin_memory the device-to-host copy is queued on the compute stream and
            # the GPU tensor can be freed as soon as nothing else holds it: the kernels
            # that reuse its memory run after the copy, in stream order.
            with torch.no_grad():
                host = torch.empty(t.size(), dtype=t.dtype, layout=t.layout, pin_memory=self.pin_memory)
                host.copy_(t, non_blocking=self.pin_memory)
            self.tensors += 1
            nbytes = t.numel() * t.element_size()
            self.bytes += nbytes
            self.pinned_bytes += int(pinned_block_bytes(nbytes)) if self.pin_memory else nbytes
            packed = _OnHost(t.device, host, self.pin_memory)
            self._copied[id(t)] = (weakref.ref(t), packed)
            return packed

        def unpack(packed):
            return packed if isinstance(packed, torch.Tensor) else packed.back()

        super().__init__(pack, unpack)

    def __exit__(self, *exc) -> None:
        self._copied.clear()
        super().__exit__(*exc)

    def reset(self) -> tuple[int, int]:
        """(tensors, bytes) moved since the last reset; start counting again. The pinned
        blocks they took are then in ``last_pinned_bytes``."""
        moved = (self.tensors, self.bytes)
        self.last_pinned_bytes = self.pinned_bytes
        self.tensors = self.bytes = self.pinned_bytes = 0
        return moved


def outermost_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers: transformers GradientCheckpointingLayer modules not inside another one.

    An inner one would push our hooks inside a checkpointed block, above checkpoint's own,
    and the block's tensors would then be copied instead of recomputed."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    found: list[str] = []
    layers: list[nn.Module] = []
    for name, module in model.named_modules():
        if isinstance(module, GradientCheckpointingLayer) and not any(name.startswith(f + ".") for f in found):
            found.append(name)
            layers.append(module)
    return layers


def install(model: nn.Module, hooks: HostActivations) -> int:
    """Apply ``hooks`` around every decoder layer's call; returns how many layers.

    Only while gradients are being recorded: an evaluation forward saves nothing."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = outermost_layers(model)
    _wrap_checkpointing_call(GradientCheckpointingLayer)
    for layer in layers:
        layer._vramfit_host_activations = hooks
    return len(layers)


def _wrap_checkpointing_call(cls: type) -> None:
    """Have ``cls.__call__`` push a layer's HostActivations (if it has one) around the call,
    outside any checkpoint the call starts. Not module hooks: transformers up to 5.17
    checkpoints the layer's ``__call__``, so module hooks run inside the checkpoint, where
    ours would be innermost and copy the block's insides out and back instead of letting
    checkpoint recompute them (an H200 step was 2.7x slower for it, docs/benchmarks/fused/);
    later versions checkpoint ``forward``, and wrapping ``__call__`` serves both. The
    backward's recomputation calls ``forward`` or ``nn.Module.__call__``, never this, so it
    pushes nothing. Once per process; layers without hooks are untouched."""
    original = cls.__call__
    if getattr(original, "_vramfit_wrapped", False):
        return

    def call(self, *args, **kwargs):
        hooks = getattr(self, "_vramfit_host_activations", None)
        if hooks is None or not torch.is_grad_enabled():
            return original(self, *args, **kwargs)
        with hooks:  # popped again if the call raises
            return original(self, *args, **kwargs)

    call._vramfit_wrapped = True
    cls.__call__ = call


def embeddings_on_host(model: nn.Module):
    """``train.offload_embeddings``: keep the input embedding table in host RAM. Moves it
    there and returns ``place``, which moves it there again (and is a no-op once it is).

    The lookup then runs on the CPU (a gather of micro_batch x seq rows) and only its
    output crosses PCIe, micro_batch x seq x hidden 16-bit values, where the table is
    vocab x hidden: 1 GiB on a 7-8B model. The table must be frozen (an adapter method:
    config.py) and not shared with the output head (plan.py refuses tied models), and
    every parameter of a DDP or DeepSpeed module must be on the GPU (config.py: one GPU).
    Accelerate's ``prepare`` moves a non-quantized model to the GPU whole, after loading:
    train.py calls ``place`` again when training begins.
    """
    emb = model.get_input_embeddings()
    if any(p.requires_grad for p in emb.parameters()):
        raise ValueError("train.offload_embeddings: the input embeddings are trainable here; only a frozen table can live in host RAM")
    origin: list[torch.device] = []

    def ids_to_table(module, args):
        ids = args[0]
        origin.append(ids.device)  # the rows go back where the ids came from
        return (ids.to(module.weight.device), *args[1:])

    def rows_back(module, args, output):
        return output.to(origin.pop())

    emb.register_forward_pre_hook(ids_to_table)
    # First among the forward hooks: transformers' enable_input_require_grads (registered
    # later, when the Trainer turns checkpointing on) then marks the GPU copy as needing
    # gradients, so the backward stops there instead of copying a gradient to the CPU.
    emb.register_forward_hook(rows_back, prepend=True)

    def place() -> None:
        if emb.weight.device.type == "cpu":
            return
        emb.to("cpu")
        torch.cuda.empty_cache()  # hand the table's GPU block back instead of keeping it cached

    place()
    return place

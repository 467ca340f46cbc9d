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

import os
import weakref

import torch
from torch import nn

from .memory import pinned_block_bytes


class _OnHost:
    """One saved tensor's host copy. Every op that saved it unpacks the same GPU copy, made
    at the first unpack (or fetched ahead of it) and freed when the last of them has run its
    backward."""

    __slots__ = ("device", "host", "gpu", "ready", "index", "__weakref__")

    def __init__(self, device: torch.device, host: torch.Tensor, index: int) -> None:
        self.device, self.host, self.index = device, host, index
        self.gpu: torch.Tensor | None = None
        self.ready = None  # with copies on a side stream: the event its copy back records


class InlineCopies:
    """Copies queued on the current (compute) stream: the kernels after a copy wait for it.
    Pinned host memory makes them asynchronous to the CPU only. What CPU runs use, and CUDA
    ones without train.offload_async."""

    overlaps = False  # whether a copy can run beside the compute (and fetching ahead pays)

    def out(self, t: torch.Tensor, host: torch.Tensor) -> None:
        host.copy_(t, non_blocking=host.is_pinned())

    def back(self, host: torch.Tensor, device: torch.device):
        """(the GPU copy, the event to wait for before using it, or None)."""
        return host.to(device, non_blocking=host.is_pinned()), None

    def wait(self, ready) -> None:
        pass


class StreamCopies(InlineCopies):
    """train.offload_async: copies on their own CUDA stream, beside the compute.

    Out: the copy stream waits for the compute stream (the tensor is written), copies, and
    ``record_stream`` keeps the allocator from reusing the tensor's memory until the copy is
    done, so the tensor can be dropped at once. So that copies never pile up on the GPU, the
    compute stream waits for the previous copy out before going past the next one's start:
    at most one layer input in flight beyond the one in use (memory.offloaded_activation_gpu_bytes
    counts one). Back: the GPU buffer is allocated in the compute stream's order, filled on
    the copy stream, and the compute stream waits for that copy's event only when it uses it.
    """

    overlaps = True

    def __init__(self, device: torch.device) -> None:
        self.stream = torch.cuda.Stream(device)
        self._last_out = None

    def out(self, t: torch.Tensor, host: torch.Tensor) -> None:
        if t.device.type != "cuda":  # a host tensor a layer saves: nothing to overlap
            return super().out(t, host)
        compute = torch.cuda.current_stream(t.device)
        self.stream.wait_stream(compute)
        with torch.cuda.stream(self.stream):
            host.copy_(t, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        t.record_stream(self.stream)
        if self._last_out is not None:
            compute.wait_event(self._last_out)
        self._last_out = done

    def back(self, host: torch.Tensor, device: torch.device):
        if device.type != "cuda":
            return super().back(host, device)
        compute = torch.cuda.current_stream(device)
        gpu = torch.empty(host.size(), dtype=host.dtype, layout=host.layout, device=device)
        self.stream.wait_stream(compute)  # the buffer's block may have been in use until now
        with torch.cuda.stream(self.stream):
            gpu.copy_(host, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self.stream)
        gpu.record_stream(self.stream)
        return gpu, ready

    def wait(self, ready) -> None:
        torch.cuda.current_stream().wait_event(ready)


class HostActivations(torch.autograd.graph.saved_tensors_hooks):
    """Saved-tensor hooks that keep tensors in (pinned, on CUDA) host RAM until backward.

    ``copies``: how the copies run (InlineCopies by default). Where they overlap the compute
    (StreamCopies), unpacking a tensor also fetches the one packed before it: with
    checkpointing that is the previous layer's input, whose recomputation comes next, so its
    copy back runs while this layer recomputes and backpropagates."""

    def __init__(self, pin_memory: bool, copies: InlineCopies | None = None) -> None:
        self.pin_memory = pin_memory
        self.copies = copies or InlineCopies()
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
        # This micro-batch's packed tensors in the order they were saved (weakly: autograd's
        # graph owns them), for fetching ahead; a new list once a backward has begun.
        self._order: list[weakref.ref] = []
        self._in_backward = False

        def pack(t: torch.Tensor):
            # A parameter, or a view of one (``F.linear`` saves ``weight.t()``). By identity,
            # not by storage address: DeepSpeed re-points parameters at new buffers (ZeRO-2
            # flattens them, ZeRO-3 gathers them anew for every use).
            if t.is_sparse or isinstance(t, nn.Parameter) or isinstance(t._base, nn.Parameter):
                return t  # a leaf or a view of one: holding it makes no reference cycle
            if t.numel() == 0 and t.grad_fn is None:
                # An empty leaf: nothing to move, and no cycle in holding it. torch 2.11's
                # non-reentrant checkpoint saves one on the CPU beside each layer's input
                # (_NoopSaveInputs' dummy): copied, it was counted as a layer input and sat
                # between two inputs in the fetch-ahead order, so each fetch ahead fetched it
                # instead of the previous layer's input (and StreamCopies was handed a CPU tensor).
                return t

            seen = self._copied.get(id(t))
            if seen is not None and seen[0]() is t:
                return seen[1]
            if self._in_backward:  # the next micro-batch's forward
                self._order, self._in_backward = [], False
            # With InlineCopies the device-to-host copy is queued on the compute stream and
            # the GPU tensor can be freed as soon as nothing else holds it: the kernels
            # that reuse its memory run after the copy, in stream order.
            with torch.no_grad():
                host = torch.empty(t.size(), dtype=t.dtype, layout=t.layout, pin_memory=self.pin_memory)
                self.copies.out(t, host)
            self.tensors += 1
            nbytes = t.numel() * t.element_size()
            self.bytes += nbytes
            self.pinned_bytes += int(pinned_block_bytes(nbytes)) if self.pin_memory else nbytes
            packed = _OnHost(t.device, host, len(self._order))
            self._order.append(weakref.ref(packed))
            self._copied[id(t)] = (weakref.ref(t), packed)
            return packed

        def unpack(packed):
            if isinstance(packed, torch.Tensor):
                return packed
            self._in_backward = True
            self._fetch(packed)
            if packed.ready is not None:
                self.copies.wait(packed.ready)
                packed.ready = None
            if self.copies.overlaps and 0 < packed.index <= len(self._order):
                ahead = self._order[packed.index - 1]()
                if ahead is not None:
                    self._fetch(ahead)
            return packed.gpu

        super().__init__(pack, unpack)

    def _fetch(self, packed: _OnHost) -> None:
        if packed.gpu is None:
            with torch.no_grad():
                packed.gpu, packed.ready = self.copies.back(packed.host, packed.device)

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


class _OverlappedLookup:
    """train.offload_embeddings_async: the lookup without stalling the GPU.

    The plain path reads the ids back with ``ids.to("cpu")``, a copy on the compute stream:
    the CPU waits for everything queued before it (at every micro-batch after the first,
    the previous one's backward), and the GPU then idles through the CPU's gather and the
    pageable copy of the rows. Here the ids are the collator's own CPU copy (``expect``,
    data.HOST_IDS_KEY), the rows are gathered straight into pinned memory, and their copy
    to the GPU is queued on the compute stream without the CPU waiting: the gather runs
    while the GPU still works, and nothing is read back from it.

    Where a forward comes without the collator's copy (or one of another shape), the ids
    come back on a stream of their own (``ids``). That assumes the ids on the GPU are
    complete when the forward starts: the Trainer's batches reach the GPU by blocking copies
    (TrainingArguments' accelerator_config ``non_blocking`` off, as vramfit renders it;
    train.py checks), so they are."""

    # The gather reads micro_batch x seq rows scattered over a table of ~1 GiB: bound by the
    # CPU's memory latency, and single-threaded under the OMP_NUM_THREADS=1 vramfit launches
    # GPU runs with (launch.py). A few threads, each on a slice of the ids (index_select lets
    # go of the GIL), cut it from 8.7 to 3.1 ms on a 2-core machine (8,192 rows of a 7B's table).
    # Below GATHER_SPLIT_ROWS one call is quicker than handing work to threads.
    GATHER_SPLIT_ROWS = 1024

    def __init__(self) -> None:
        self.streams: dict = {}
        self.pool = None
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        self.threads = max(1, min(4, cores))  # the training thread only waits for them meanwhile

    def ids(self, ids: torch.Tensor) -> torch.Tensor:
        side = self.streams.get(ids.device)
        if side is None:
            side = self.streams[ids.device] = torch.cuda.Stream(ids.device)
        host = torch.empty(ids.shape, dtype=ids.dtype, pin_memory=True)
        with torch.cuda.stream(side):
            host.copy_(ids, non_blocking=True)
        side.synchronize()  # this copy only, not the compute stream's queue
        return host

    def rows(self, weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The rows of ``ids`` (on the CPU) in pinned memory: the same values as
        F.embedding's gather (a frozen table, no max_norm)."""
        flat = ids.reshape(-1)
        out = torch.empty((flat.numel(), weight.shape[1]), dtype=weight.dtype, pin_memory=True)
        self.gather(weight, flat, out)
        return out.view(*ids.shape, weight.shape[1])

    def gather(self, weight: torch.Tensor, flat: torch.Tensor, out: torch.Tensor) -> None:
        """``torch.index_select(weight, 0, flat, out=out)``, split over the threads."""
        parts = min(self.threads, flat.numel() // self.GATHER_SPLIT_ROWS)
        if parts <= 1:
            torch.index_select(weight, 0, flat, out=out)
        else:
            if self.pool is None:
                from concurrent.futures import ThreadPoolExecutor

                self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="vramfit-embedding")
            cut = [i * flat.numel() // parts for i in range(parts + 1)]
            jobs = [self.pool.submit(torch.index_select, weight, 0, flat[a:b], out=out[a:b]) for a, b in zip(cut, cut[1:])]
            for job in jobs:
                job.result()  # re-raises a thread's error here


class HostEmbeddings:
    """What ``embeddings_on_host`` installed: ``place`` and ``expect``."""

    def __init__(self, emb: nn.Module) -> None:
        self.emb = emb
        # The collator's CPU ids for the next lookup (expect), or None.
        self.pending: torch.Tensor | None = None

    def expect(self, ids: torch.Tensor | None) -> None:
        """The next lookup's ids, as the collator made them on the CPU (None: forget them).
        Only the overlapped lookup uses them, and only for ids of the same shape."""
        self.pending = ids

    def place(self) -> None:
        """Move the table to host RAM again (a no-op once it is there)."""
        if self.emb.weight.device.type == "cpu":
            return
        self.emb.to("cpu")
        torch.cuda.empty_cache()  # hand the table's GPU block back instead of keeping it cached


def embeddings_on_host(model: nn.Module, overlap: bool = False) -> HostEmbeddings:
    """``train.offload_embeddings``: keep the input embedding table in host RAM. Moves it
    there and returns a HostEmbeddings, whose ``place`` moves it there again.

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
    # Per call: (the device the ids came from, where the rows go back; whether this lookup
    # is overlapped). overlap: train.offload_embeddings_async, for ids from a GPU.
    origin: list[tuple[torch.device, bool]] = []
    lookup = _OverlappedLookup() if overlap and getattr(emb, "max_norm", None) is None else None
    host = HostEmbeddings(emb)

    def ids_to_table(module, args):
        ids = args[0]
        known, host.pending = host.pending, None  # for this lookup only
        overlapped = lookup is not None and ids.is_cuda and module.weight.device.type == "cpu"
        origin.append((ids.device, overlapped))
        if not overlapped:
            return (ids.to(module.weight.device), *args[1:])
        if known is not None and known.shape == ids.shape and known.device.type == "cpu":
            return (known, *args[1:])
        return (lookup.ids(ids), *args[1:])

    plain_forward = emb.forward

    def forward(ids, *args, **kwargs):
        if origin and origin[-1][1] and not args and not kwargs:
            return lookup.rows(emb.weight, ids)  # pinned, for rows_back's copy that does not wait
        return plain_forward(ids, *args, **kwargs)

    def rows_back(module, args, output):
        to, overlapped = origin.pop()
        return output.to(to, non_blocking=overlapped)

    if lookup is not None:
        emb.forward = forward

    emb.register_forward_pre_hook(ids_to_table)
    # First among the forward hooks: transformers' enable_input_require_grads (registered
    # later, when the Trainer turns checkpointing on) then marks the GPU copy as needing
    # gradients, so the backward stops there instead of copying a gradient to the CPU.
    emb.register_forward_hook(rows_back, prepend=True)
    host.place()
    return host

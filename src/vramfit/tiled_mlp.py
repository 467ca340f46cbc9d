"""``kernels.tiled_mlp``: each decoder layer's MLP over chunks of the sequence.

Imported only by ``train.py`` (it imports torch and DeepSpeed). The chunking and the
chunk-by-chunk recomputation in the backward are DeepSpeed's ``TiledMLP`` (from Arctic
Long Sequence Training); this module only puts it in front of every decoder layer's MLP.
An MLP is a per-token function, so chunks of the sequence compute exactly what the whole
does; what changes is that the intermediates (gate, up, their product: 4 x
intermediate_size values per token, most of a layer's activations) exist for one chunk at a
time, at the cost of one more MLP forward. The chunk count is memory.mlp_shards', so the
plan predicts what runs.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from .memory import mlp_shards


def install(model: nn.Module) -> int:
    """Route every decoder layer's ``mlp`` through TiledMLP; returns how many layers.

    Per instance, not on the class: only this model changes. Forwards without gradients
    (evaluation) and sequences of at most one chunk take the plain path."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    from .offload import outermost_layers

    count = 0
    for layer in outermost_layers(model):
        mlp = getattr(layer, "mlp", None)
        if not isinstance(mlp, nn.Module):
            continue
        plain = type(mlp).forward
        # Under ZeRO, DeepSpeed must not reduce a trainable weight's gradient before the
        # last chunk has added to it: TiledMLP flags them (ds_grad_is_ready) chunk by chunk.
        trainable = [p for p in mlp.parameters() if p.requires_grad]

        def forward(self, x, _plain=plain, _trainable=trainable):
            shards = mlp_shards(x.shape[-1], x.shape[-2])
            if shards == 1 or not torch.is_grad_enabled():
                return _plain(self, x)
            # One row of every token: TiledMLP's forward chunks the sequence dimension and
            # its backward the flattened tokens, so only then are they the same chunks
            # (which replayed dropout needs). Per-token, so the MLP computes the same.
            flat = x.reshape(1, -1, x.shape[-1])
            return TiledMLP.apply(_replaying(_plain), self, flat, shards, _trainable).view(x.shape)

        mlp.forward = types.MethodType(forward, mlp)
        count += 1
    return count


def _replaying(plain):
    """``plain`` for TiledMLP's calls, chunk by chunk: its forward (without gradients) and
    then its backward's recomputation (with). TiledMLP does not restore the random state
    between the two, so LoRA dropout inside the MLP would draw other masks in the backward
    than the forward used, and the gradients would not be those of the loss. Each forward
    chunk's RNG state is kept and replayed for the same chunk, as torch.utils.checkpoint
    does for a whole block, on a forked RNG so the global stream goes on undisturbed."""
    states: list[tuple[torch.Tensor, torch.Tensor | None]] = []

    def fn(module, chunk):
        cuda = chunk.device.type == "cuda"
        if not torch.is_grad_enabled():
            states.append((torch.get_rng_state(), torch.cuda.get_rng_state(chunk.device) if cuda else None))
            return plain(module, chunk)
        cpu_state, cuda_state = states.pop(0)
        with torch.random.fork_rng(devices=[chunk.device] if cuda else []):
            torch.set_rng_state(cpu_state)
            if cuda:
                torch.cuda.set_rng_state(cuda_state, chunk.device)
            return plain(module, chunk)

    return fn

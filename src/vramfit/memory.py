"""Predicted peak GPU memory per process, as a breakdown. Pure arithmetic: no torch.

This is the first-order model: each part counts the tensors vramfit's own training
stack (HF Trainer + PEFT + bitsandbytes, sdpa attention) keeps alive at the peak,
which is the backward pass of the last micro-batch. The constants that are not
tensor sizes (allocator slack, CUDA context) are stated below and are what GPU
calibration (``docs/benchmarks/``) corrects.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import RunConfig
from .model_shape import ModelShape

GIB = 1 << 30

# bitsandbytes nf4/fp4: 4 bits per weight + one absmax per 64-weight block, fp32
# (4 bytes / 64) or, with double quantization, 8-bit absmax plus an fp32 scale
# per 256 blocks (1 / 64 + 4 / (64 * 256) bytes).
NF4_BYTES = 0.5 + 4 / 64
NF4_DQ_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
INT8_BYTES = 1.0 + 4 / 4096  # LLM.int8 row-wise scales, roughly

# The caching allocator reserves more than it hands out (block rounding,
# fragmentation between differently sized activations). Measured reserved /
# allocated ratios on an H200 were 1.10-1.12 for 7B LoRA/QLoRA runs
# (shared/gpu/README.md); expandable segments keep it near the low end.
ALLOCATOR_SLACK = 0.10
# CUDA context + cuBLAS/cuDNN workspaces outside the allocator, per process.
CUDA_CONTEXT_GIB = 0.5

# Loss over full-vocabulary logits, per token and vocab entry at the peak:
# 16-bit logits (2) + the fp32 upcast inside the loss (4) + its fp32 gradient (4).
LOGITS_BYTES = 10


@dataclass(frozen=True)
class MemoryBreakdown:
    weights: float
    adapters: float
    gradients: float
    optimizer: float
    activations: float
    logits: float
    allocator_slack: float
    cuda_context: float
    trainable_params: int
    world_size: int = 1

    PARTS = (
        "weights",
        "adapters",
        "gradients",
        "optimizer",
        "activations",
        "logits",
        "allocator_slack",
        "cuda_context",
    )

    @property
    def peak(self) -> float:
        return sum(getattr(self, p) for p in self.PARTS)

    @property
    def peak_gib(self) -> float:
        return self.peak / GIB

    def gib(self) -> dict[str, float]:
        return {p: round(getattr(self, p) / GIB, 3) for p in self.PARTS}


def _dtype_bytes(dtype: str) -> int:
    return 4 if dtype == "float32" else 2


def _quant_bytes(cfg: RunConfig) -> float:
    if cfg.quant.bits == 8:
        return INT8_BYTES
    return NF4_DQ_BYTES if cfg.quant.double_quant else NF4_BYTES


def trainable_params(shape: ModelShape, cfg: RunConfig) -> int:
    if cfg.method == "full":
        return shape.total_params
    return shape.lora_params(cfg.lora.r, cfg.lora.target_modules)


def _activations(shape: ModelShape, cfg: RunConfig, dtype_bytes: int) -> float:
    """Saved activations of one micro-batch, in bytes."""
    tokens = cfg.train.micro_batch * cfg.data.seq_len
    h, kv, i = shape.hidden, shape.kv_heads * shape.head_dim, shape.intermediate
    q = shape.heads * shape.head_dim
    # One decoder block with sdpa (no s^2 attention matrix kept): norms and
    # residuals (~4h), q/k/v and attention output (2q + 2kv), the gated MLP's
    # gate, up, activation and product (4i).
    per_layer = tokens * dtype_bytes * (4 * h + 2 * q + 2 * kv + 4 * i)
    if cfg.uses_adapter and cfg.lora.dropout > 0:
        # LoRA dropout keeps a copy of each targeted layer's input.
        linears = shape.layer_linears()
        targets = list(linears) if cfg.lora.target_modules == "all-linear" else cfg.lora.target_modules
        per_layer += tokens * dtype_bytes * sum(linears[t][0] for t in targets if t in linears)
    if cfg.train.grad_ckpt:
        # Checkpointing keeps each block's input and recomputes one block at a time.
        return shape.layers * tokens * dtype_bytes * h + per_layer
    return shape.layers * per_layer


def estimate(shape: ModelShape, cfg: RunConfig, dtype: str = "bfloat16", device: str = "cuda") -> MemoryBreakdown:
    """Peak bytes per GPU process for ``cfg`` on ``shape``; ``dtype`` is the resolved compute dtype.

    On ``device="cpu"`` the same tensors live in host RAM, without a CUDA context."""
    b = _dtype_bytes(dtype)
    world = cfg.world_size
    stage = cfg.deepspeed.stage
    n_train = trainable_params(shape, cfg)
    other = shape.embed_params + shape.head_params + shape.norm_params

    if cfg.method == "qlora":
        emb_bytes = 4 if cfg.quant.upcast_embeddings else b
        weights = shape.linear_params * _quant_bytes(cfg) + other * emb_bytes
    else:
        weights = shape.total_params * b
    if stage == 3:
        # Parameters are sharded; with offload only a few layers' worth live on GPU.
        weights = weights / world if not cfg.deepspeed.offload_params else weights / max(shape.layers, 1) * 2

    # PEFT keeps adapter weights in fp32; full fine-tuning trains in the model dtype.
    train_bytes = 4 if cfg.uses_adapter else b
    adapters = n_train * train_bytes if cfg.uses_adapter else 0.0
    gradients = n_train * train_bytes
    opt = cfg.train.optimizer
    per_param = 0 if opt == "sgd" else 2 if opt.endswith("8bit") else 2 * train_bytes
    optimizer = n_train * per_param
    if stage >= 2:
        gradients /= world
        optimizer = 0.0 if cfg.deepspeed.offload_optimizer else optimizer / world
        if cfg.deepspeed.offload_optimizer:
            # ZeRO-Offload keeps fp32 gradient partitions on the host, bf16 buckets here.
            gradients = min(gradients, 2 * 5e8 * b)

    activations = _activations(shape, cfg, b)
    logits = cfg.train.micro_batch * cfg.data.seq_len * shape.vocab * LOGITS_BYTES
    allocated = weights + adapters + gradients + optimizer + activations + logits
    return MemoryBreakdown(
        weights=weights,
        adapters=adapters,
        gradients=gradients,
        optimizer=optimizer,
        activations=activations,
        logits=logits,
        allocator_slack=allocated * ALLOCATOR_SLACK,
        cuda_context=CUDA_CONTEXT_GIB * GIB if device == "cuda" else 0.0,
        trainable_params=n_train,
        world_size=world,
    )

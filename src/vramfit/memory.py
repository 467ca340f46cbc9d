"""Predicted peak GPU memory per process, as a breakdown. Pure arithmetic: no torch.

The model follows what vramfit's own training stack (HF Trainer + PEFT +
bitsandbytes, sdpa attention unless the config asks for eager, PyTorch's caching
allocator with expandable segments) keeps alive, phase by phase, and takes the largest:

- loss: weights, adapters, optimizer state, saved activations, and the loss over
  full-vocabulary logits (the peak of almost every adapter run);
- backward: the same plus gradients, with one checkpointed block recomputed;
- optimizer step: weights, gradients, optimizer state and the step's temporaries
  (the peak of full fine-tuning).

Byte counts are exact where they are tensor sizes. The four numbers that are not
(loss bytes per logit, saved activation bytes per token and layer, the allocator's
slack, the memory outside the allocator) were fitted to 42 measured runs over four
architectures on an H200: docs/memory-model.md shows the errors, and
scripts/calibrate_memory.py re-measures them when the stack changes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .config import RunConfig
from .model_shape import DOWN_PROJ_LAST, ModelShape

GIB = 1 << 30

# bitsandbytes nf4/fp4: 4 bits per weight + one absmax per 64-weight block, fp32
# (4 bytes / 64) or, with double quantization, 8-bit absmax plus an fp32 scale
# per 256 blocks (1 / 64 + 4 / (64 * 256) bytes).
NF4_BYTES = 0.5 + 4 / 64
NF4_DQ_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
INT8_BYTES = 1.0 + 4 / 4096  # LLM.int8 row-wise scales, roughly

# Outside the caching allocator, per process: CUDA context, cuBLAS/cuDNN handles
# and workspaces. NVML minus the allocator's reserved bytes read 0.74 GiB in every
# calibration run (H100 and H200, torch 2.11 + CUDA 13).
CUDA_CONTEXT_GIB = 0.75
# The fused loss's chunk of logits and its gradient, computed in place: copies of one
# chunk (chunk x vocab, 16-bit) alive at once. Not yet measured on a GPU.
FUSED_CHUNK_COPIES = 2
# With the fused loss the peak moves from the loss to the backward. There a layer holds, beside
# the layer inputs still kept, either its recomputation's transient (layer_transient_bytes,
# counted from allocator snapshots) or its backward's own buffers, whichever is larger: this
# empirical residual, bytes per token and unit of hidden_size, per token and unit of
# intermediate_size without liger's SwiGLU (whose backward works in place) and with it, and
# more per token and unit of intermediate_size where down_proj carries an adapter (its input's
# gradient made twice); under the tiled MLP the intermediate terms count one chunk's tokens.
# It also carries what the allocator reserves beyond what it allocates at long sequences
# (up to 2.5 GiB), more than OTHER_SLACK. Fitted by scripts/fit_fused_residual.py (each run's
# needed residual by bisection on the whole model, then non-negative least squares relative to
# each run's process peak, under-predictions weighted three times) to 36 H200 runs: the 12 of
# docs/benchmarks/calibration/fused.jsonl, 20 benchmark runs (docs/benchmarks/speed/, savers/:
# micro-batch up to 16, up to 87k tokens, the tiled MLP, checkpointed inputs in host RAM,
# liger's ops) and 4 snapshot runs (calibration/snapshots/). The whole model over those: worst
# 3.5% under, 28.5% over (Llama-3.1-8B at 87,552 tokens under the tiled MLP), median 2.4%.
# Session 7's form (48,989 B per token, 2.915 per token x intermediate, 0.377 per micro_batch x
# seq^2) added 49 KB per token whatever the width: +15% on the 0.5B's auto-fit plan.
FUSED_RESIDUAL_PER_TOKEN_HIDDEN = 24.441
FUSED_RESIDUAL_PER_TOKEN_INTERMEDIATE = 3.043
FUSED_RESIDUAL_PER_TOKEN_INTERMEDIATE_LIGER = 0.000
FUSED_RESIDUAL_PER_TOKEN_INTERMEDIATE_ADAPTED = 4.061
# ZeRO-3's stage3_max_live_parameters in configs/deepspeed/zero3*.json.
ZERO3_MAX_LIVE_ELEMENTS = 1e9
# QLoRA under ZeRO-3: what DeepSpeed's gather stream keeps reserved beyond what it holds, in
# output heads (16-bit). One run, Qwen2.5-7B on 2 H200s (docs/benchmarks/distributed/
# session9-qlora3-diagnosis/): 6.09 GiB reserved for at most 4.15 allocated, 1.9 heads of
# 1.02 GiB; 2 is taken. In-sample: another shape's figure is an extrapolation.
ZERO3_QLORA_GATHER_SLACK_HEADS = 2.0
# With several ranks, NCCL's buffers and communicators also live outside the
# allocator: NVML minus reserved read 2.04 GiB per rank on 2 H200s (ZeRO-2 and
# ZeRO-3 alike), 1.29 GiB more than one process alone.
NCCL_GIB = 1.29
# ZeRO offload (optimizer or parameters) adds its own, outside the allocator: pinned
# transfer buffers' mappings, extra streams' cuBLAS workspaces. NVML minus reserved read
# 1.29 GiB on the one offload run (3B, seq 4096, 1 H200), 0.54 more than CUDA_CONTEXT_GIB.
OFFLOAD_OUTSIDE_GIB = 0.54

# The loss over full-vocabulary logits, per token and vocabulary entry, at its peak
# (the backward of cross-entropy): the fp32 upcast's log-softmax kept for backward,
# its gradient and the gradient it produces: 3 x 4 bytes. Measured: 11.7-12.1.
LOSS_BYTES = 12
# The caching allocator keeps the freed 16-bit logits and fp32 upcast blocks it
# cannot reuse for the backward's fp32 tensors: about one more fp32 logits tensor
# (4 bytes per logit) while that is under LOSS_SLACK_KNEE_GIB, and 36% of the rest
# above it (large blocks are split and reused more). Fitted to the reserved-minus-
# allocated gap of the calibration runs.
LOSS_SLACK_KNEE_GIB = 2.4
LOSS_SLACK_ABOVE = 0.36
# Two more terms of the same gap, fitted in session 11 to the calibration runs the three terms
# above left more than 5% under (in-sample; docs/memory-model.md). At least this much, however
# few the logits: Mistral-7B and Phi-3-mini (32k vocabularies) kept 0.2-0.4 GiB reserved beyond
# their fp32 logits (Mistral QLoRA at 2048 tokens: 0.63 GiB for 0.25 of logits, -6.6% before).
LOSS_SLACK_MIN_GIB = 0.4
# And eager attention's score-sized transients (its fp32 softmax, the causal mask's copy) leave
# about one layer's saved scores more reserved: Gemma2 at 4096 tokens kept 4.14 GiB for 2.94
# (-5.4% before); the Qwen eager rows' errors move by 1-3 points with it.
EAGER_SCORE_SLACK = 1.0
# Fragmentation when the peak is not the loss (optimizer step, backward).
OTHER_SLACK = 0.04

# Saved activations per token and decoder layer are counted tensor by tensor
# (layer_activation_bytes), from what each op of transformers' decoder layer, PEFT's LoRA
# layer and liger's kernels keep for backward under bf16 autocast. Checked on an H200 without
# checkpointing by training each configuration at two depths of the same architecture (its
# first 2 and 6 layers: everything outside the layers cancels in the difference;
# scripts/calibration_matrix_layers.yaml, docs/benchmarks/calibration/layers/): Llama-3.1-8B,
# Qwen2.5-0.5B/3B/7B, Mistral-7B and Phi-3-mini, QLoRA and LoRA, all-linear and q/v adapters,
# LoRA dropout 0 and 0.05, liger's ops on and off. The count came within 0.2-0.8% of every
# one (under), and ACT_OTHER covers that rest: attention's logsumexp, RMSNorm's rstd, the
# adapters' rank-r intermediates, allocator rounding. bitsandbytes' 4-bit matmul keeps no
# copy of its input (the pairs show none), so QLoRA keeps what LoRA keeps.
ACT_OTHER = 0.01
# LoRA dropout (p > 0) gives each adapted layer its own dropped-out copy of the input, which
# its lora_A keeps (16-bit under autocast), and the dropout's bool mask: 3 bytes per input
# feature at bf16. Without dropout every lora_A reads the layer's input itself.
DROPOUT_MASK_BYTES = 1

# train.offload_activations without grad_ckpt copies each saved tensor once per op that
# saves it, and several ops save copies of the same input (each LoRA A its own cast or
# dropped-out copy; offload.py copies one tensor saved by several ops only once, since
# session 6). On CPU (tests/test_offload.py, a Qwen2.5-7B-proportioned model) the host
# copies came to 1.05x the GPU figure above for r8 q/v adapters and up to 1.91x for
# all-linear without dropout; on an H200 four runs (before that dedup) measured 0.84-1.21x
# (metrics.json's offloaded_activations against this model's saved bytes:
# docs/benchmarks/speed/2-max-context/ and 5-8gb-offload-and-ctx/, Qwen2.5-7B r8 q/v at
# 14,208 and 16,128 tokens, Llama-3.1-8B r32 all-linear at 3,456 and 6,144). Host RAM takes
# 2.0, above every measurement: an overfull host fails a run too. Pinned host memory then
# rounds every copy up to a power of two (torch's CachingHostAllocator): 1.44x over sizes
# on average, 2x at worst; metrics.json's pinned_gib records it from session 6 on. (With
# grad_ckpt the copies are the layers' inputs, one per layer, and are counted exactly.)
OFFLOAD_SAVED_COPIES = 2.0
OFFLOAD_PINNED_ROUNDING = 1.5
# The copies resident on the GPU in flight (and crossing PCIe, speed.py): 1.13x and 1.15x
# the GPU figure in the two runs of docs/benchmarks/speed/2-max-context/.
OFFLOAD_SAVED_COPIES_GPU = 1.15

# Eager attention (model.attn_implementation=eager; gemma2's default, having no sdpa)
# materializes every layer's attention scores, micro_batch x heads x seq x seq, which
# sdpa and flash attention never do. transformers' eager_attention_forward (llama, qwen2,
# mistral, gemma, gemma2, phi3 alike) takes softmax(scores, dtype=float32).to(query.dtype),
# and autograd keeps until the layer's backward: the fp32 softmax output (its backward
# reads it) and the 16-bit copy that the probabilities @ V matmul saved (the same tensor
# when computing in fp32). With attention dropout the matmul keeps the dropped-out copy
# instead, plus the dropout's mask (bool on CUDA's fused kernel); gemma2's score
# softcapping, tanh(s / c) * c, keeps tanh's 16-bit output. The scores before softmax and
# the fp32 upcast die within the layer. Besides, the causal mask is materialized once per
# forward, micro_batch x seq x seq in the compute dtype, for every layer to read.
# Counted on CPU (tests/test_model_shape_archs.py); not yet measured on a GPU.
EAGER_SOFTMAX_BYTES = 4
EAGER_DROPOUT_MASK_BYTES = 1

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
    phase: str = "loss"  # when the peak happens: the parts are what is live then

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


def adapted_targets(shape: ModelShape, cfg: RunConfig) -> list[str]:
    """The decoder layer's linear layers that LoRA adapts, by this model's names."""
    linears = shape.layer_linears()
    targets = shape.resolve_targets(cfg.lora.target_modules)
    return list(linears) if targets == "all-linear" else [t for t in targets if t in linears]


def eager_score_bytes(shape: ModelShape, cfg: RunConfig, dtype_bytes: int) -> int:
    """Bytes eager attention keeps per attention score and layer (EAGER_SOFTMAX_BYTES);
    0 for sdpa and flash attention."""
    if cfg.model.attn_implementation != "eager":
        return 0
    dropout = shape.attention_dropout > 0
    per_score = EAGER_SOFTMAX_BYTES + (EAGER_DROPOUT_MASK_BYTES if dropout else 0)
    if dtype_bytes != EAGER_SOFTMAX_BYTES or dropout:
        per_score += dtype_bytes  # the 16-bit probabilities (or dropped-out copy) @ V saved
    if shape.attn_softcap:
        per_score += dtype_bytes
    return per_score


def eager_attention_bytes(shape: ModelShape, cfg: RunConfig, dtype_bytes: int, seq: int | None = None) -> float:
    """Attention scores (and what softmax leaves of them) that eager attention keeps for
    backward in one decoder layer over one micro-batch of ``seq`` tokens (default
    seq_len): quadratic in the sequence. 0 for sdpa and flash attention."""
    seq = seq or cfg.data.seq_len
    return cfg.train.micro_batch * shape.heads * seq * seq * eager_score_bytes(shape, cfg, dtype_bytes)


def eager_mask_bytes(cfg: RunConfig, dtype_bytes: int, seq: int) -> float:
    """The causal mask eager attention reads from a materialized tensor (sdpa needs none
    without padding): one per forward pass."""
    return cfg.train.micro_batch * seq * seq * dtype_bytes if cfg.model.attn_implementation == "eager" else 0.0


MLP_LINEARS = frozenset({"gate_proj", "up_proj", "down_proj", "gate_up_proj"})


def liger_swiglu(cfg: RunConfig) -> bool:
    """Whether liger's SwiGLU runs: kernels.liger_ops, except under the tiled MLP (render.py)."""
    return cfg.kernels.liger_ops and not cfg.kernels.tiled_mlp


def lean_mlp_applies(cfg: RunConfig) -> bool:
    """What kernels.lean_mlp needs of the config (lean_mlp.py checks each layer):
    checkpointing, liger's SwiGLU (so no tiled MLP), 4-bit base layers, not under ZeRO-3."""
    return (cfg.kernels.lean_mlp and cfg.train.grad_ckpt and liger_swiglu(cfg) and cfg.method == "qlora"
            and cfg.deepspeed.stage != 3)  # fmt: skip


# Where liger's SwiGLU MLP (LigerSwiGLUMLP) replaces the MLP in a layer that ends in its
# down_proj: gemma's gated MLP is liger's GeGLU. lean_mlp.install takes these types alone.
LEAN_MLP_TYPES = DOWN_PROJ_LAST - {"gemma"}


def lean_mlp_skips_product(shape: ModelShape, cfg: RunConfig) -> bool:
    """Whether checkpointed layers' recomputations leave out liger's SwiGLU and so never make
    its product (lean_mlp.py): down_proj a 4-bit layer with no adapter."""
    return (lean_mlp_applies(cfg) and shape.model_type in LEAN_MLP_TYPES
            and not (cfg.uses_adapter and "down_proj" in adapted_targets(shape, cfg)))  # fmt: skip


def fused_residual_features(shape: ModelShape, cfg: RunConfig, seq: int) -> list[float]:
    """What FUSED_RESIDUAL_* multiply, for one micro-batch of ``seq`` tokens: tokens x hidden,
    and tokens x intermediate_size without and with liger's SwiGLU (under the tiled MLP, one
    chunk's tokens: its backward works a chunk at a time)."""
    tokens = cfg.train.micro_batch * seq
    liger = liger_swiglu(cfg)
    mlp = tokens * shape.intermediate / (mlp_shards(shape.hidden, seq) if cfg.kernels.tiled_mlp else 1)
    down = cfg.uses_adapter and "down_proj" in adapted_targets(shape, cfg)
    return [tokens * shape.hidden, 0.0 if liger else mlp, mlp if liger else 0.0, mlp * down_input_grad_copies(cfg) if down else 0.0]


def down_input_grad_copies(cfg: RunConfig) -> float:
    """How much of FUSED_RESIDUAL_PER_TOKEN_INTERMEDIATE_ADAPTED an adapted down_proj's
    backward makes: the term was fitted on PEFT's layers, where the base's input gradient,
    the adapter's and their sum are three tensors (two beyond the one kept). fused_lora's
    16-bit function adds the adapter's into the base's in place (fused_lora.LoraLinearFunction):
    none beyond it without dropout, one (the adapter's, before its mask) with. QLoRA's
    4-bit base computes its own, which autograd adds to the adapter's: as PEFT's. Checked on
    an H100: with dropout 0.05 the 24 GB guide's plan peaked 0.20 GiB lower fused than with
    PEFT's layers (0.22 by this count, speed-checks/16-fused-lora-and-async); without dropout
    the model over-predicted the fused plans by 0.6-1.8 GiB (speed/18-24gb-dropout0-auto).
    Counted so, the planners' plans for both measured 3.9% and 4.2% under their predictions
    (speed/19-24gb-down-grad), where they were 6-9% under."""
    if fused_lora_mode(cfg) != "fused":
        return 1.0
    return 0.5 if cfg.lora.dropout > 0 else 0.0


def fused_lora_mode(cfg: RunConfig) -> str | None:
    """How train.py routes the adapted layers with kernels.fused_lora (fused_lora.py): "fused"
    for 16-bit LoRA (base and adapter in one function), "branch" for QLoRA (the adapter's
    scaling and add on bitsandbytes' output), None without it or under ZeRO-3."""
    if not cfg.kernels.fused_lora or not cfg.uses_adapter or cfg.deepspeed.stage == 3:
        return None
    return "branch" if cfg.method == "qlora" else "fused"


def fused_residual_bytes(shape: ModelShape, cfg: RunConfig, seq: int) -> float:
    """The fused loss's empirical residual (FUSED_RESIDUAL_*) for one micro-batch."""
    coef = (FUSED_RESIDUAL_PER_TOKEN_HIDDEN, FUSED_RESIDUAL_PER_TOKEN_INTERMEDIATE, FUSED_RESIDUAL_PER_TOKEN_INTERMEDIATE_LIGER,
            FUSED_RESIDUAL_PER_TOKEN_INTERMEDIATE_ADAPTED)
    return sum(c * f for c, f in zip(coef, fused_residual_features(shape, cfg, seq)))


def mlp_shards(hidden: int, seq: int) -> int:
    """Chunks of the sequence kernels.tiled_mlp computes the MLP in: about ``hidden`` tokens
    each, as DeepSpeed's TiledMLP example chooses (a chunk's intermediates then weigh about
    as much as the layer's input). tiled_mlp.py uses this same count."""
    return max(1, -(-seq // hidden))


# Which tensor a linear layer reads (what keeping its input for backward keeps): the
# attention's normed input, the attention output, the MLP's normed input, the MLP's product.
_INPUT_OF = {
    "q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "qkv_proj": "attn_in",
    "o_proj": "attn_out", "gate_proj": "mlp_in", "up_proj": "mlp_in", "gate_up_proj": "mlp_in", "down_proj": "mlp_mid",
}  # fmt: skip


def attention_mask_reaches_sdpa(cfg: RunConfig, seq: int, shortest: int | None = None) -> bool:
    """Whether a micro-batch can carry padding, or packed rows, so that transformers hands
    sdpa a mask. It drops an all-ones mask (the causal flag does), so only micro-batch 1
    without packing, or a dataset whose every example fills seq_len, never has one."""
    if cfg.data.packing:
        return True
    return cfg.train.micro_batch > 1 and not (shortest is not None and shortest >= seq)


def layer_activation_bytes(
    shape: ModelShape, cfg: RunConfig, dtype_bytes: int, seq: int | None = None, shortest: int | None = None
) -> float:
    """Activations one decoder block saves for backward over one micro-batch of ``seq``
    tokens (default seq_len), tensor by tensor (ACT_OTHER above says how it was checked).
    With kernels.tiled_mlp the MLP's intermediates exist one chunk at a time (in the
    backward's recomputation). ``shortest``: see attention_mask_reaches_sdpa."""
    seq = seq or cfg.data.seq_len
    b = dtype_bytes
    h, q, kv, i = shape.hidden, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim, shape.intermediate
    shards = mlp_shards(h, seq) if cfg.kernels.tiled_mlp else 1
    liger_norm = cfg.kernels.liger_ops
    eager = cfg.model.attn_implementation == "eager"
    fused_qkv = "qkv_proj" in shape.layer_linears()
    # RMSNorm: transformers' keeps its input upcast to fp32; liger's keeps the 16-bit input.
    per_token = shape.layer_norms * h * (b if liger_norm else 4)
    # Attention: the rotated query and key, the value and (sdpa, flash) the output. With grouped
    # query heads, eager attention and sdpa given a mask (transformers' repeat_kv; without a
    # mask sdpa takes enable_gqa) keep key and value repeated to every query head. A fused
    # qkv projection's value is a view that keeps the whole projection output.
    repeat = shape.kv_heads < shape.heads and (eager or attention_mask_reaches_sdpa(cfg, seq, shortest))
    k_saved = q if repeat else kv
    v_saved = q if repeat else (q + 2 * kv if fused_qkv else kv)
    per_token += b * (q + k_saved + v_saved + (0 if eager else q))
    # Gated MLP: transformers' keeps the gate's output (the activation's input), the
    # activation's output and the up projection's output; liger's SwiGLU only the first and last.
    per_token += b * (2 if liger_swiglu(cfg) else 3) * i / shards
    # Inputs kept for a weight gradient: every linear layer's under full fine-tuning (plus
    # each RMSNorm's normalized 16-bit input for its weight, in transformers' norm); a dropped-out
    # copy and its mask per adapted layer under LoRA dropout; without dropout, each input an
    # adapter reads, once. Sdpa's output, which o_proj reads, is kept already (not eager's copy).
    sizes = {"attn_in": h, "attn_out": 0 if not eager else q, "mlp_in": h / shards, "mlp_mid": i / shards}
    if cfg.method == "full":
        per_token += b * sum(sizes.values()) + (0 if liger_norm else shape.layer_norms * h * b)
    elif cfg.lora.dropout > 0:
        linears = shape.layer_linears()
        per_token += (b + DROPOUT_MASK_BYTES) * sum(
            linears[t][0] / (shards if t in MLP_LINEARS else 1) for t in adapted_targets(shape, cfg)
        )
    else:
        targets = adapted_targets(shape, cfg)
        per_token += b * sum(sizes[k] for k in {_INPUT_OF[t] for t in targets if t in _INPUT_OF})
        # A layer this table does not know: its input counted as its own (the safe side).
        linears = shape.layer_linears()
        per_token += b * sum(linears[t][0] for t in targets if t not in _INPUT_OF)
    tokens = cfg.train.micro_batch * seq
    return tokens * per_token * (1 + ACT_OTHER) + eager_attention_bytes(shape, cfg, dtype_bytes, seq)


def layer_transient_bytes(shape: ModelShape, cfg: RunConfig, dtype_bytes: int, seq: int | None = None) -> float:
    """What a decoder layer holds for a moment beyond what it saves, while it computes (its
    forward, or its recomputation in the backward), over one micro-batch of ``seq`` tokens:
    the MLP's product, the down projection's input, alive until that projection has run
    (unless kept anyway: full fine-tuning, an adapter on down_proj without dropout). Seen in
    memory snapshots at the peak (scripts/backward_peak_report.py,
    docs/benchmarks/calibration/snapshots/), and invisible to the two-depth pairs above (the
    same in both). 16-bit LoRA added PEFT's fp32 casts of each adapted layer's input (8 bytes
    per input feature at the widest, with dropout) until train.py kept them in 16 bits
    (``_lora_inputs_uncast``)."""
    seq = seq or cfg.data.seq_len
    shards = mlp_shards(shape.hidden, seq) if cfg.kernels.tiled_mlp else 1
    targets = adapted_targets(shape, cfg) if cfg.uses_adapter else []
    if cfg.method == "full" or (cfg.lora.dropout == 0 and "down_proj" in targets):
        return 0.0
    return cfg.train.micro_batch * seq * shape.intermediate / shards * dtype_bytes


def pinned_block_bytes(nbytes: float) -> float:
    """Host bytes a pinned copy takes: the CachingHostAllocator rounds to a power of two."""
    return float(1 << math.ceil(math.log2(nbytes))) if nbytes >= 1 else 0.0


def pad_multiple(cfg: RunConfig) -> int:
    """What a micro-batch's length is rounded up to: data.pad_to_multiple_of where the batch
    holds several sequences, as data.Collator pads (a single one is never rounded), else 1."""
    return (cfg.data.pad_to_multiple_of or 1) if cfg.train.micro_batch > 1 else 1


def longest_micro_batch(cfg: RunConfig, longest: int | None) -> int:
    """The longest a micro-batch's sequences get: seq_len, or the longest example when
    shorter, rounded up to data.pad_to_multiple_of (never past seq_len). Packed rows fill up
    to seq_len whatever the longest example."""
    seq = cfg.data.seq_len
    if not longest or cfg.data.packing or longest >= seq:
        return seq
    m = pad_multiple(cfg)
    return min(seq, -(-longest // m) * m)


def _activation_sizes(
    shape: ModelShape, cfg: RunConfig, dtype_bytes: int, longest: int | None, shortest: int | None = None
) -> tuple[float, float, float]:
    """(one decoder layer's input, one layer's saved activations, what the layer holds for a
    moment beyond them) for the longest micro-batch."""
    seq = longest_micro_batch(cfg, longest)
    block_input = cfg.train.micro_batch * seq * shape.hidden * dtype_bytes
    return block_input, layer_activation_bytes(shape, cfg, dtype_bytes, seq, shortest), layer_transient_bytes(shape, cfg, dtype_bytes, seq)


def checkpointed_layers(shape: ModelShape, cfg: RunConfig) -> int:
    """How many decoder layers recompute in the backward: every one with train.grad_ckpt,
    the first train.grad_ckpt_layers where set, none without it."""
    if not cfg.train.grad_ckpt:
        return 0
    n = cfg.train.grad_ckpt_layers
    return shape.layers if n is None else min(n, shape.layers)


# train.offload_async (offload.StreamCopies): what the allocator reserves beyond the copies in
# order, in layer inputs (micro_batch x seq x hidden, 16-bit). The 8 GB plan (Qwen2.5-7B QLoRA
# r8 q/v, micro-batch 16 x 512, checkpointed inputs in host RAM) peaked at 7.45 and 7.46 GiB
# in two H100 runs with it, 6.99 without: 0.06 GiB more allocated (the input in flight, already
# counted) and 0.39 GiB more reserved, about 9 of that plan's 0.055 GiB inputs; rounded up to
# 10 (docs/benchmarks/speed-checks/16-fused-lora-and-async, 17-async-hold). Fitted on that one
# shape; that it scales with the input is an assumption (see below). Not from record_stream on
# the copies out: holding each tensor until the compute stream had waited gave the same peak.
# Nor a second stream's pool: every segment was the compute stream's (session 14,
# metrics.json's reserved_by_stream_gib). A second shape (session 14, H100: 16-bit LoRA r128
# all-linear, micro-batch 8 x 1536, speed/14-dropout0-async-mb8) reserved 1.30 GiB beyond the
# allocated, about 16 of its inputs; its whole peak was still predicted 7% over (the
# allocated part by more), so the term stays at 10 until a shape shows it short.
OFFLOAD_ASYNC_RESERVE_INPUTS = 10.0


def offload_async_applies(cfg: RunConfig, device: str) -> bool:
    """Whether train.py copies the checkpointed layer inputs on a stream of their own."""
    t = cfg.train
    return t.offload_async and t.offload_activations and t.grad_ckpt and device == "cuda"


def offloaded_activation_gpu_bytes(layers: int, block_input: float, layer_acts: float, ckpt: bool) -> tuple[float, float]:
    """Saved activations left on the GPU with train.offload_activations: (at the loss, in
    the backward). Only what is in flight stays. With checkpointing every layer's input
    is in host RAM; at the loss one input-sized transfer buffer is counted, and in the
    backward the layer being recomputed, its input copied back and the next one's
    transfer. Without it, one layer's saved tensors (the one being copied out in the
    forward, or back in the backward). Never more than without offload: a one-layer
    model has nothing to gain."""
    if ckpt:
        offloaded = (block_input, layer_acts + 2 * block_input)
        kept = (layers * block_input, layers * block_input + layer_acts)
    else:
        offloaded = (layer_acts, layer_acts)
        kept = (layers * layer_acts, layer_acts)
    return min(offloaded[0], kept[0]), min(offloaded[1], kept[1])


def offloaded_activation_transfer_bytes(
    shape: ModelShape, cfg: RunConfig, dtype: str = "bfloat16", longest: int | None = None,
    copies: float = OFFLOAD_SAVED_COPIES,
) -> float:
    """Bytes train.offload_activations copies to host RAM per micro-batch (and back in the
    backward), on one GPU; 0 without it. ``copies``: how many times over the saved tensors
    are copied without checkpointing (OFFLOAD_SAVED_COPIES for host RAM, the bound;
    OFFLOAD_SAVED_COPIES_GPU for PCIe time, as measured)."""
    if not cfg.train.offload_activations:
        return 0.0
    block_input, layer_acts, _ = _activation_sizes(shape, cfg, _dtype_bytes(dtype), longest)
    if cfg.train.grad_ckpt:
        return shape.layers * block_input
    return shape.layers * layer_acts * copies


def offloaded_activation_host_bytes(
    shape: ModelShape, cfg: RunConfig, dtype: str = "bfloat16", longest: int | None = None
) -> float:
    """Host RAM that train.offload_activations takes on one node: every GPU process's
    offloaded activations in pinned memory (which the allocator keeps cached from one
    micro-batch to the next). 0 without it."""
    if not cfg.train.offload_activations:
        return 0.0
    block_input, _, _ = _activation_sizes(shape, cfg, _dtype_bytes(dtype), longest)
    if cfg.train.grad_ckpt:
        per_gpu = shape.layers * pinned_block_bytes(block_input)
    else:
        per_gpu = offloaded_activation_transfer_bytes(shape, cfg, dtype, longest) * OFFLOAD_PINNED_ROUNDING
    return per_gpu * cfg.launch.gpus


def _fp32_tables(cfg: RunConfig) -> bool:
    """Whether the embeddings, head and norms are fp32: PEFT's prepare_model_for_kbit_training,
    which QLoRA runs with quant.upcast_embeddings."""
    return cfg.method == "qlora" and cfg.quant.upcast_embeddings


def host_embedding_bytes(shape: ModelShape, cfg: RunConfig, dtype: str = "bfloat16") -> float:
    """Bytes of the input embedding table that train.offload_embeddings keeps in host RAM
    instead of on the GPU (0 without it). In the dtype the weights load in, or fp32 where
    QLoRA upcasts the embeddings."""
    if not cfg.train.offload_embeddings:
        return 0.0
    return shape.embed_params * (4 if _fp32_tables(cfg) else _dtype_bytes(dtype))


def _optimizer_bytes(shape: ModelShape, cfg: RunConfig, n_train: int, state_bytes: int) -> tuple[float, float]:
    """(persistent state on the GPU, temporaries during the step)."""
    opt = cfg.train.optimizer
    if opt == "sgd":
        return 0.0, 0.0
    if opt.startswith("paged_"):
        # Paged optimizers keep their state in CUDA managed memory, which the driver
        # evicts to host RAM under pressure: not a cause of OOM (but of slower steps).
        return 0.0, 0.0
    if opt.endswith("8bit"):
        # Two 8-bit moments; the Trainer keeps nn.Embedding weights on 32-bit states,
        # and bitsandbytes updates those through an fp32 copy of their gradient.
        emb = shape.embed_params if cfg.method == "full" else 0
        return (n_train - emb) * 2 + emb * 8, emb * 4
    # torch AdamW: two moments in the parameters' dtype; the default (foreach) step
    # holds one parameter-sized temporary, the fused kernel none.
    temp = 0 if opt == "adamw_torch_fused" else n_train * state_bytes
    return n_train * 2 * state_bytes, temp


def _outside_allocator(cfg: RunConfig, world: int) -> float:
    """GiB a GPU process holds outside the caching allocator."""
    gib = CUDA_CONTEXT_GIB + (NCCL_GIB if world > 1 else 0.0)
    if cfg.deepspeed.offload_optimizer or cfg.deepspeed.offload_params:
        gib += OFFLOAD_OUTSIDE_GIB
    return gib


def fused_loss_bytes(shape: ModelShape, tokens: int, dtype_bytes: int, head_trainable: bool) -> float:
    """liger-kernel's fused linear cross-entropy (liger_kernel.ops.fused_linear_cross_entropy):
    logits exist one chunk of tokens at a time, the chunk sized so it holds about as many
    elements as the hidden states (next power of two of tokens / ceil(vocab / hidden));
    the input's gradient is computed in the forward pass and kept (tokens x hidden), with
    the fp32 per-token loss; a trainable head adds its fp32 weight gradient."""
    inc = -(-shape.vocab // shape.hidden)
    chunk = min(1 << max(0, math.ceil(math.log2(max(1, -(-tokens // inc))))), tokens)
    total = chunk * shape.vocab * dtype_bytes * FUSED_CHUNK_COPIES + tokens * shape.hidden * dtype_bytes + tokens * 4
    if head_trainable:
        total += shape.vocab * shape.hidden * 4
    return total


def estimate(
    shape: ModelShape, cfg: RunConfig, dtype: str = "bfloat16", device: str = "cuda", longest: int | None = None,
    shortest: int | None = None,
) -> MemoryBreakdown:
    """Peak bytes per GPU process for ``cfg`` on ``shape``; ``dtype`` is the resolved compute dtype.

    ``longest``: the dataset's longest example in tokens, if known. Micro-batches pad to
    their longest example, so none is longer than min(seq_len, longest): that is the
    worst case, and a dataset of short examples never reaches seq_len. With
    ``data.packing`` a row holds several examples and fills up to seq_len, so
    ``longest`` does not bound it. ``shortest``: the shortest example, if known; a dataset
    whose every example fills seq_len pads no micro-batch (attention_mask_reaches_sdpa).
    On ``device="cpu"`` the same tensors live in host RAM, without a CUDA context."""
    b = _dtype_bytes(dtype)
    world = cfg.world_size
    stage = cfg.deepspeed.stage
    n_train = trainable_params(shape, cfg)
    other = shape.embed_params + shape.head_params + shape.norm_params

    if cfg.method == "qlora":
        weights = shape.linear_params * _quant_bytes(cfg) + other * (4 if _fp32_tables(cfg) else b)
    else:
        weights = shape.total_params * b
    if device == "cuda":
        weights -= host_embedding_bytes(shape, cfg, dtype)
    step_slack = 0.0  # reserved but not allocated at the optimizer step, beyond OTHER_SLACK
    gathered = 0.0  # ZeRO-3: parameters gathered whole for the modules computing now
    gather_slack = 0.0  # ZeRO-3 QLoRA: reserved, not allocated, on DeepSpeed's gather stream
    if stage == 3:
        unsharded = weights
        weights = 0.0 if cfg.deepspeed.offload_params else weights / world
        if cfg.method != "qlora":
            # configs/deepspeed/zero3*.json keep up to stage3_max_live_parameters (1e9)
            # elements gathered at once, and with stage3_max_reuse_distance as large they
            # are kept, not re-fetched: in steady state the whole allowance is in use.
            gathered = min(ZERO3_MAX_LIVE_ELEMENTS * b, unsharded)
        else:
            # QLoRA's 4-bit weights escape that allowance: ZeRO-3's release after a module's forward only
            # swaps param.data, and bitsandbytes' 4-bit matmul keeps its own reference to
            # the gathered packed weight (its autograd node's ctx.tensors), so from the
            # first forward on every 4-bit linear is whole on every rank, quantization
            # state included, beside its shard; and the output head is gathered from its
            # forward to its backward (within the reuse distance). Measured on 2 H200s
            # (docs/benchmarks/distributed/session9-qlora3-diagnosis/): DeepSpeed's gather
            # stream holds 3.04 GiB for good after the first forward, the 7B's 4-bit
            # linears exactly, and 1.1 GiB more (the head) at the end of each forward.
            gathered = shape.linear_params * _quant_bytes(cfg) + shape.head_params * b
            # That stream's cache: memory the default stream cannot reuse. It reserved 6.09 GiB
            # for at most 4.15 allocated there: the head gathered, freed and gathered again
            # leaves about two heads' worth cached beyond what it holds.
            gather_slack = ZERO3_QLORA_GATHER_SLACK_HEADS * shape.head_params * b

    if stage:
        # DeepSpeed casts every parameter to the 16-bit dtype and keeps the fp32 copy
        # it updates in the optimizer: fp32 master weights and Adam's two fp32 moments,
        # 12 bytes per trainable parameter, partitioned over the ranks (stage >= 1) or
        # offloaded to host RAM. Gradients accumulate in 16 bits (grad_accum_dtype is
        # the model dtype), partitioned from stage 2, and the step works on an fp32
        # copy of this rank's gradient partition.
        adapters = n_train * b / (world if stage == 3 else 1) if cfg.uses_adapter else 0.0
        gradients = n_train * b / (world if stage >= 2 else 1)
        if stage >= 2:
            # The reduce buckets (reduce_bucket_size "auto" = hidden^2 elements), two
            # with overlap_comm.
            gradients += 2 * shape.hidden * shape.hidden * b
        if cfg.deepspeed.offload_optimizer:
            optimizer, opt_temp = 0.0, 0.0
        else:
            optimizer, opt_temp = 12 * n_train / world, 4 * n_train / world
            if stage == 3:
                # Measured (full 3B, 2 H200s): the allocator also keeps a second fp32
                # gradient partition's worth reserved after the step.
                step_slack = 4 * n_train / world
    else:
        # PEFT keeps adapter weights in fp32; full fine-tuning trains in the model dtype.
        train_bytes = 4 if cfg.uses_adapter else b
        adapters = n_train * train_bytes if cfg.uses_adapter else 0.0
        gradients = n_train * train_bytes
        optimizer, opt_temp = _optimizer_bytes(shape, cfg, n_train, train_bytes)
    weights += gathered

    seq = longest_micro_batch(cfg, longest)
    tokens = cfg.train.micro_batch * seq
    block_input, layer_acts, transient = _activation_sizes(shape, cfg, b, longest, shortest)
    n_ckpt = checkpointed_layers(shape, cfg)
    ckpt = n_ckpt > 0
    # Every layer checkpointed, or the last ones not (train.grad_ckpt_layers): their
    # backward runs first, so by the time a layer is recomputed they are freed.
    last_kept = n_ckpt < shape.layers
    ckpt_inputs = n_ckpt * block_input
    # Saved activations live at the loss, and in the backward (one block recomputed).
    saved = ckpt_inputs + (shape.layers - n_ckpt) * layer_acts
    in_backward = ckpt_inputs + layer_acts
    if cfg.train.offload_activations and device == "cuda":
        # On a CPU run host RAM is where they already are.
        saved, in_backward = offloaded_activation_gpu_bytes(shape.layers, block_input, layer_acts, ckpt)
    mask = eager_mask_bytes(cfg, b, seq)
    # A recomputed layer in the backward holds its transient beside the layer inputs still
    # kept; without checkpointing the last layer's forward holds it beside every saved
    # activation, which the loss's peak takes over from where the logits weigh more. With
    # every saved tensor in host RAM and no checkpointing it is not counted: the two H200
    # runs there (fused loss below) measured under the terms without it.
    if cfg.train.offload_activations and not ckpt and device == "cuda":
        transient = 0.0
    recomputed = transient if ckpt else 0.0  # without checkpointing the backward recomputes nothing
    saved, in_backward = saved + mask, in_backward + mask + recomputed
    if cfg.kernels.fused_loss:
        logits = fused_loss_bytes(shape, tokens, b, head_trainable=cfg.method == "full")
        loss_slack = OTHER_SLACK * logits
        # Kept with checkpointed layer inputs in host RAM: the fixed offload path recomputes
        # each layer on the GPU as the runs above do, and its four H200 runs
        # (docs/benchmarks/savers/, Qwen2.5-7B 8k-16k, Llama-3.1-8B 21k-22k) needed 0.2 GiB
        # less to 0.6 GiB more than the residual gives (-6.1% to +3.1% in all).
        residual = fused_residual_bytes(shape, cfg, seq)
        if cfg.train.offload_activations and not ckpt and device == "cuda":
            # Without checkpointing, with every saved tensor in host RAM, the two H200 runs
            # (docs/benchmarks/speed/2-max-context/: Qwen2.5-7B at 14,208 tokens, Llama-3.1-8B
            # at 3,456) measured 0.2-0.3 GiB under the terms above without the residual: none
            # of it is left on the GPU there.
            residual = 0.0
        # A layer's backward and its recomputation do not overlap: the backward holds the
        # larger of the recomputation's transient and the residual (the backward's own).
        # Without checkpointing the backward starts with every saved activation still held:
        # the residual counts at the loss.
        # With kernels.lean_mlp the recomputation makes no SwiGLU product (the transient), and
        # the residual, fitted on runs that made it, held it: the backward keeps the rest, and
        # at least the product's gradient (down_proj's input gradient, the same size). The 8 GB
        # group's plan on an H100 peaked 0.293 GiB lower with the skip than without (7.172
        # against 7.465 GiB, product 0.289; docs/benchmarks/speed/23-8gb-ab/).
        held = 2 * recomputed if lean_mlp_skips_product(shape, cfg) else recomputed
        late_extra = max(residual - held, 0.0)
        in_backward += late_extra
        if last_kept:
            logits += residual
    else:
        late_extra = 0.0
        # Logit softcapping (gemma2: tanh(logits / c) * c) keeps tanh's 16-bit output for
        # backward through the loss's peak (counted on CPU; the fused loss caps in its chunks).
        logits = tokens * shape.vocab * (LOSS_BYTES + (b if shape.final_softcap else 0))
        fp32_logits = tokens * shape.vocab * 4
        knee = LOSS_SLACK_KNEE_GIB * GIB
        loss_slack = fp32_logits if fp32_logits <= knee else knee + LOSS_SLACK_ABOVE * (fp32_logits - knee)
        loss_slack = max(loss_slack, LOSS_SLACK_MIN_GIB * GIB) + EAGER_SCORE_SLACK * eager_attention_bytes(shape, cfg, b, seq)

    if _fp32_tables(cfg) and b == 2:
        # PEFT's fp32 upcast leaves the output head in fp32. Under bf16/fp16 autocast its
        # matmul runs on a 16-bit copy of the weight, which autograd keeps (for the hidden
        # states' gradient) until the backward reaches the head: one more head, 16-bit, at the
        # loss (checked on CPU in tests/test_memory.py). shared/gpu/README.md's plain-HF runs
        # of the 8 GB seed measured 3.08 GiB more with the upcast than without (10.48 against
        # 7.40 GiB); the fp32 tables and this copy come to 3.05.
        logits += (shape.head_params or shape.embed_params) * b
    base = weights + adapters + optimizer
    # With accumulation, every micro-batch after the first reaches its loss with the
    # gradients of the ones before it still held (they are zeroed only after the step).
    accumulated = gradients if cfg.train.grad_accum > 1 else 0.0
    # The backward frees each layer's saved activations as it makes that layer's gradients.
    # With accumulation (or DeepSpeed's gradient buffers) the gradients of the micro-batches
    # before are held throughout; with one micro-batch per step they do not exist yet when
    # the backward starts (the Trainer sets them to None after each step), so its peak is at
    # the start, every saved activation still held, or at the end, every gradient made: a
    # memory snapshot of the 7B QLoRA r128 all-linear plan at micro-batch 16 (H200,
    # scripts/backward_peak_report.py) had 4.4 GiB of layer inputs and no gradients at the peak.
    # Adapters only: full fine-tuning makes the output head's gradient (the embeddings' where
    # they are tied) as its backward starts.
    if accumulated or stage or not cfg.uses_adapter:
        backward = (base + gradients + in_backward, {"gradients": gradients, "activations": in_backward})
    else:
        late = layer_acts + mask + recomputed + late_extra  # the last layer's recomputed (or kept) activations
        if late + gradients > in_backward:
            backward = (base + gradients + late, {"gradients": gradients, "activations": late})
        else:
            backward = (base + in_backward, {"gradients": 0.0, "activations": in_backward})
    at_loss = {"gradients": accumulated, "activations": saved, "logits": logits}
    if last_kept and transient > logits + loss_slack:
        # The last layer's forward (every activation saved, its transient held) is the larger.
        at_loss = {"gradients": accumulated, "activations": saved + transient, "logits": 0.0}
        loss_slack = OTHER_SLACK * transient
    phases = {
        "loss": (base + sum(at_loss.values()), at_loss),
        "backward": backward,
        "optimizer step": (base + gradients + opt_temp, {"gradients": gradients, "optimizer": optimizer + opt_temp}),
    }
    # train.offload_async's copies on a stream of their own: the allocator keeps more reserved
    # than with the copies in order (two H100 runs of one plan, in-sample).
    async_reserve = OFFLOAD_ASYNC_RESERVE_INPUTS * block_input if offload_async_applies(cfg, device) else 0.0
    slack = {
        "loss": loss_slack + gather_slack + async_reserve,
        "backward": OTHER_SLACK * phases["backward"][0] + gather_slack + async_reserve,
        "optimizer step": OTHER_SLACK * phases["optimizer step"][0] + step_slack + gather_slack,
    }
    phase = max(phases, key=lambda k: phases[k][0] + slack[k])
    _, live = phases[phase]
    parts = {"gradients": 0.0, "activations": 0.0, "logits": 0.0, "optimizer": optimizer, **live}
    return MemoryBreakdown(
        weights=weights,
        adapters=adapters,
        gradients=parts["gradients"],
        optimizer=parts["optimizer"],
        activations=parts["activations"],
        logits=parts["logits"],
        allocator_slack=slack[phase],
        cuda_context=_outside_allocator(cfg, world) * GIB if device == "cuda" else 0.0,
        trainable_params=n_train,
        world_size=world,
        phase=phase,
    )

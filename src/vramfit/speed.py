"""Predicted training speed: tokens/s and wall time. Pure arithmetic: no torch.

Time per micro-batch comes from these terms, each a feature (step_features) times one
coefficient fitted by scripts/fit_speed.py to the H200 runs in docs/benchmarks, the GPU's,
the CPU's and the copy engines' work overlapping (combine()):

- matrix work: FLOPs / (the GPU's dense bf16 peak x an efficiency): 2N per token
  forward through every linear layer (and the lm_head), 2N backward for the input
  gradients, 2N more for weight gradients in full fine-tuning, 2N more to recompute
  checkpointed blocks, plus causal attention (2 x layers x seq x q_dim forward);
- 4-bit dequantization (QLoRA): every linear weight is dequantized once per pass
  (forward, backward, recompute), independent of the tokens in the micro-batch;
- the CPU's overhead per pass (Python, kernel launches): per decoder layer, per
  LoRA-wrapped linear (PEFT's wrapper), per 4-bit linear (bitsandbytes' call): what makes
  small models and small micro-batches wait on Python;
- the loss over full-vocabulary logits, memory-bound: tokens x vocabulary;
- LoRA's own memory-bound kernels (dropout, the skinny adapter matmuls, the scaling and adds,
  their gradients): bytes they move, per adapted linear (lora_io_bytes);

plus, with train.offload_activations, the saved activations' copies to host RAM and
back over PCIe (OFFLOAD_PCIE_GB_S: an effective rate from H200 runs, far below PCIe's).

Padding counts: a micro-batch pads to its longest example, so the speed in real
tokens is the padded speed times (mean length / padded length). With packing the
same holds for rows: the sampled lengths are packed as data.pack_rows packs the
dataset, and a micro-batch pads to its longest row.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from .config import RunConfig
from .data import pack_rows
from .memory import (
    MLP_LINEARS,
    OFFLOAD_SAVED_COPIES_GPU,
    adapted_targets,
    checkpointed_layers,
    fused_lora_mode,
    mlp_shards,
    offload_async_applies,
    offloaded_activation_transfer_bytes,
    pad_multiple,
)
from .model_shape import DOWN_PROJ_LAST, ModelShape

# Dense bf16 tensor throughput (TFLOP/s, no sparsity) by GPU name, from the vendors'
# data sheets. Used to scale the H200-fitted times to other cards: an estimate there.
GPU_TFLOPS = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("GH200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("A6000", 155.0),
    ("RTX 6000 Ada", 364.0),
    ("4090", 165.0),
    ("4080", 97.0),
    ("4070", 58.0),
    ("4060", 44.0),
    ("3090", 71.0),
    ("3080", 60.0),
    ("3070", 40.0),
    ("3060", 25.0),
    ("A10", 125.0),
    ("L4", 121.0),
    ("T4", 65.0),
    ("V100", 125.0),
)
CALIBRATION_TFLOPS = 989.0  # the H200 the coefficients were fitted on
# Cards where the H200-fitted model was checked, by how fast the same plans (configs equal
# key for key) trained there against an H200, beyond what the data-sheet rate above says (the
# same 989 for both). H100 SXM, three pairs: the 8 GB plan (Qwen2.5-7B QLoRA r8 q/v, 16 x 512)
# 0.940x and 0.946x (12,220 and 12,293 against 12,999 tokens/s: docs/benchmarks/speed/
# 12-8gb-qlora-fused-async and speed-checks/16-fused-lora-and-async against speed/8-liger-ops-auto),
# the 24 GB guide's method-kept plan (LoRA r128 all-linear, 4 x 1536, 8-bit AdamW) 0.932x
# (9,226 against 9,900: speed-checks/16 against speed/11-24gb-lora-method-kept-8bit). It has
# 0.7x the H200's memory bandwidth, and its measured matmul peak was 3% lower (734 against
# 757 TFLOP/s). Cards not listed: 1.0 (never measured).
GPU_MEASURED_RELATIVE = (("H100 80GB HBM3", 0.94),)
DEFAULT_TFLOPS = 312.0

# Fitted by scripts/fit_speed.py (`python scripts/fit_speed.py --write`: non-negative least
# squares on the relative time per micro-batch, then bounded least squares for the overlap in
# combine()) to 149 runs on one or two H200s, each trained alone: the auto-fit grids since
# padding to a multiple of 64 (sessions 7-11; the unpadded grids of sessions 3-7 met a new batch
# shape nearly every step), the speed benchmark's groups, the fused-loss and distributed runs,
# and the calibration runs that had the GPU alone (the others and their reasons: the script's
# table). Session 11 refitted on every grid so far, the first plans that checkpoint only some
# layers (train.grad_ckpt_layers) among them. Session 12 added LoRA's memory-bound kernels
# (lora_io, below) and refitted the same 149 runs (no new GPU runs). Error in tokens/s: median
# 5.8%, worst 41% in-sample; median 6.1%, worst 42% leaving each run out (without the LoRA
# term: 8.2%, 52%). Out of sample before that term: session 11's whole grid, run after its
# refit, 24 of 24 within 16% (docs/benchmarks/autofit.md). Repeated runs
# of one plan differ by up to 27% between H200 hosts; the 0.5B, whose steps wait on the CPU,
# measured from 27.6k to 43.0k tokens/s in one fresh host's grid, rising with each run
# (docs/benchmarks/speed-checks/13-small-model-spread/ has its profiles). Known misses: the
# seed configs' fp32-embedding runs (not fitted).
# How the terms combine (combine()): the matrix work, dequantization, LoRA's kernels and loss are the GPU's;
# the per-layer, per-adapted-linear and per-4-bit-linear overheads the CPU's. The two
# overlap, as a p-norm with this p (3: leave-one-out best of 2, 2.5, 3, 4 and 6 within 0.4
# points; the sum, p = 1, was worse by 3, fit_speed.py --forms).
OVERLAP_P = 3.0
GPU_TERMS = ("matmul", "dequant", "loss", "lora_io")
CPU_TERMS = ("layer_pass", "module_pass", "q4_module_pass")
# train.offload_activations' copies of checkpointed layer inputs: a third part of the same
# p-norm, as if hidden under the compute while they are smaller (the six runs
# OFFLOAD_PCIE_GB_S comes from: ~0 s beyond the other terms for 3.3 GB at the 7B's 8k
# tokens). In fact, without train.offload_async (opt-in), they are queued on the compute
# stream, each stalling the kernels after it (offload.InlineCopies): the fitted rate and the
# norm describe those runs. Copies on a stream of their own: ASYNC_HIDDEN_S_PER_GB.
# Without checkpointing the backward waits on every saved tensor's copy back, and the copies
# add (1.2-1.5 s for 64-81 GB there).
COPY_TERMS = ("offload_checkpointed",)
NORM_TERMS = GPU_TERMS + CPU_TERMS + COPY_TERMS  # the rest add after the norm
MATMUL_EFFICIENCY = 1 / 1.443  # fraction of the dense peak the matrix work reaches
DEQUANT_S_PER_TPARAM_PASS = 3.1e-20  # seconds per 1e12 dequantized weights (fitted to zero)
LAYER_PASS_S = 0.00116  # seconds of overhead per decoder layer per pass
MODULE_PASS_S = 0.000484  # seconds per LoRA-wrapped linear per pass
Q4_MODULE_PASS_S = 0.000173  # seconds per 4-bit linear per pass
LOSS_S_PER_TLOGIT = 46.8  # the loss: seconds per 1e12 logits (tokens x vocabulary), plain or fused
# ZeRO-3 all-gathers every parameter for each pass (forward, backward, and the
# checkpointed recompute): seconds per GB of (unsharded) weights per pass. Fitted with the
# rest on the 2-H200 runs (docs/benchmarks/distributed/): full fine-tuning of the 3B and the
# offload run (16-bit weights) and two QLoRA runs of the 7B (4-bit weights stored as bf16,
# whose gathers also dequantize). Few runs: another shape's ZeRO-3 speed is an extrapolation.
ZERO3_S_PER_GB_PASS = {"16bit": 0.053, "4bit": 0.109}
# ... and with the parameters offloaded to host RAM, what streaming them over PCIe adds
# per GB per pass (the 8 GB seed route: 3B LoRA, seq 4096, 1 H200; one run, which alone
# determines it: in-sample only).
ZERO3_OFFLOAD_S_PER_GB_PASS = 0.033
# train.offload_activations: the effective GB/s of each copy (device to host in the
# forward, back in the backward), counted as adding to the step. The pinned copies mostly
# overlap the compute, so this is what is left of them: measured on the fixed path (hooks
# outside each layer's checkpoint), six H200 runs (docs/benchmarks/savers/ and
# docs/benchmarks/speed/2-max-context/), the time beyond this model's other terms against
# the bytes copied (metrics.json's offloaded_activations, out and back): with
# checkpointing ~0 s for 3.3 GB (Qwen2.5-7B 8k), 0.38 s for 6.6 GB (16k), 1.7 s for
# 11-12 GB (Llama-3.1-8B 21-22k, where part is the other terms' error: all-linear LoRA
# with the tiled MLP); without it 1.17 s for 64 GB (Llama, 3,456) and 1.54 s for 81 GB
# (Qwen, 14,208). A least-squares rate through all six. (The one earlier run, 2.06 GB/s,
# was transformers 5.17 copying each layer's insides too: docs/benchmarks/fused/.)
OFFLOAD_PCIE_GB_S = 46.0
# train.offload_async (offload.StreamCopies): seconds per GB of checkpointed layer inputs
# copied (out and back) that copies on a CUDA stream of their own take off the micro-batch.
# Three A/B pairs on H100s, each on one machine: the 8 GB plan (Qwen2.5-7B QLoRA r8 q/v,
# 16 x 512, 3.29 GB a micro-batch) 48.5 ms and 26 ms less (14.7 and 7.9 ms/GB, sessions 13
# and 14), the 24 GB guide's r128 all-linear plan (8 x 1536, 4.93 GB) 42 ms less (8.5 ms/GB,
# session 15, docs/benchmarks/speed-checks/18-lean-recompute). The smallest is credited.
ASYNC_HIDDEN_S_PER_GB = 0.0079
# kernels.liger_ops: liger's fused RMSNorm, SwiGLU and RoPE replace several elementwise
# kernels per layer, the work the per-layer overhead (LAYER_PASS_S) stands for. The share
# of it left: from one H200 pair (docs/benchmarks/speed/7-8gb-liger-ops/: Qwen2.5-7B QLoRA,
# micro-batch 16 x 512 tokens, checkpointing) that trained 13,103 tokens/s against 10,994,
# 0.12 s less per micro-batch, 39% of that term. One pair: an estimate, not a fit.
LIGER_LAYER_PASS = 0.61
# LoRA's memory-bound work (lora_io_bytes): seconds per GB its kernels move. PEFT runs each
# adapter as its own modules and ops (dropout, two skinny matmuls, the scaling, the add into
# the base output and, in the backward, their gradients and the sum of the two input
# gradients): r128 all-linear on a 7B was 16% of the step (docs/benchmarks/speed-checks/15-...).
# Fitted with the rest: ~2.3 TB/s effective, under half the H200's 4.8. It is what put the 24
# GB guide's r128 all-linear plans within 5% (over-predicted by 11-19% before). With
# kernels.fused_lora the same coefficient times fused_lora.py's smaller byte count (16-bit
# and 4-bit layers): a prediction from the kernel count, not yet measured.
LORA_IO_S_PER_GB = 0.00043
# train.offload_embeddings: GB/s of looked-up embedding rows (CPU gather + unpinned copy to
# the GPU), adding to the step. Not separately measured: a conservative guess. The rows are
# a few MB to ~100 MB per micro-batch, so the term is small either way; the runs with it in
# docs/benchmarks/savers/ trained faster than predicted.
EMBED_ROWS_GB_S = 5.0


@dataclass(frozen=True)
class LengthStats:
    """Example lengths in tokens (before truncation), as the dataset holds them."""

    lengths: tuple[int, ...]

    @property
    def mean(self) -> float:
        return sum(self.lengths) / len(self.lengths)

    @property
    def longest(self) -> int:
        return max(self.lengths)

    @property
    def shortest(self) -> int:
        return min(self.lengths)

    def truncated_share(self, seq_len: int) -> float:
        return sum(1 for n in self.lengths if n > seq_len) / len(self.lengths)

    def mean_cut(self, seq_len: int) -> float:
        return sum(min(n, seq_len) for n in self.lengths) / len(self.lengths)

    def packed(self, seq_len: int) -> LengthStats:
        """Row lengths after packing these examples (cut to seq_len) into rows of seq_len."""
        return _packed(self.lengths, seq_len)

    def padded(self, seq_len: int, micro_batch: int) -> float:
        """Expected length of the longest of ``micro_batch`` random examples (cut to
        seq_len): what a micro-batch pads to. Exact over the empirical distribution."""
        cut = sorted(min(n, seq_len) for n in self.lengths)
        n = len(cut)
        # P(max <= cut[i]) = ((i + 1) / n) ** mb for sampling with replacement.
        total, prev = 0.0, 0.0
        for i, v in enumerate(cut):
            p = ((i + 1) / n) ** micro_batch
            total += v * (p - prev)
            prev = p
        return total


@lru_cache(maxsize=32)  # auto-fit asks once per candidate, for a handful of seq_lens
def _packed(lengths: tuple[int, ...], seq_len: int) -> LengthStats:
    cut = [min(n, seq_len) for n in lengths]
    return LengthStats(tuple(sum(cut[i] for i in row) for row in pack_rows(cut, seq_len)))


def gpu_tflops(name: str | None) -> tuple[float, bool]:
    """(dense bf16 TFLOP/s, whether the GPU is known)."""
    for key, tflops in GPU_TFLOPS:
        if name and key.lower() in name.lower():
            return tflops, True
    return DEFAULT_TFLOPS, False


def measured_relative(name: str | None) -> float:
    """How fast this card trained the same plans as the calibration H200, beyond its
    data-sheet rate (GPU_MEASURED_RELATIVE), or 1.0 where that was never measured."""
    for key, rel in GPU_MEASURED_RELATIVE:
        if name and key.lower() in name.lower():
            return rel
    return 1.0


def adapted_modules_per_layer(shape: ModelShape, cfg: RunConfig) -> int:
    """Linear layers per decoder block that PEFT wraps with a LoRA adapter (0 for full
    fine-tuning): each wrapper is a Python module call and a few small kernels per pass."""
    return len(adapted_targets(shape, cfg)) if cfg.uses_adapter else 0


def fused_lora_applies(cfg: RunConfig) -> bool:
    return fused_lora_mode(cfg) is not None


def lean_recompute_applies(cfg: RunConfig) -> bool:
    """What kernels.lean_recompute needs of the config (train.py flags the layers where this
    holds): checkpointing, the fused LoRA layers, and no tiled MLP (which recomputes its own)."""
    return cfg.kernels.lean_recompute and cfg.train.grad_ckpt and fused_lora_applies(cfg) and not cfg.kernels.tiled_mlp


def lean_recompute_params(shape: ModelShape, cfg: RunConfig) -> int:
    """Weights per decoder layer whose multiply kernels.lean_recompute leaves out of a
    checkpointed layer's recomputation (fused_lora.mark_unused_outputs): an adapted down_proj
    where the layer ends in it. 0 where it does not apply."""
    if not lean_recompute_applies(cfg) or shape.model_type not in DOWN_PROJ_LAST or "down_proj" not in adapted_targets(shape, cfg):
        return 0
    a, b = shape.layer_linears()["down_proj"]
    return a * b


def lora_io_bytes(in_f: int, out_f: int, dropout: bool, mode: str) -> tuple[float, float]:
    """Bytes per token that LoRA's memory-bound kernels move for one adapted linear layer of
    ``in_f`` inputs and ``out_f`` outputs: (one forward pass, the backward). 16-bit
    activations, a 1-byte dropout mask; the r-wide tensors are left out (r is far below the
    layer's width). Counted kernel by kernel for each ``mode``: PEFT's 16-bit layer ("peft")
    and 4-bit one ("peft4bit", which also clones the base output), and fused_lora.py's
    "fused" and "branch" (fused_lora_mode)."""
    # Dropout, each way: forward reads x and writes the dropped copy and its mask; backward
    # reads the gradient and the mask and writes the result.
    drop = 5 * in_f if dropout else 0
    if mode == "fused":
        # addmm_ reads and writes the output; the backward reads the gradient twice (for
        # lora_B's input and weight gradients), the dropped input once (lora_A's weight), and
        # adds the adapter's input gradient with one addcmul_ (mask) or addmm_ epilogue.
        return drop + 2 * in_f + 4 * out_f, 4 * out_f + 2 * in_f + (9 * in_f if dropout else 4 * in_f)
    if mode == "branch":
        # One out-of-place addmm reads the base output and writes the sum; the backward as
        # PEFT's less the scaling's pass over the output-wide gradient.
        return drop + 2 * in_f + 4 * out_f, 4 * out_f + 4 * in_f + drop + 6 * in_f
    # lora_A reads the input, lora_B writes an output, the mul and the add read and write it
    # (and a 4-bit layer first clones the base output); the backward's scaling, lora_B's two
    # reads, lora_A's gradient write and input read, the dropout's backward, and the add of
    # two input gradients.
    clone = 4 * out_f if mode == "peft4bit" else 0
    return drop + 2 * in_f + 12 * out_f + clone, 8 * out_f + 4 * in_f + drop + 6 * in_f


def lora_io_gb(shape: ModelShape, cfg: RunConfig, tokens: float, ckpt: float) -> float:
    """GB LoRA's memory-bound kernels move in one micro-batch: a forward pass per checkpointed
    layer's recomputation too."""
    if not cfg.uses_adapter:
        return 0.0
    linears = shape.layer_linears()
    mode = fused_lora_mode(cfg) or ("peft4bit" if cfg.method == "qlora" else "peft")
    per_token = 0.0
    for name in adapted_targets(shape, cfg):
        fwd, bwd = lora_io_bytes(*linears[name], cfg.lora.dropout > 0, mode)
        per_token += fwd * (1 + ckpt) + bwd
    return tokens * shape.layers * per_token / 1e9


def step_features(shape: ModelShape, cfg: RunConfig, padded_len: float, tflops: float) -> dict[str, float]:
    """Each time term of one micro-batch per unit of its coefficient: the term's seconds are
    ``feature x coefficient`` (COEFFICIENTS). One formula, used by micro_step_terms here and by
    scripts/fit_speed.py to fit the coefficients."""
    tokens = cfg.train.micro_batch * padded_len
    full = cfg.method == "full"
    # The share of the decoder layers recomputed in the backward (train.grad_ckpt_layers:
    # some of them); each adds one forward of its own.
    ckpt = checkpointed_layers(shape, cfg) / shape.layers
    n_matmul = shape.linear_params + shape.vocab * shape.hidden
    q = shape.heads * shape.head_dim
    # kernels.lean_recompute: a multiply the recomputations leave out (and its dequantization)
    skipped = ckpt * shape.layers * lean_recompute_params(shape, cfg)
    flops = tokens * (
        n_matmul * (4 + (2 if full else 0) + 2 * ckpt) - 2 * skipped + 2 * shape.layers * padded_len * q * (3 + ckpt)
    )
    passes = 2 + ckpt
    dequantized = passes * shape.linear_params - skipped
    shards = mlp_shards(shape.hidden, round(padded_len)) if cfg.kernels.tiled_mlp else 1
    if shards > 1:
        # kernels.tiled_mlp recomputes the MLP forward in the backward, and (QLoRA) each of
        # its 4-bit weights is dequantized once per chunk of every pass.
        mlp = shape.layers * sum(a * b for n, (a, b) in shape.layer_linears().items() if n in MLP_LINEARS)
        flops += tokens * 2 * mlp
        dequantized += mlp * ((passes + 1) * shards - passes)
    # The overhead terms were measured on the calibration GPU; scale them with its speed too.
    scale = CALIBRATION_TFLOPS / tflops
    f = {
        "matmul": flops / (tflops * 1e12),  # seconds at the dense peak
        "dequant": scale * dequantized * 1e-12 if cfg.method == "qlora" else 0.0,
        "layer_pass": scale * passes * shape.layers * (LIGER_LAYER_PASS if cfg.kernels.liger_ops else 1.0),
        "module_pass": scale * passes * shape.layers * adapted_modules_per_layer(shape, cfg),
        "q4_module_pass": scale * passes * shape.layers * len(shape.layer_linears()) if cfg.method == "qlora" else 0.0,
        "loss": scale * tokens * shape.vocab * 1e-12,
        # memory-bound: scaled like the rest, though a GPU's bandwidth and its matrix
        # throughput need not keep one ratio
        "lora_io": scale * lora_io_gb(shape, cfg, tokens, ckpt),
        "zero3_16bit": 0.0,
        "zero3_4bit": 0.0,
        "zero3_offload": 0.0,
        "offload_activations": 0.0,
        "offload_checkpointed": 0.0,
    }
    if cfg.deepspeed.stage == 3:
        if cfg.method == "qlora":
            other = shape.embed_params + shape.head_params + shape.norm_params
            f["zero3_4bit"] = passes * (shape.linear_params * 0.5 + other * 2) / 1e9
        else:
            f["zero3_16bit"] = passes * shape.total_params * 2 / 1e9
            if cfg.deepspeed.offload_params:
                f["zero3_offload"] = f["zero3_16bit"]
    # Out to host RAM in the forward and back in the backward; called at the padded length,
    # the length the copies have. GB moved: its coefficient is 1 / OFFLOAD_PCIE_GB_S.
    moved = offloaded_activation_transfer_bytes(shape, cfg, longest=max(1, round(padded_len)), copies=OFFLOAD_SAVED_COPIES_GPU)
    # With checkpointing only the layer inputs go (in the norm: COPY_TERMS says how that was
    # fitted). Without it every saved tensor goes and the backward waits for them: they add.
    f["offload_checkpointed" if ckpt else "offload_activations"] = 2 * moved / 1e9
    # train.offload_embeddings: the CPU's gather of the looked-up rows and their copy to the
    # GPU, once per micro-batch. GB: its coefficient is 1 / EMBED_ROWS_GB_S. With
    # train.offload_embeddings_async they run while the GPU works, not before it: on an H100
    # the 8 GB group's plan ran 2.9% and 1.5% faster with it than without in two pairs of runs
    # (docs/benchmarks/speed/23-8gb-ab/), where this term is 2.0% of its step.
    overlapped = cfg.train.offload_embeddings_async
    f["embed_rows"] = tokens * shape.hidden * 2 / 1e9 if cfg.train.offload_embeddings and not overlapped else 0.0
    return f


def coefficients() -> dict[str, float]:
    """The fitted constants by step_features' names (read at call time, so a script or test
    that sets a module constant sees it used)."""
    return {
        "matmul": 1 / MATMUL_EFFICIENCY,
        "dequant": DEQUANT_S_PER_TPARAM_PASS,
        "layer_pass": LAYER_PASS_S,
        "module_pass": MODULE_PASS_S,
        "q4_module_pass": Q4_MODULE_PASS_S,
        "loss": LOSS_S_PER_TLOGIT,
        "lora_io": LORA_IO_S_PER_GB,
        "zero3_16bit": ZERO3_S_PER_GB_PASS["16bit"],
        "zero3_4bit": ZERO3_S_PER_GB_PASS["4bit"],
        "zero3_offload": ZERO3_OFFLOAD_S_PER_GB_PASS,
        "offload_activations": 1 / OFFLOAD_PCIE_GB_S,
        "offload_checkpointed": 1 / OFFLOAD_PCIE_GB_S,
        "embed_rows": 1 / EMBED_ROWS_GB_S,
    }


def micro_step_terms(shape: ModelShape, cfg: RunConfig, padded_len: float, tflops: float) -> dict[str, float]:
    """Seconds of each term of one micro-batch (forward + backward) on one GPU."""
    coef = coefficients()
    return {k: v * coef[k] for k, v in step_features(shape, cfg, padded_len, tflops).items()}


def combine(terms: dict[str, float], p: float = OVERLAP_P) -> float:
    """One micro-batch's seconds from its terms: the GPU's work and the CPU's launch work
    overlap (the CPU queues kernels ahead while the GPU runs them), so they combine as
    (G^p + C^p)^(1/p), near the larger of the two and above it where they are close; the
    activations' copies to host RAM and back join the same norm (COPY_TERMS); the
    embedding rows' host gather and ZeRO-3's gathers add. Where the CPU's part is the larger
    (small models, QLoRA's per-linear calls at small micro-batches) the step waits on Python.
    The terms may be numpy arrays (scripts/fit_speed.py fits through this same formula)."""
    gpu, cpu, copies = norm_parts(terms)
    rest = sum(v for k, v in terms.items() if k not in NORM_TERMS)
    return (gpu**p + cpu**p + copies**p) ** (1 / p) + rest


def norm_parts(terms: dict) -> tuple:
    """The GPU's, the CPU's and the copies' seconds: the three parts of combine()'s norm."""
    return tuple(sum(terms.get(k, 0.0) for k in ks) for ks in (GPU_TERMS, CPU_TERMS, COPY_TERMS))


def async_hidden_seconds(shape: ModelShape, cfg: RunConfig, padded_len: float) -> float:
    """What train.offload_async takes off one micro-batch (ASYNC_HIDDEN_S_PER_GB), where
    train.py applies it (memory.offload_async_applies: the plans are for a GPU)."""
    if not offload_async_applies(cfg, "cuda"):
        return 0.0
    moved = offloaded_activation_transfer_bytes(shape, cfg, longest=max(1, round(padded_len)), copies=OFFLOAD_SAVED_COPIES_GPU)
    return ASYNC_HIDDEN_S_PER_GB * 2 * moved / 1e9


def micro_step_seconds(shape: ModelShape, cfg: RunConfig, padded_len: float, tflops: float,
                       terms: dict[str, float] | None = None) -> float:  # fmt: skip
    """Seconds for one micro-batch (forward + backward) on one GPU. ``terms``: its
    micro_step_terms, where the caller has them already."""
    if terms is None:
        terms = micro_step_terms(shape, cfg, padded_len, tflops)
    return combine(terms) - async_hidden_seconds(shape, cfg, padded_len)


@dataclass(frozen=True)
class SpeedEstimate:
    tokens_per_s: float  # real (non-padding) tokens per second, all GPUs together
    padded_share: float  # share of computed positions that are padding
    gpu_known: bool
    # The CPU's launch work per micro-batch over the GPU's (combine()'s two parts): above 1 the
    # steps wait on Python, and the speed follows the host CPU more than the GPU.
    cpu_to_gpu: float = 0.0

    @property
    def cpu_bound(self) -> bool:
        return self.cpu_to_gpu > 1.0


def batch_lengths(cfg: RunConfig, lengths: LengthStats | None) -> tuple[float, float]:
    """(padded length of a micro-batch, mean real length of its sequences). Without length
    statistics, examples are assumed to fill seq_len; with packing, the sequences are the
    packed rows."""
    seq = cfg.data.seq_len
    if lengths is not None and cfg.data.packing:
        lengths = lengths.packed(seq)
    if lengths is None:
        return float(seq), float(seq)
    # Rounded up to the multiple (memory.pad_multiple): half of one on average, never past seq_len.
    m = pad_multiple(cfg)
    padded = lengths.padded(seq, cfg.train.micro_batch) + (m / 2 if m > 1 else 0.0)
    return min(float(seq), padded), lengths.mean_cut(seq)


def estimate_speed(shape: ModelShape, cfg: RunConfig, lengths: LengthStats | None, gpu_name: str | None) -> SpeedEstimate:
    """Tokens/s of ``cfg``. Without length statistics, examples are assumed to fill seq_len.

    With packing, the trainer's sequences are packed rows: their lengths replace the examples'."""
    tflops, known = gpu_tflops(gpu_name)
    tflops *= measured_relative(gpu_name)
    padded, real = batch_lengths(cfg, lengths)
    terms = micro_step_terms(shape, cfg, padded, tflops)
    t = micro_step_seconds(shape, cfg, padded, tflops, terms)
    rate = cfg.train.micro_batch * real / t * cfg.world_size
    gpu, cpu, _ = norm_parts(terms)
    return SpeedEstimate(
        tokens_per_s=rate, padded_share=1 - real / padded if padded else 0.0, gpu_known=known, cpu_to_gpu=cpu / gpu if gpu else 0.0
    )

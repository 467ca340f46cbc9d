"""Resolved config + hardware facts + model shape -> Plan (memory breakdown, fit verdict).

Pure: hardware facts are passed in, never probed here, so a fake 8 GB card tests it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from . import distributed
from .kernels import LIGER_MODEL_TYPES, NO_SDPA_MODEL_TYPES, flash_attn_installed
from .config import RunConfig
from .embedded import EMBEDDED_MODEL
from .errors import ConfigError, FitError, ModelError
from .hardware import HardwareFacts
from .memory import GIB, MemoryBreakdown, estimate
from .model_shape import FUSED, ModelShape
from .speed import LengthStats, SpeedEstimate, estimate_speed


@dataclass
class Plan:
    config: RunConfig
    sources: dict[str, str]
    preset: str | None
    shape: ModelShape
    hardware: HardwareFacts
    dtype: str  # resolved compute dtype
    device: str  # "cuda" or "cpu"
    budget_gib: float | None
    budget_source: str | None
    breakdown: MemoryBreakdown
    notes: list[str] = field(default_factory=list)
    choices: list[str] = field(default_factory=list)  # auto-fit: one line per decision
    speed: SpeedEstimate | None = None
    steps: int | None = None  # optimizer steps the run will take
    wall_s: float | None = None
    gpu_hour_price: float | None = None
    lengths: LengthStats | None = None

    @property
    def cost(self) -> float | None:
        if self.wall_s is None or self.gpu_hour_price is None:
            return None
        return self.wall_s / 3600 * self.gpu_hour_price * self.config.world_size

    @property
    def model_ref(self) -> str:
        return self.config.model.name or EMBEDDED_MODEL

    @property
    def fits(self) -> bool:
        return self.budget_gib is None or self.breakdown.peak_gib <= self.budget_gib

    def summary(self) -> dict[str, Any]:
        """The machine-readable plan (`vramfit plan --json`, plan.yaml)."""
        return {
            "model": self.model_ref,
            "preset": self.preset,
            "method": self.config.method,
            "device": self.device,
            "dtype": self.dtype,
            "world_size": self.config.world_size,
            "predicted_peak_gib": round(self.breakdown.peak_gib, 3),
            "budget_gib": self.budget_gib,
            "budget_source": self.budget_source,
            "fits": self.fits,
            "breakdown": self.breakdown.gib(),
            "peak_phase": self.breakdown.phase,
            "predicted_tokens_per_s": round(self.speed.tokens_per_s, 1) if self.speed else None,
            "predicted_steps": self.steps,
            "predicted_wall_s": round(self.wall_s, 1) if self.wall_s is not None else None,
            "predicted_cost": round(self.cost, 2) if self.cost is not None else None,
            "gpu_hour_price": self.gpu_hour_price,
            "auto_fit": self.choices,
            "trainable_params": self.breakdown.trainable_params,
            "total_params": self.shape.total_params,
            "notes": self.notes,
            "config": self.config.model_dump(mode="json"),
            "sources": self.sources,
            "shape": self.shape.to_dict(),
            "hardware": self.hardware.to_dict(),
        }


def resolve_dtype(requested: str, facts: HardwareFacts) -> str:
    if requested != "auto":
        return requested
    if not facts.has_gpu:
        return "float32"  # CPU matmuls in bf16 are slow and lossy for a tiny model
    return "bfloat16" if all(g.bf16 for g in facts.gpus) else "float16"


def build_plan(
    config: RunConfig,
    shape: ModelShape,
    facts: HardwareFacts,
    sources: dict[str, str] | None = None,
    preset: str | None = None,
    lengths: LengthStats | None = None,
    n_examples: int | None = None,
    gpu_hour_price: float | None = None,
) -> Plan:
    split = shape.split_fused_targets(config.lora.target_modules) if config.uses_adapter else []
    if split:
        fused = ", ".join(f for f, parts in FUSED[shape.model_type].items() if set(parts) & set(split))
        raise ModelError(
            f"lora.target_modules {split} are only part of this {shape.model_type} model's fused {fused}, which LoRA adapts whole",
            f"target {fused} (or all of its parts), or all-linear",
        )
    unknown = shape.unknown_targets(config.lora.target_modules) if config.uses_adapter else []
    if unknown:
        valid = ", ".join(shape.layer_linears())
        raise ModelError(
            f"lora.target_modules {unknown} are not linear layers of this {shape.model_type} model",
            f"use some of: {valid}, or all-linear",
        )
    if config.method == "qlora" and not facts.has_gpu:
        raise FitError("qlora needs an NVIDIA GPU (bitsandbytes 4-bit kernels)", "use --preset cpu, or method lora")
    if config.deepspeed.stage and not facts.has_gpu:
        raise FitError(
            f"DeepSpeed ZeRO-{config.deepspeed.stage} needs NVIDIA GPUs and none was found",
            "use --preset cpu here, or run this plan on a GPU machine",
        )
    for key, what in (("fused_loss", "fused loss"), ("liger_ops", "fused ops")):
        if not getattr(config.kernels, key):
            continue
        if not facts.has_gpu:
            raise FitError(
                f"kernels.{key} needs an NVIDIA GPU (liger-kernel's Triton kernels)",
                f"use --set kernels.{key}=false here",
            )
        if shape.model_type not in LIGER_MODEL_TYPES:
            raise ConfigError(
                f"kernels.{key}: liger-kernel has no {what} for {shape.model_type} models",
                f"use --set kernels.{key}=false",
            )
    if config.train.offload_embeddings and shape.tied:
        raise ConfigError(
            f"train.offload_embeddings: this {shape.model_type} model's output head shares the input embedding table, "
            "which the head needs on the GPU",
            "use --set train.offload_embeddings=false",
        )
    attn = config.model.attn_implementation
    if attn == "sdpa" and shape.model_type in NO_SDPA_MODEL_TYPES:
        raise ConfigError(
            f"transformers has no sdpa attention for {shape.model_type} models",
            "use --set model.attn_implementation=eager",
        )
    if attn == "flash_attention_2":
        if not facts.has_gpu:
            raise FitError("model.attn_implementation=flash_attention_2 needs an NVIDIA GPU", "use --set model.attn_implementation=sdpa")
        if not flash_attn_installed():
            raise ConfigError(
                "model.attn_implementation=flash_attention_2 needs the flash_attn package, which is not installed",
                "pip install flash-attn, or use --set model.attn_implementation=sdpa",
            )
    if config.data.packing and attn == "flash_attention_2" and config.train.micro_batch > 1:
        # transformers' flash-attention path reads packed sequences from position_ids only
        # for a batch of one row (modeling_flash_attention_utils._is_packed_sequence): with
        # more, attention would cross examples.
        raise ConfigError(
            "data.packing with flash_attention_2 keeps examples apart only at train.micro_batch 1",
            "use --set model.attn_implementation=sdpa, or --set train.micro_batch=1",
        )
    dtype = resolve_dtype(config.model.dtype, facts)
    # Known-bad distributed/offload combinations fail here, before anything launches.
    notes: list[str] = distributed.check(config, shape, facts, dtype, lengths.longest if lengths else None)
    if config.uses_adapter and shape.resolve_targets(config.lora.target_modules) != config.lora.target_modules:
        notes.append(f"{shape.model_type} fuses projections: LoRA adapts {', '.join(shape.resolve_targets(config.lora.target_modules))}")
    if config.budget_gib is not None:
        src = (sources or {}).get("budget_gib", "flag")
        budget, budget_source = config.budget_gib, "--budget" if src == "flag" else f"budget_gib from {src}"
    elif facts.has_gpu:
        # Data-parallel ranks all hold the same shard: the smallest card decides.
        small = min(facts.gpus, key=lambda g: g.total_bytes)
        budget, budget_source = facts.min_total_gib, f"smallest detected GPU ({small.name})"
    else:
        budget, budget_source = None, None
    if facts.has_gpu:
        sizes = sorted({round(g.total_gib, 1) for g in facts.gpus})
        if len(sizes) > 1:  # by size, not name: two cards of one name can differ (40/80 GB, MIG)
            used = f"the {budget:g} GiB budget" if config.budget_gib is not None else f"the smallest, {sizes[0]:g} GiB"
            notes.append(f"GPUs differ in size ({', '.join(f'{s:g}' for s in sizes)} GiB): planned for {used} on every GPU")
    if facts.has_gpu and config.world_size > facts.gpu_count * config.launch.nodes:
        notes.append(f"plan asks for {config.launch.gpus} GPUs per node but {facts.gpu_count} were detected here")
    device = "cuda" if facts.has_gpu else "cpu"
    breakdown = estimate(
        shape, config, dtype, device, lengths.longest if lengths else None, lengths.shortest if lengths else None
    )
    if facts.has_gpu and facts.min_free_gib < breakdown.peak_gib <= (budget or 0):
        notes.append(
            f"only {facts.min_free_gib:.1f} GiB is free on the GPU now (other processes hold memory; see `vramfit detect`)"
        )
    speed = steps = wall = None
    if device == "cuda":
        speed = estimate_speed(shape, config, lengths, facts.gpus[0].name)
        eff = config.train.micro_batch * config.train.grad_accum * config.world_size
        # What one micro-batch sequence is: an example, or with packing a row of them.
        seqs, per_seq = sequences(config, lengths, n_examples)
        if config.train.max_steps > 0:
            steps = config.train.max_steps
        elif seqs:
            steps = max(1, int(seqs * config.train.epochs) // eff)
        if steps:
            wall = steps * eff * per_seq / speed.tokens_per_s
        if not speed.gpu_known:
            notes.append(f"speed is scaled from an A100's: {facts.gpus[0].name} is not in vramfit's GPU table")
        if speed.cpu_bound:
            # Measured: one such plan (Qwen2.5-0.5B, 16 x 1) trained 15.6k-24.0k tokens/s in three
            # processes on one H200 host (docs/benchmarks/speed-checks/13-small-model-spread/).
            notes.append(
                f"predicted to wait on the CPU (its launch work {speed.cpu_to_gpu:.1f}x the GPU's per micro-batch): "
                "the speed follows the host CPU (one such plan, Qwen2.5-0.5B's, measured 15.6k to 24.0k tokens/s "
                "in three runs on one machine); a larger micro-batch, if it fits, does more GPU work per Python call"
            )
    plan = Plan(
        config=config,
        sources=sources or {},
        preset=preset,
        shape=shape,
        hardware=facts,
        dtype=dtype,
        device=device,
        budget_gib=budget,
        budget_source=budget_source,
        breakdown=breakdown,
        notes=notes,
        speed=speed,
        steps=steps,
        wall_s=wall,
        gpu_hour_price=gpu_hour_price,
        lengths=lengths,
    )
    return plan


def sequences(config: RunConfig, lengths: LengthStats | None, n_examples: int | None) -> tuple[int | None, float]:
    """(sequences the trainer iterates over per epoch, mean real tokens in each).

    Without packing these are the examples. With packing, the rows that pack_rows makes of
    them: about ceil(total tokens / seq_len), a little more since examples are never split.
    Length statistics come from a sample, so the rows are scaled to all n_examples.
    Without statistics, examples are taken to fill seq_len, so rows == examples."""
    seq = config.data.seq_len
    if lengths is None:
        return n_examples, float(seq)
    if not config.data.packing:
        return n_examples, lengths.mean_cut(seq)
    rows = lengths.packed(seq)
    n = math.ceil(n_examples * len(rows.lengths) / len(lengths.lengths)) if n_examples else None
    return n, rows.mean


def require_fit(plan: Plan) -> None:
    """Raise FitError naming the predicted peak and a change that would fit."""
    if plan.fits:
        return
    need = plan.breakdown.peak_gib
    raise FitError(
        f"predicted peak {need:.1f} GiB exceeds the {plan.budget_gib:g} GiB budget",
        suggest_fit(plan) + "; or pass --set key=value to change the plan",
    )


def suggest_fit(plan: Plan) -> str:
    """A change that fits the budget, checked against the memory model: shorter sequence,
    QLoRA (alone or with a shorter sequence), or another preset; else the budget needed."""
    cfg, budget = plan.config, plan.budget_gib or 0.0

    def peak(c: RunConfig) -> float:
        return estimate(plan.shape, c, plan.dtype, plan.device).peak / GIB

    def with_seq(c: RunConfig, seq: int) -> RunConfig:
        return c.model_copy(update={"data": c.data.model_copy(update={"seq_len": seq})})

    # QLoRA is offered to LoRA plans only: full fine-tuning is a different kind of run.
    methods = [cfg] + ([cfg.model_copy(update={"method": "qlora"})] if cfg.method == "lora" and plan.device == "cuda" else [])
    for c in methods:
        label = "" if c is cfg else "method=qlora "
        seq = cfg.data.seq_len
        while seq >= 128:
            cand = with_seq(c, seq)
            if peak(cand) <= budget:
                change = label + (f"data.seq_len={seq}" if seq != cfg.data.seq_len else "")
                return f"--set {change.strip().replace(' ', ' --set ')} fits ({peak(cand):.1f} GiB)"
            seq //= 2
    if cfg.method == "full" and not cfg.train.optimizer.startswith("paged_"):
        # Full fine-tuning peaks at the optimizer step; paged state moves to host RAM under pressure.
        c = cfg.model_copy(update={"train": cfg.train.model_copy(update={"optimizer": "paged_adamw_8bit"})})
        if peak(c) <= budget:
            return f"--set train.optimizer=paged_adamw_8bit fits ({peak(c):.1f} GiB; its state pages out to host RAM)"
    from .presets import list_presets, resolve

    for p in sorted(list_presets(), key=lambda p: -(p.card_gib or 0)):
        if p.name in ("cpu", plan.preset) or (p.values.get("deepspeed") and plan.device != "cuda"):
            continue
        if (p.values.get("method") == "full") != (cfg.method == "full"):
            continue  # never suggest switching between adapters and full fine-tuning
        try:
            c = resolve([(p.name, p.values)]).config
        except Exception:  # a preset that doesn't validate is not a suggestion
            continue
        c = c.model_copy(update={"model": cfg.model, "data": cfg.data.model_copy(update={"seq_len": c.data.seq_len})})
        if (c.method != "qlora" or plan.device == "cuda") and peak(c) <= budget:
            return f"--preset {p.name} fits ({peak(c):.1f} GiB)"
    return f"this model needs a budget of at least {peak(cfg):.1f} GiB as configured; try a smaller model"

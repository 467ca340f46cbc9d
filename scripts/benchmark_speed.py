#!/usr/bin/env python3
"""Benchmark vramfit's plan against the seed guides' configs on one GPU, through the real CLI.

Two kinds of rows, each one run of `vramfit train` on a random-weight model of a real
architecture (scripts/make_random_model.py) and one generated dataset whose every example
is longer than the sequence length (scripts/make_embedded_dataset.py), so every run trains
the same full-length examples in the same order:

- speed (groups ``8gb-qlora``, ``24gb-lora``): a seed guide's config AS THE GUIDE WRITES IT,
  expressed as `vramfit train --preset CARD --set key=value ...` (SEEDS below maps each guide
  setting to a vramfit key, or says why it has none), under the guide's card as --budget;
  when that does not train under the cap, the same config measured without the cap (what it
  really needs) and a "made to fit" variant under the cap; then `vramfit train --preset auto
  --budget B` with the same model, data, sequence length, adapter, learning rate, effective
  batch and number of steps (so the same tokens), and the same with the fused loss on.
  Rows carry the predicted and measured peak, tokens/s, the ratio to the seed config that
  trained under the cap, MFU, and the per-step loss difference to that seed run beside the
  seed run's own step-to-step noise.
- max-context (groups ``ctx-*``): the longest sequence the planner predicts fits a budget
  for a given model/method/rank/targets at micro-batch 1 (a bisection over data.seq_len with
  vramfit.fit.auto_fit, the function `--preset auto` calls), then a few steps trained at that
  length under the cap to prove it; ``--edge`` also trains the longest length the memory
  model predicts under the budget with no safety margin. Published anchors beside them.

    python scripts/benchmark_speed.py --only 8gb-qlora --results $OUT/bench          # ~7 min on an H200
    python scripts/benchmark_speed.py --only 24gb-lora --results $OUT/bench
    python scripts/benchmark_speed.py --only ctx-llama-3.1-8b-12 --only ctx-llama-3.1-8b-16 --results $OUT/bench
    python scripts/benchmark_speed.py --dry-run                                       # CPU: commands, predictions, time estimates
    python scripts/benchmark_speed.py --collect DIR [DIR ...] --csv-dir docs/benchmarks   # CPU: the CSVs from raw results

Each run appends one JSON line (command, exit, plan, metrics.json, per-step losses, GPU,
versions) to RESULTS/speed.jsonl or RESULTS/max-context.jsonl, copies the run's plan.yaml,
metrics.json and train.log to RESULTS/runs/, and rewrites RESULTS/speed.csv and
RESULTS/max-context.csv from every line there. MFU counts 4N FLOPs per token for LoRA and
QLoRA (forward + input gradients; frozen weights get no weight gradients) and 6N for full
fine-tuning, N the model's total parameters, against the GPU's dense bf16 peak: measured at
the start (best of a few 8192^3 bf16 matmuls, in a subprocess that exits before any run) or
vramfit.speed.GPU_TFLOPS's data-sheet value; both are recorded (mfu, mfu_datasheet).
"""

from __future__ import annotations

import argparse
import collections
import csv
import dataclasses
import io
import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "src"))
from prove_distributed import Runner, summary  # noqa: E402
from vramfit.presets import flatten as flat  # noqa: E402  (dotted keys, launch.env kept whole: as the CLI compares plans)
from prove_preset import input_commands, versions  # noqa: E402

PY = sys.executable
SEEDS_DIR = "shared/seeds"  # beside the project checkout (/work/shared/seeds)
# Every run trains this many optimizer steps unless --steps says otherwise. Steady tokens/s
# leaves out the first step; the loss comparison uses every step (6 give 4 second differences
# for the noise estimate, and keep a speed group under ~8 minutes on an H200).
DEFAULT_STEPS = 6
UNCAPPED_STEPS = 3  # a config measured without the cap: only its peak and speed are wanted
CTX_STEPS = 3
# Rough per-run cost outside the timed steps (plan, tokenize, load + quantize a 7-8B,
# save the adapter): ~30 s in docs/benchmarks/autofit (wall_s - train_seconds).
LOAD_S = 35.0
BUILD_S = 60.0  # one random-weight 7-8B model built on the GPU and saved (plus the dataset)
INVOCATION_S = 540.0  # the device runs commands of at most 10 minutes
SEQ_STEP = 128  # max-context bisection granularity (auto-fit's sequence lengths are multiples of 128)
COMMON_RUN_FLAGS = {"train.save_steps": 1000, "train.logging_steps": 1}


# ------------------------------------------------------------------ seed configs as the guides write them


@dataclass(frozen=True)
class Setting:
    """One setting of a guide: its words, the vramfit key it maps to (None: no key), the value."""

    guide: str
    key: str | None
    value: Any = None
    note: str = ""


@dataclass(frozen=True)
class Seed:
    group: str
    guide: str  # file in shared/seeds and the section the config comes from
    arch: str  # scripts/archs/NAME.json
    budget_gib: float  # the card the guide is written for
    preset: str  # vramfit's card preset: the base for whatever the guide leaves unsaid
    settings: tuple[Setting, ...]
    made_to_fit: dict[str, Any]  # the smallest change that makes it train under the cap
    made_to_fit_why: str
    # Seed keys outside FAIR_KEYS that the auto rows keep too (the group is about them).
    keep: tuple[str, ...] = ()

    def sets(self) -> dict[str, Any]:
        return {s.key: s.value for s in self.settings if s.key}

    def effective_batch(self) -> int:
        s = self.sets()
        return int(s.get("train.micro_batch", 1)) * int(s.get("train.grad_accum", 16))


SEEDS: dict[str, Seed] = {
    "8gb-qlora": Seed(
        group="8gb-qlora",
        guide="001_583dd34ef5e10c28.txt ('Memory Optimization Guide for 8GB GPUs', 'Complete 8GB Configuration Example')",
        arch="qwen2.5-7b",
        budget_gib=8,
        preset="8gb",
        settings=(
            Setting("name='Qwen/Qwen-VL-Chat' (a vision-language model)", None, None,
                    "no vision tower here: random-weight Qwen2.5-7B, the 7B shared/gpu/README.md ran this config on"),
            Setting("method=TrainingMethod.QLORA", "method", "qlora"),
            Setting("load_in_4bit=True", "quant.bits", 4),
            Setting("bnb_4bit_quant_type='nf4'", "quant.quant_type", "nf4"),
            Setting("bnb_4bit_use_double_quant=True", "quant.double_quant", True),
            Setting("QLoRA via PEFT (prepare_model_for_kbit_training: fp32 embeddings and lm_head)", "quant.upcast_embeddings", True,
                    "the guide's stack as shared/gpu/README.md measured it"),
            Setting("LoRAConfig(rank=8)", "lora.r", 8),
            Setting("alpha=16", "lora.alpha", 16),
            Setting("PEFT's LoRA layers (get_peft_model)", "kernels.fused_lora", False,
                    "PEFT's layers as they are: vramfit fuses them by default since session 13 (earlier seed rows ran before, the same config)"),
            Setting("dropout=0.05", "lora.dropout", 0.05),
            Setting("target modules: not named", "lora.target_modules", ["q_proj", "v_proj"],
                    "PEFT's default for Qwen2 when none are named, as shared/gpu/README.md ran it"),
            Setting("max_length=512", "data.seq_len", 512),
            Setting("batch_size=1", "train.micro_batch", 1),
            Setting("gradient_accumulation_steps=32", "train.grad_accum", 32),
            Setting("learning_rate=2e-4", "train.lr", 2e-4),
            Setting("gradient_checkpointing=True", "train.grad_ckpt", True),
            Setting("mixed_precision=MixedPrecision.BF16", "model.dtype", "bfloat16"),
            Setting("num_workers=2", "train.dataloader_workers", 2),
            Setting("optimizer: not named", "train.optimizer", "adamw_torch", "the HF Trainer's default"),
            Setting("num_epochs=3", None, None, "replaced by train.max_steps: every run of the group trains the same steps"),
            Setting("image_size=336", None, None, "no images: a text model"),
            Setting("val_path=...", None, None, "no validation: it would add untimed work to a speed run"),
            Setting("experiment_name='8gb_optimized'", None, None, "the run directory is --out"),
        ),
        made_to_fit={"quant.upcast_embeddings": False},
        made_to_fit_why="embeddings and lm_head kept 16-bit (no fp32 upcast), shared/gpu/README.md's made-to-fit row",
    ),
    "24gb-lora": Seed(
        group="24gb-lora",
        guide="002_7b74f3b84a662ff4.txt ('Memory Optimization Guide - Baseline 7B Training', 'After Optimization (Fits)')",
        arch="qwen2.5-7b",
        budget_gib=24,
        preset="24gb",
        settings=(
            Setting("Model: Qwen 2.5 7B", None, None, "random-weight Qwen2.5-7B (scripts/archs/qwen2.5-7b.json), passed as --model"),
            Setting("Base model (FP16) + LoRA adapters", "method", "lora"),
            Setting("torch_dtype=torch.float16", "model.dtype", "bfloat16",
                    "bf16: the same bytes as fp16, and what the auto plan uses on this GPU (fp16 would add loss scaling to the comparison)"),
            Setting("LORA_CONFIG r=128", "lora.r", 128),
            Setting("PEFT's LoRA layers (get_peft_model)", "kernels.fused_lora", False,
                    "PEFT's layers as they are: vramfit fuses them by default since session 13 (earlier seed rows ran before, the same config)"),
            Setting("target modules: not named ('239M trainable params')", "lora.target_modules", "all-linear",
                    "all-linear as shared/gpu/README.md measured it (323M trainable on Qwen2.5-7B); no standard set gives 239M"),
            Setting("alpha, dropout: not named", None, None, "the 24gb preset's (32, 0.05) in every run of the group"),
            Setting("learning rate: not named", None, None, "the 24gb preset's (1e-4) in every run of the group"),
            Setting("MAX_SEQ_LENGTH = 1536", "data.seq_len", 1536),
            Setting("per_device_train_batch_size: 1", "train.micro_batch", 1),
            Setting("gradient_accumulation_steps: 16", "train.grad_accum", 16),
            Setting("model.gradient_checkpointing_enable()", "train.grad_ckpt", True),
            Setting("optimizer: not named", "train.optimizer", "adamw_torch", "the HF Trainer's default"),
            Setting("PYTORCH_CUDA_ALLOC_CONF=max_split_size_mb:128,expandable_segments:True", "launch.env.PYTORCH_CUDA_ALLOC_CONF",
                    "max_split_size_mb:128,expandable_segments:True"),
            Setting("TOKENIZERS_PARALLELISM=false", "launch.env.TOKENIZERS_PARALLELISM", "false"),
            Setting("OMP_NUM_THREADS=4", "launch.env.OMP_NUM_THREADS", 4),
            Setting("torch.cuda.empty_cache() before training", None, None, "each run is a fresh process: nothing cached"),
            Setting("device_map='auto', max_memory={0: '20GB', 'cpu': '30GB'}", None, None,
                    "only in the guide's model-load check; vramfit has no accelerate device-map offload (its offload is DeepSpeed ZeRO-3)"),
        ),
        made_to_fit={"data.seq_len": 1024},
        made_to_fit_why="the guide's own first fallback ('Further Reduce Max Sequence Length': 1024); fewer tokens per example",
    ),
}
# The 8 GB guide's config on a 24 GB card, QLoRA kept (issue 4's MFU target is QLoRA 7B at
# 24 GiB): with room to spare the planner can drop recomputation, which the 8 GB plan can't.
SEEDS["8gb-qlora-at-24"] = dataclasses.replace(
    SEEDS["8gb-qlora"], group="8gb-qlora-at-24", budget_gib=24, keep=("method",),
    made_to_fit={}, made_to_fit_why="fits as written",
)
# The 24 GB guide's config with its method kept too (issue 4: "the seed 24 GB config's model,
# method and rank"): 16-bit LoRA, where the planner of group 24gb-lora takes QLoRA.
SEEDS["24gb-lora-method-kept"] = dataclasses.replace(SEEDS["24gb-lora"], group="24gb-lora-method-kept", keep=("method",))
# The same with LoRA dropout 0 in every run, the seed's too. The guide names no dropout; PEFT's
# LoraConfig default is 0.0, so a user following the guide with PEFT trains without it (the
# plain-HF 5,672 tokens/s of shared/gpu/README.md does not say which it used). vramfit's 24gb
# preset says 0.05, which the groups above keep.
SEEDS["24gb-lora-method-kept-dropout0"] = dataclasses.replace(
    SEEDS["24gb-lora-method-kept"], group="24gb-lora-method-kept-dropout0",
    settings=tuple(
        Setting(x.guide, "lora.dropout", 0.0, "PEFT's LoraConfig default (lora_dropout=0.0), in every run of the group; "
                "alpha the 24gb preset's (32)") if x.guide == "alpha, dropout: not named" else x
        for x in SEEDS["24gb-lora"].settings
    ),
)

# Settings that shape what is learned: every run of a group uses the seed's values (taken from
# the seed's resolved config), so that only memory/speed choices differ. The planner never
# searches these; the sequence length it would search, so it is always passed.
FAIR_KEYS = (
    "data.seq_len", "lora.r", "lora.alpha", "lora.dropout", "lora.target_modules", "train.lr", "train.scheduler",
    "train.warmup_steps", "train.weight_decay", "train.max_grad_norm", "train.seed",
)  # fmt: skip
# What the auto plan may set differently from the seed config: the memory/speed choices.
PLANNER_KEYS = (
    "method", "quant.", "train.micro_batch", "train.grad_accum", "train.grad_ckpt", "train.optimizer", "kernels.",
    "train.offload_activations", "train.offload_async", "train.offload_embeddings",
    "deepspeed.", "model.dtype", "budget_gib", "launch.env", "train.dataloader_workers",
)  # fmt: skip


# ------------------------------------------------------------------ max-context cases


@dataclass(frozen=True)
class CtxCase:
    name: str
    arch: str
    budget_gib: float
    sets: tuple[str, ...]  # method, adapter, micro-batch: everything but data.seq_len
    lora_r: int
    targets: str
    published: int | None = None  # Unsloth's published max context (tokens)
    published_hf_fa2: str | None = None  # the same source's plain HF + FA2 figure


LLAMA_QLORA_R32 = ("method=qlora", "lora.r=32", "lora.alpha=64", "lora.target_modules=all-linear",
                   "train.micro_batch=1", "train.grad_accum=1")  # fmt: skip
# Unsloth's published max context, Llama-3.1-8B QLoRA r32 all-linear, batch 1, by card (GB);
# plain HF + FA2 on the same cards (shared/gpu/README.md, "Published anchors worth beating").
UNSLOTH_LLAMA8B = {8: (2972, "OOM"), 12: (21848, "932"), 16: (40724, "2551"), 24: (78475, "5789")}
CTX_CASES: dict[str, CtxCase] = {
    f"ctx-llama-3.1-8b-{b}": CtxCase(f"ctx-llama-3.1-8b-{b}", "llama-3.1-8b", b, LLAMA_QLORA_R32, 32, "all-linear", *UNSLOTH_LLAMA8B[b])
    for b in (8, 12, 16, 24)
}
# The same without LoRA dropout, the setting of Unsloth's notebooks ("lora_dropout = 0 is
# optimized"; the blog with the figures names rank, targets and batch, not dropout): peft
# then keeps no dropped-out copy of each adapted layer's input, close to half of a layer's
# saved activations here. Beside the rows above, which keep vramfit's default (0.05).
for b in (8, 12, 16, 24):
    CTX_CASES[f"ctx-llama-3.1-8b-{b}-dropout0"] = CtxCase(
        f"ctx-llama-3.1-8b-{b}-dropout0", "llama-3.1-8b", b, (*LLAMA_QLORA_R32, "lora.dropout=0"), 32, "all-linear",
        *UNSLOTH_LLAMA8B[b],
    )  # fmt: skip
# The 8 GB guide's adapter (r8 q/v) on Qwen2.5-7B at micro-batch 1: how long it can go at 8 GB.
CTX_CASES["ctx-qwen2.5-7b-8"] = CtxCase(
    "ctx-qwen2.5-7b-8", "qwen2.5-7b", 8,
    ("method=qlora", "lora.r=8", "lora.alpha=16", "lora.target_modules=[q_proj,v_proj]", "train.micro_batch=1", "train.grad_accum=1"),
    8, "[q_proj,v_proj]",
)  # fmt: skip

GROUPS = [*SEEDS, *CTX_CASES]


# ------------------------------------------------------------------ pure helpers


def fmt_value(v: Any) -> str:
    """A --set value that vramfit's YAML parsing reads back as ``v``."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(str(x) for x in v) + "]"
    if isinstance(v, float):
        # YAML 1.1 reads "2e-4" as a string: write plain decimals.
        return format(v, ".12f").rstrip("0").rstrip(".") if v != int(v) else f"{v:.1f}"
    return str(v)


def set_flags(sets: dict[str, Any] | list[str]) -> list[str]:
    items = [f"{k}={fmt_value(v)}" for k, v in sets.items()] if isinstance(sets, dict) else list(sets)
    return [x for s in items for x in ("--set", s)]


def unmapped(seed: Seed) -> list[Setting]:
    return [s for s in seed.settings if s.key is None]


def mapping_markdown() -> str:
    """Every seed setting, the vramfit flag it became (or why none), as a markdown table."""
    out = []
    seen: dict[str, str] = {}  # guide -> the first group of its settings
    for seed in SEEDS.values():
        if seed.guide in seen:  # a variant of a guide's config on another card
            kept = ", ".join(f"`{k}`" for k in seed.keep) or "nothing"
            first = SEEDS[seen[seed.guide]]
            changed = "".join(f", with `--set {s.key}={fmt_value(s.value)}` ({s.note})" for s in seed.settings if s not in first.settings)
            out.append(f"**{seed.group}**: the settings of **{seen[seed.guide]}**{changed} under `--budget {seed.budget_gib:g}`; "
                       f"the auto rows also keep {kept}.\n")  # fmt: skip
            continue
        seen[seed.guide] = seed.group
        out.append(f"**{seed.group}**: `{seed.guide}`, base `--preset {seed.preset}`, `--budget {seed.budget_gib:g}`\n")
        out.append("| guide says | vramfit | note |\n|---|---|---|")
        for s in seed.settings:
            flag = f"`--set {s.key}={fmt_value(s.value)}`" if s.key else "(no key)"
            out.append(f"| {s.guide.replace('|', '/')} | {flag} | {s.note} |")
        fix = " ".join(f"`--set {k}={fmt_value(v)}`" for k, v in seed.made_to_fit.items())
        out.append(f"\nMade to fit: {fix}: {seed.made_to_fit_why}.\n")
    return "\n".join(out)


def k_flops(method: str) -> int:
    """Model FLOPs per token per parameter: 6 for full fine-tuning (forward 2, backward 4),
    4 for LoRA and QLoRA (frozen weights get input gradients only)."""
    return 6 if method == "full" else 4


def mfu(tokens_per_s: float | None, total_params: int | None, method: str | None, peak_tflops: float | None) -> float | None:
    if not tokens_per_s or not total_params or not method or not peak_tflops:
        return None
    return tokens_per_s * k_flops(method) * total_params / (peak_tflops * 1e12)


def step_noise(losses: list[float]) -> float | None:
    """The step-to-step noise (one standard deviation) of a loss curve, from its second
    differences, which cancel a locally linear trend: for independent noise of sigma,
    x[i+1] - 2x[i] + x[i-1] has standard deviation sigma*sqrt(6). The median absolute value
    (/0.6745 for a normal) keeps the fast fall of the first steps from counting as noise."""
    if len(losses) < 3:
        return None
    d2 = [abs(losses[i + 1] - 2 * losses[i] + losses[i - 1]) for i in range(1, len(losses) - 1)]
    return statistics.median(d2) / 0.6745 / math.sqrt(6)


def loss_agreement(ref: list[float], other: list[float], k: float = 3.0) -> dict[str, Any]:
    """Per-step loss difference of ``other`` to ``ref`` (same data, seed and effective batch)
    beside ``ref``'s own step-to-step noise; they agree when every step is within k sigma."""
    n = min(len(ref), len(other))
    if n == 0:
        return {"loss_steps": 0, "loss_max_abs_diff": None, "loss_mean_abs_diff": None, "seed_loss_noise": None, "loss_within_noise": None}
    diffs = [abs(a - b) for a, b in zip(ref[:n], other[:n])]
    noise = step_noise(ref[:n])
    return {
        "loss_steps": n,
        "loss_max_abs_diff": round(max(diffs), 4),
        "loss_mean_abs_diff": round(sum(diffs) / n, 4),
        "seed_loss_noise": round(noise, 4) if noise is not None else None,
        "loss_within_noise": (max(diffs) <= k * noise) if noise is not None else None,
    }


def config_differences(a: dict, b: dict, ignore: tuple[str, ...] = ("model.name", "data.path", "train.max_steps")) -> dict[str, tuple]:
    """Keys whose values differ between two resolved configs (nested dicts) -> (a, b)."""
    fa, fb = flat(a), flat(b)
    return {k: (fa.get(k), fb.get(k)) for k in sorted(set(fa) | set(fb)) if k not in ignore and fa.get(k) != fb.get(k)}


def write_csv_atomic(path: Path, columns: list[str], rows: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({c: ("" if r.get(c) is None else r.get(c)) for c in columns})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(buf.getvalue(), encoding="utf-8")
    os.replace(tmp, path)  # a reader never sees half a table


# ------------------------------------------------------------------ planning (pure: no GPU)


def arch_config(arch: str) -> dict:
    return json.loads((ROOT / f"scripts/archs/{arch}.json").read_text())


def arch_shape(arch: str):
    from vramfit.model_shape import shape_from_config

    return shape_from_config(arch_config(arch))


def _overrides(model: str, data: str, budget: float | None) -> dict:
    out: dict = {"model": {"name": model}, "data": {"path": data}}
    if budget is not None:
        out["budget_gib"] = budget
    return out


def resolve_seed(seed: Seed, model: str, data: str, extra: dict | None, budget: float | None):
    """The seed config as `vramfit train --preset CARD [--budget B] --set ...` resolves it."""
    from vramfit.presets import resolve_layers

    sets = {**seed.sets(), **(extra or {})}
    return resolve_layers(seed.preset, None, _overrides(model, data, budget), [f"{k}={fmt_value(v)}" for k, v in sets.items()])


def fair_sets(seed: Seed, model: str, data: str) -> dict[str, Any]:
    """The FAIR_KEYS the auto row must be given: the seed's resolved value wherever it differs
    from vramfit's default (and the sequence length always, or the planner would choose it)."""
    from vramfit.config import RunConfig

    seed_flat = flat(resolve_seed(seed, model, data, None, seed.budget_gib).config.model_dump(mode="json"))
    default = flat(RunConfig().model_dump(mode="json"))
    fair = {k: seed_flat[k] for k in FAIR_KEYS if k == "data.seq_len" or seed_flat[k] != default[k]}
    return {**fair, **{k: seed_flat[k] for k in seed.keep}}


def planner_choice(sets: dict[str, Any], model: str, data: str, budget: float, shape, gpu_name: str | None,
                   host_ram: int | None, unpin: tuple[str, ...] = ()):  # fmt: skip
    """What `vramfit train --preset auto --budget B --set ...` plans (vramfit.fit.auto_fit on the
    resolved config, for data whose every example is longer than the sequence). ``unpin``:
    keys given to set the base config's values but left for the planner to change."""
    from vramfit.fit import auto_fit
    from vramfit.presets import resolve_layers

    from vramfit.speed import LengthStats

    r = resolve_layers(None, None, _overrides(model, data, budget), [f"{k}={fmt_value(v)}" for k, v in sets.items()])
    pinned = {k for k, src in r.sources.items() if src != "default"} - set(unpin)
    # Every example of the data is longer than any sequence here (as the CLI finds when it plans).
    full_length = LengthStats((1 << 20,))
    return auto_fit(r.config, pinned, shape, budget, gpu_name, full_length, "bfloat16", host_ram, fused_available=True)


def auto_sets(seed: Seed, model: str, data: str, gpu_name: str | None, host_ram: int | None,
              extra: dict | None = None) -> tuple[dict[str, Any], str, Any]:  # fmt: skip
    """The --set flags of the group's auto row and how its micro-batch split was chosen.

    The comparison holds the effective batch. `--preset auto` keeps the base config's
    effective batch (micro_batch x grad_accum), but any --set of either pins it, and the
    default is 1 x 16. So with an effective batch of 16 the command leaves the split to the
    CLI; otherwise this asks the planner (auto_fit with the effective batch set and neither
    key pinned) and pins the split it chose, which the CLI's own search then reproduces."""
    sets = {**fair_sets(seed, model, data), **(extra or {})}
    eff = seed.effective_batch()
    if eff == 16:
        return sets, "cli", None
    shape = arch_shape(seed.arch)
    base = {**sets, "train.micro_batch": 1, "train.grad_accum": eff}
    cfg, _ = planner_choice(base, model, data, seed.budget_gib, shape, gpu_name, host_ram, ("train.micro_batch", "train.grad_accum"))
    split = {"train.micro_batch": cfg.train.micro_batch, "train.grad_accum": cfg.train.grad_accum}
    return {**sets, **split}, "planner (auto_fit, effective batch held; split pinned so the CLI reproduces it)", cfg


def predicted_max_seq(case: CtxCase, model: str, data: str, gpu_name: str | None, host_ram: int | None,
                      fused: bool, margin: bool = True) -> tuple[int, Any]:  # fmt: skip
    """The longest data.seq_len (a multiple of SEQ_STEP, up to the model's max positions) that
    `--preset auto --budget B` plans for this case, and that plan; (0, None) when none fits.
    ``margin=False``: the longest the memory model predicts under the budget itself (no 5%
    safety margin), at the planner's choices for the longest with the margin."""
    from vramfit.errors import FitError
    from vramfit.memory import estimate

    shape = arch_shape(case.arch)
    cap = int(arch_config(case.arch).get("max_position_embeddings", 131072)) // SEQ_STEP
    sets = {s.split("=", 1)[0]: s.split("=", 1)[1] for s in case.sets}
    sets["kernels.fused_loss"] = "true" if fused else "false"

    def plan(seq: int):
        try:
            return planner_choice({**sets, "data.seq_len": seq}, model, data, case.budget_gib, shape, gpu_name, host_ram)[0]
        except FitError:
            return None

    def bisect(ok) -> int:
        lo, hi = 0, cap
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if ok(mid * SEQ_STEP) else (lo, mid - 1)
        return lo * SEQ_STEP

    best = bisect(lambda s: plan(s) is not None)
    if not best:
        return 0, None
    cfg = plan(best)
    if margin:
        return best, cfg

    def fits(seq: int) -> bool:
        c = cfg.model_copy(update={"data": cfg.data.model_copy(update={"seq_len": seq})})
        return estimate(shape, c, "bfloat16", "cuda", shortest=c.data.seq_len).peak_gib <= case.budget_gib

    edge = bisect(fits)
    return edge, cfg.model_copy(update={"data": cfg.data.model_copy(update={"seq_len": edge})})


def predicted_rate(arch: str, cfg, gpu_name: str | None) -> float:
    from vramfit.speed import estimate_speed

    return estimate_speed(arch_shape(arch), cfg, None, gpu_name).tokens_per_s


def run_seconds(arch: str, cfg, steps: int, gpu_name: str | None) -> float:
    """A rough wall time for one run: the speed model's tokens/s over the run's tokens, plus loading."""
    tokens = steps * cfg.train.micro_batch * cfg.train.grad_accum * cfg.data.seq_len
    return LOAD_S + tokens / max(predicted_rate(arch, cfg, gpu_name), 1.0)


# ------------------------------------------------------------------ rows (what a run is)


@dataclass
class Row:
    kind: str  # "speed" or "max-context"
    group: str
    config: str  # seed-as-written, seed-as-written-uncapped, seed-made-to-fit, vramfit-auto, vramfit-auto-fused, planner-max, edge
    arch: str
    budget_gib: float
    argv: list[str]  # after `vramfit`
    cap: bool = True  # --budget in the command
    predicted_peak_gib: float | None = None
    est_s: float = 0.0
    note: str = ""
    conditional: str = ""  # runs only when ...
    extra: dict = field(default_factory=dict)
    # The resolved config the command asks for: the record's fallback when the CLI refuses
    # the plan before writing a run directory (no plan.yaml).
    intended: dict = field(default_factory=dict)

    def command(self) -> str:
        return "vramfit " + shlex.join(self.argv)


def speed_rows(seed: Seed, work: Path, steps: int, gpu_name: str | None, host_ram: int | None, fused: bool = True,
               uncapped_steps: int = UNCAPPED_STEPS, liger_ops: bool = False, peft_lora: bool = False,
               offload_async: bool = False, no_lean: bool = False, sync_embed: bool = False) -> list[Row]:  # fmt: skip
    from vramfit.memory import estimate

    model, data = str(work / seed.arch), str(work / "long.jsonl")
    shape = arch_shape(seed.arch)
    common = {"train.max_steps": steps, **COMMON_RUN_FLAGS}
    rows: list[Row] = []

    def seed_row(config: str, extra: dict, budget: float | None, **kw) -> Row:
        r = resolve_seed(seed, model, data, extra, budget)
        out = work / f"run-{seed.group}-{config}"
        n = steps if budget else uncapped_steps
        argv = ["train", "--preset", seed.preset, *(["--budget", f"{budget:g}"] if budget else []), "--model", model,
                "--data", data, "--out", str(out), *set_flags({**seed.sets(), **extra, **common, "train.max_steps": n})]  # fmt: skip
        peak = estimate(shape, r.config, "bfloat16", "cuda", shortest=r.config.data.seq_len).peak_gib
        return Row("speed", seed.group, config, seed.arch, seed.budget_gib, argv, budget is not None, peak,
                   run_seconds(seed.arch, r.config, n, gpu_name), intended=r.config.model_dump(mode="json"), **kw)  # fmt: skip

    written = seed_row("seed-as-written", {}, seed.budget_gib)
    over = written.predicted_peak_gib > seed.budget_gib
    written.note = f"planner predicts {written.predicted_peak_gib:.2f} GiB" + (f" > {seed.budget_gib:g}: refused before training" if over else "")
    if over:
        written.est_s = 20.0  # the CLI plans (reads and tokenizes the data) and refuses
    rows.append(written)
    # Known to run when the planner refuses the config; otherwise only if it OOMs under the cap.
    cond = "" if over else "seed-as-written does not train under the cap"
    rows.append(seed_row("seed-as-written-uncapped", {}, None, conditional=cond, note="what the config needs, measured without a cap"))
    rows.append(seed_row("seed-made-to-fit", seed.made_to_fit, seed.budget_gib, conditional=cond, note=seed.made_to_fit_why))
    for config, extra in (("vramfit-auto", {}), ("vramfit-auto-fused", {"kernels.fused_loss": True}),
                          ("vramfit-auto-liger-ops", {"kernels.liger_ops": True}),
                          ("vramfit-auto-peft-lora", {"kernels.fused_lora": False}),
                          ("vramfit-auto-offload-async", {"train.offload_activations": True, "train.offload_async": True}),
                          ("vramfit-auto-no-lean", {"kernels.lean_recompute": False, "kernels.lean_mlp": False}),
                          ("vramfit-auto-sync-embed", {"train.offload_embeddings_async": False})):  # fmt: skip
        wanted = {"vramfit-auto-fused": fused, "vramfit-auto-liger-ops": liger_ops, "vramfit-auto-peft-lora": peft_lora,
                  "vramfit-auto-offload-async": offload_async, "vramfit-auto-no-lean": no_lean,
                  "vramfit-auto-sync-embed": sync_embed}
        if not wanted.get(config, True):
            continue
        sets, split_by, cfg = auto_sets(seed, model, data, gpu_name, host_ram, extra)
        out = work / f"run-{seed.group}-{config}"
        argv = ["train", "--preset", "auto", "--budget", f"{seed.budget_gib:g}", "--model", model, "--data", data,
                "--out", str(out), *set_flags({**sets, **common})]  # fmt: skip
        if cfg is None:
            cfg, _ = planner_choice(sets, model, data, seed.budget_gib, shape, gpu_name, host_ram)
        peak = estimate(shape, cfg, "bfloat16", "cuda", shortest=cfg.data.seq_len).peak_gib
        why = {
            "vramfit-auto": "planner's own plan",
            "vramfit-auto-fused": "planner's plan with the fused loss pinned on (auto-fit turns it on itself only where it buys a faster plan)",
            "vramfit-auto-liger-ops": "planner's plan with liger's fused RMSNorm/SwiGLU/RoPE pinned on (opt-in: auto-fit never turns it on)",
            "vramfit-auto-peft-lora": "planner's plan with kernels.fused_lora pinned off (PEFT's LoRA layers as they are)",
            "vramfit-auto-offload-async": "planner's plan with the checkpointed layer inputs in host RAM, copied on a stream of "
                                          "their own (train.offload_activations and train.offload_async pinned on)",
            "vramfit-auto-no-lean": "planner's plan with kernels.lean_recompute and kernels.lean_mlp pinned off (every "
                                    "recomputation runs down_proj's multiply and liger's SwiGLU; the planner may then "
                                    "split the batch differently)",
            "vramfit-auto-sync-embed": "planner's plan with train.offload_embeddings_async pinned off (the host-RAM "
                                       "embedding lookup reads the ids back from the GPU and runs between its work; "
                                       "does nothing without train.offload_embeddings)",
        }[config]
        rows.append(Row("speed", seed.group, config, seed.arch, seed.budget_gib, argv, True, peak,
                        run_seconds(seed.arch, cfg, steps, gpu_name), intended=cfg.model_dump(mode="json"),
                        note=f"{why}: {cfg.method}, micro-batch {cfg.train.micro_batch} x {cfg.train.grad_accum}, "
                             f"checkpointing {'on' if cfg.train.grad_ckpt else 'off'}",
                        extra={"batch_split_by": split_by,
                               "planned": {"method": cfg.method, "train.micro_batch": cfg.train.micro_batch,
                                           "train.grad_accum": cfg.train.grad_accum, "train.grad_ckpt": cfg.train.grad_ckpt,
                                           "train.optimizer": cfg.train.optimizer}}))  # fmt: skip
    return rows


def ctx_rows(case: CtxCase, work: Path, steps: int, gpu_name: str | None, host_ram: int | None,
             fused_modes: tuple[bool, ...], edge: bool) -> list[Row]:  # fmt: skip
    from vramfit.memory import estimate

    model = str(work / case.arch)
    shape = arch_shape(case.arch)
    rows: list[Row] = []
    for fused in fused_modes:
        tag = "-fused" if fused else ""
        for config, margin in (("planner-max", True), ("edge", False)):
            if config == "edge" and not edge:
                continue
            seq, cfg = predicted_max_seq(case, model, "DATA", gpu_name, host_ram, fused, margin)
            if cfg is None and config == "edge":
                continue
            # Nothing fits: the row records the CLI's own refusal at the shortest length.
            length = seq or SEQ_STEP
            data = str(work / f"ctx-{length}.jsonl")
            out = work / f"run-{case.name}-{config}{tag}"
            sets = [*case.sets, f"kernels.fused_loss={'true' if fused else 'false'}", f"data.seq_len={length}",
                    f"train.max_steps={steps}", *(f"{k}={v}" for k, v in COMMON_RUN_FLAGS.items())]  # fmt: skip
            if config == "edge" and cfg is not None:
                # Past the planner's 5% margin --preset auto refuses: the plan's choices, pinned, on a card preset.
                c = cfg
                sets += [f"train.grad_ckpt={fmt_value(c.train.grad_ckpt)}", f"train.optimizer={c.train.optimizer}"]
                head = ["train", "--preset", "24gb"]
            else:
                head = ["train" if cfg is not None else "plan", "--preset", "auto"]
            argv = [*head, "--budget", f"{case.budget_gib:g}", "--model", model, "--data", data, "--out", str(out), *set_flags(sets)]
            row = Row("max-context", case.name, config + tag, case.arch, case.budget_gib, argv, True,
                      extra={"predicted_max_seq": seq, "fused_loss": fused, "lora_r": case.lora_r, "targets": case.targets,
                             "published_max_seq": case.published, "published_hf_fa2": case.published_hf_fa2})  # fmt: skip
            if cfg is None:
                row.note = f"the planner fits no sequence length at {case.budget_gib:g} GiB: `vramfit plan` at {SEQ_STEP} records its refusal"
                row.est_s = 20.0
            else:
                row.intended = cfg.model_dump(mode="json")
                row.predicted_peak_gib = estimate(shape, cfg, "bfloat16", "cuda", shortest=cfg.data.seq_len).peak_gib
                row.est_s = run_seconds(case.arch, cfg, steps, gpu_name) + 5.0  # + the dataset
                row.note = f"seq {seq}: {cfg.method}, checkpointing {'on' if cfg.train.grad_ckpt else 'off'}"
            rows.append(row)
    return rows


# ------------------------------------------------------------------ running on the GPU


class BenchRunner(Runner):
    """prove_distributed.Runner with its own log, and the tail of each command's output kept."""

    def __init__(self, results: Path) -> None:  # noqa: D107 - the parent opens distributed.log
        self.log = (results / "benchmark.log").open("a")

    def run_tail(self, argv: list[str], env: dict | None = None) -> tuple[int, float, list[str]]:
        self.log.write("$ " + shlex.join(argv) + "\n")
        self.log.flush()
        print("$ " + shlex.join(argv), flush=True)
        t = time.perf_counter()
        tail: collections.deque[str] = collections.deque(maxlen=15)
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=env)
        for line in p.stdout:
            self.log.write(line)
            tail.append(line.rstrip())
        self.log.flush()
        rc = p.wait()
        secs = round(time.perf_counter() - t, 1)
        print(f"  -> exit {rc} in {secs:.0f} s" + (f": {tail[-1]}" if rc and tail else ""), flush=True)
        return rc, secs, list(tail)


PEAK_PROBE = r"""
import json, time, torch
n = 8192
a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
for _ in range(20):
    a @ b
best = 0.0
for _ in range(5):
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(50):
        a @ b
    torch.cuda.synchronize()
    best = max(best, 2 * n**3 * 50 / (time.perf_counter() - t) / 1e12)
print(json.dumps({"gpu": torch.cuda.get_device_name(0), "matmul_tflops": round(best, 1),
                  "total_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 2)}))
"""


def measure_peak() -> dict:
    """Dense bf16 throughput of this GPU (best of 5 x 50 8192^3 matmuls), in a subprocess: a
    CUDA context held by this process would hide the runs' own NVML figures."""
    res = subprocess.run([PY, "-c", PEAK_PROBE], capture_output=True, text=True, timeout=120)
    if res.returncode:
        return {"error": res.stderr.strip()[-300:]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def run_status(rc: int, run: Path, tail: list[str]) -> str:
    text = "\n".join(tail)
    if rc == 0:
        return "ok-after-oom" if (run / "events.jsonl").is_file() else "ok"
    if rc == 3:
        return "refused"  # the planner's FitError: predicted over the budget, nothing trained
    if (run / "oom.json").is_file() or "out of memory" in text.lower():
        return "oom"
    return "failed"


def keep_run_files(run: Path, results: Path) -> None:
    if not run.is_dir():
        return
    dest = results / "runs" / run.name
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("plan.yaml", "metrics.json", "train.log", "events.jsonl"):
        if (run / name).is_file():
            shutil.copy2(run / name, dest / name)


def record(row: Row, rc: int, secs: float, tail: list[str], run: Path, meta: dict) -> dict:
    s = summary(run) if run.is_dir() else {"losses": []}
    plan_cfg = {}
    try:
        import yaml

        doc = yaml.safe_load((run / "plan.yaml").read_text())
        plan_cfg = doc.get("config", {})
        s["resolved_dtype"] = doc.get("dtype")
        s["total_params"] = doc.get("total_params")
        s["trainable_params"] = doc.get("trainable_params")
        s["auto_fit"] = doc.get("auto_fit")
    except Exception:  # noqa: BLE001 - a refused plan leaves no run dir
        pass
    planned = row.extra.get("planned")
    if planned and plan_cfg:
        # The split pinned from vramfit.fit.auto_fit: did the CLI's own search land on the same plan?
        got = flat(plan_cfg)
        s["cli_plan_matches"] = all(got.get(k) == v for k, v in planned.items())
    return {
        "kind": row.kind, "group": row.group, "config": row.config, "arch": row.arch, "budget_gib": row.budget_gib,
        "cap_gib": row.budget_gib if row.cap else None, "command": row.command(), "exit": rc, "status": run_status(rc, run, tail),
        "seconds": secs, "estimated_s": round(row.est_s), "note": row.note, "planned_predicted_peak_gib": row.predicted_peak_gib,
        "tail": tail if rc else [], "plan_config": plan_cfg, "intended_config": row.intended, **row.extra, **s, **meta,
    }  # fmt: skip


def append_jsonl(path: Path, rec: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(rec, default=str) + "\n")


def archive(results: Path, dest: Path | None) -> None:
    """RESULTS as one .tar.gz at ``dest`` (nothing without one), replaced whole: rewritten
    after every run, so a command cut off at a time limit (a rented or shared GPU machine)
    still leaves every finished run's results in one file."""
    if dest is None:
        return
    import tarfile

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        tar.add(results, arcname=results.name)
    os.replace(tmp, dest)


def execute(rows: list[Row], results: Path, work: Path, meta: dict, r: BenchRunner, bundle: Path | None = None) -> int:
    failures = 0
    done: dict[tuple[str, str], dict] = {}
    for row in rows:
        written = done.get((row.group, "seed-as-written"))
        if row.conditional and written and written["status"] in ("ok", "ok-after-oom"):
            print(f"skip {row.group}/{row.config}: seed-as-written trained under the cap", flush=True)
            continue
        out = Path(row.argv[row.argv.index("--out") + 1])
        shutil.rmtree(out, ignore_errors=True)
        if row.kind == "max-context":
            data = Path(row.argv[row.argv.index("--data") + 1])
            if not data.is_file():
                # Byte-level tokens: 512 characters more than seq_len fill it, chat template and all.
                length = int(data.stem.split("-")[1])
                r.run_tail([PY, str(ROOT / "scripts/make_embedded_dataset.py"), "--n", "16", "--min-chars",
                            str(length + 512), "--out", str(data)])  # fmt: skip
        print(f"== {row.group}/{row.config} (~{row.est_s:.0f} s): {row.note}", flush=True)
        rc, secs, tail = r.run_tail([PY, "-m", "vramfit", *row.argv])
        rec = record(row, rc, secs, tail, out, meta)
        if row.kind == "max-context" and not row.extra["predicted_max_seq"]:
            rec["status"] = "nothing-fits" if rc == 3 else f"planner-disagrees (vramfit plan exit {rc})"
        done[(row.group, row.config)] = rec
        append_jsonl(results / ("speed.jsonl" if row.kind == "speed" else "max-context.jsonl"), rec)
        keep_run_files(out, results)
        shutil.rmtree(out, ignore_errors=True)  # adapters of r128: a few GB each
        archive(results, bundle)
        failures += rec["status"] == "failed"
    return failures


# ------------------------------------------------------------------ CSVs from raw records

SPEED_COLUMNS = [
    "arch", "gpu", "budget_gib", "config", "seq_len", "micro_batch", "effective_batch", "peak_gib", "tokens_per_s",
    "ratio_to_seed", "mfu", "group", "status", "cap_gib", "method", "lora_r", "lora_targets", "grad_accum", "grad_ckpt",
    "optimizer", "upcast_embeddings", "fused_loss", "steps", "tokens", "predicted_peak_gib", "peak_reserved_gib",
    "predicted_tokens_per_s", "seed_ref", "mfu_datasheet", "peak_tflops", "peak_source", "total_params", "flops_per_token",
    "loss_steps", "loss_max_abs_diff", "loss_mean_abs_diff", "seed_loss_noise", "loss_within_noise", "same_method",
    "batch_split_by", "differs_from_seed", "date", "command",
]  # fmt: skip
CTX_COLUMNS = [
    "arch", "gpu", "budget_gib", "method", "lora_r", "max_seq_len", "peak_gib", "command", "config", "status",
    "lora_targets", "lora_dropout", "fused_loss", "micro_batch", "grad_ckpt", "predicted_max_seq", "predicted_peak_gib", "tokens_per_s",
    "published_max_seq", "published_hf_fa2", "date",
]  # fmt: skip


def _cfg(rec: dict, dotted: str) -> Any:
    """A config value of the run: as its plan.yaml says (what trained, OOM recovery included),
    else as the command asked (a plan the CLI refused writes no plan.yaml)."""
    return flat(rec.get("plan_config") or rec.get("intended_config") or {}).get(dotted)


def peak_for(rec: dict) -> tuple[float | None, str]:
    """The dense bf16 peak (TFLOP/s) an MFU is against: measured on this GPU, else the table."""
    if rec.get("peak_source") == "measured" and rec.get("peak_tflops_measured"):
        return rec["peak_tflops_measured"], "measured (8192^3 bf16 matmul)"
    from vramfit.speed import gpu_tflops

    tflops, known = gpu_tflops(rec.get("gpu"))
    return (tflops, "vramfit.speed.GPU_TFLOPS") if known else (None, "unknown GPU")


def _latest(records: list[dict], key) -> list[dict]:
    """The last record for each key (a rerun replaces an earlier one), in first-seen order."""
    out: dict = {}
    for rec in records:
        out[key(rec)] = rec
    return list(out.values())


def speed_table(records: list[dict]) -> list[dict]:
    """One row per config (the latest run), each compared with the seed run of the same
    invocation (``_source``: its results file) where it has one: the seed's own speed moves
    between invocations (up to 22% on the 8 GB group), so only a same-call ratio is fair."""
    from vramfit.speed import gpu_tflops

    rows = []
    for rec in records:
        m = rec.get("metrics") or {}
        method = _cfg(rec, "method")
        mb, ga = _cfg(rec, "train.micro_batch"), _cfg(rec, "train.grad_accum")
        tps = m.get("steady_tokens_per_s") if rec["status"].startswith("ok") else None
        peak, source = peak_for(rec)
        datasheet, known = gpu_tflops(rec.get("gpu"))
        n = rec.get("total_params")
        rows.append({
            "arch": rec["arch"], "gpu": rec.get("gpu"), "budget_gib": rec["budget_gib"], "config": rec["config"],
            "group": rec["group"], "status": rec["status"], "cap_gib": rec.get("cap_gib"), "method": method,
            "seq_len": _cfg(rec, "data.seq_len"), "micro_batch": mb, "grad_accum": ga,
            "effective_batch": mb * ga if mb and ga else None, "lora_r": _cfg(rec, "lora.r"),
            "lora_targets": json.dumps(_cfg(rec, "lora.target_modules")) if _cfg(rec, "lora.target_modules") is not None else None,
            "grad_ckpt": _cfg(rec, "train.grad_ckpt"), "optimizer": _cfg(rec, "train.optimizer"),
            "upcast_embeddings": _cfg(rec, "quant.upcast_embeddings") if method == "qlora" else None,
            "fused_loss": _cfg(rec, "kernels.fused_loss"), "steps": m.get("steps"), "tokens": m.get("tokens"),
            "predicted_peak_gib": _predicted(rec), "peak_gib": m.get("peak_process_gib"),
            "peak_reserved_gib": m.get("peak_reserved_gib"), "tokens_per_s": tps,
            "predicted_tokens_per_s": rec.get("predicted_tokens_per_s"), "peak_tflops": peak, "peak_source": source,
            "total_params": n, "flops_per_token": f"{k_flops(method)}N" if method else None,
            "mfu": _round(mfu(tps, n, method, peak), 4), "mfu_datasheet": _round(mfu(tps, n, method, datasheet if known else None), 4),
            "batch_split_by": rec.get("batch_split_by"), "date": rec.get("date"), "command": rec["command"],
            "_losses": rec.get("losses") or [], "_config": rec.get("plan_config") or {}, "_dtype": rec.get("resolved_dtype"),
            "_source": rec.get("_source"),
        })  # fmt: skip
    # Each group against its seed config that trained under the cap in the same invocation
    # (as written, else made to fit); a row whose invocation ran no seed, against the latest.
    latest_ref: dict = {}
    for r in rows:
        if r["config"] in ("seed-as-written", "seed-made-to-fit") and r["status"].startswith("ok"):
            latest_ref[(r["gpu"], r["group"])] = r
    for group in dict.fromkeys((r["gpu"], r["group"], r["_source"]) for r in rows):
        members = [r for r in rows if (r["gpu"], r["group"], r["_source"]) == group]
        ref = next((r for c in ("seed-as-written", "seed-made-to-fit") for r in members
                    if r["config"] == c and r["status"].startswith("ok")), latest_ref.get(group[:2]))  # fmt: skip
        for r in members:
            if ref is None:
                continue
            r["seed_ref"] = ref["config"]
            if r["tokens_per_s"] and ref["tokens_per_s"]:
                r["ratio_to_seed"] = round(r["tokens_per_s"] / ref["tokens_per_s"], 3)
            # Losses compare only over the same schedule: the learning rate's decay spans
            # train.max_steps, so a 10-step run's step 6 is not a 6-step run's.
            if r is not ref and r["_losses"] and r["steps"] == ref["steps"]:
                r.update(loss_agreement(ref["_losses"], r["_losses"]))
                r["same_method"] = r["method"] == ref["method"]
            if r is not ref and r["_config"] and ref["_config"]:
                a = {**ref["_config"], "model": {**ref["_config"].get("model", {}), "dtype": ref["_dtype"]}}
                b = {**r["_config"], "model": {**r["_config"].get("model", {}), "dtype": r["_dtype"]}}
                diffs = config_differences(a, b, ("model.name", "data.path", "train.max_steps", "budget_gib"))
                r["differs_from_seed"] = "; ".join(f"{k}: {json.dumps(x)} -> {json.dumps(y)}" for k, (x, y) in diffs.items())
    return _latest(rows, lambda r: (r["gpu"], r["group"], r["config"]))


def ctx_table(records: list[dict]) -> list[dict]:
    records = _latest(records, lambda r: (r.get("gpu"), r["group"], r["config"]))
    rows = []
    for rec in records:
        m = rec.get("metrics") or {}
        ok = rec["status"].startswith("ok")
        rows.append({
            "arch": rec["arch"], "gpu": rec.get("gpu"), "budget_gib": rec["budget_gib"], "config": rec["config"],
            "status": rec["status"], "method": _cfg(rec, "method"),
            "lora_r": rec.get("lora_r"), "lora_targets": rec.get("targets"), "lora_dropout": _cfg(rec, "lora.dropout"),
            "fused_loss": rec.get("fused_loss"),
            "micro_batch": _cfg(rec, "train.micro_batch"), "grad_ckpt": _cfg(rec, "train.grad_ckpt"),
            "predicted_max_seq": rec.get("predicted_max_seq"), "max_seq_len": rec.get("predicted_max_seq") if ok else None,
            "predicted_peak_gib": _predicted(rec), "peak_gib": m.get("peak_process_gib"),
            "tokens_per_s": m.get("steady_tokens_per_s"), "published_max_seq": rec.get("published_max_seq"),
            "published_hf_fa2": rec.get("published_hf_fa2"), "date": rec.get("date"), "command": rec["command"],
        })  # fmt: skip
    return rows


def _predicted(rec: dict) -> float | None:
    """The plan's predicted peak (plan.yaml), else the same memory model's figure for the
    command's config (a refused plan leaves no plan.yaml)."""
    p = rec.get("predicted_peak_gib")
    if p is None and rec.get("planned_predicted_peak_gib") is not None:
        p = round(rec["planned_predicted_peak_gib"], 3)
    return p


def _round(x: float | None, nd: int) -> float | None:
    return None if x is None else round(x, nd)


def read_jsonl(paths: list[Path]) -> list[dict]:
    out = []
    for p in paths:
        if p.is_file():
            out += [{**json.loads(x), "_source": str(p)} for x in p.read_text().splitlines() if x.strip()]
    return out


def write_tables(result_dirs: list[Path], csv_dir: Path) -> tuple[int, int]:
    speed = speed_table(read_jsonl([d / "speed.jsonl" for d in result_dirs]))
    ctx = ctx_table(read_jsonl([d / "max-context.jsonl" for d in result_dirs]))
    write_csv_atomic(csv_dir / "speed.csv", SPEED_COLUMNS, speed)
    write_csv_atomic(csv_dir / "max-context.csv", CTX_COLUMNS, ctx)
    return len(speed), len(ctx)


# ------------------------------------------------------------------ main


def plan_rows(a, gpu_name: str | None, host_ram: int | None) -> list[Row]:
    rows: list[Row] = []
    for g in a.only or GROUPS:
        if g in SEEDS:
            rows += speed_rows(SEEDS[g], a.work, a.steps, gpu_name, host_ram, not a.no_fused, a.uncapped_steps, a.liger_ops, a.fused_lora,
                              a.offload_async, a.no_lean, a.sync_embed)
        else:
            modes = {"off": (False,), "on": (True,), "both": (False, True)}[a.fused]
            rows += ctx_rows(CTX_CASES[g], a.work, a.ctx_steps, gpu_name, host_ram, modes, a.edge)
    return [r for r in rows if r.config not in (a.skip or ())]


def print_rows(rows: list[Row], archs: list[str], gpu_name: str | None) -> float:
    total = BUILD_S * len(archs)
    print(f"inputs: random-weight {', '.join(archs)} + data: ~{total:.0f} s")
    for row in rows:
        cond = f" [only if {row.conditional}]" if row.conditional else ""
        pred = f", predicted peak {row.predicted_peak_gib:.2f} GiB" if row.predicted_peak_gib is not None else ""
        print(f"\n{row.group}/{row.config}: ~{row.est_s:.0f} s{pred}{cond}\n  {row.note}\n  {row.command()}")
        if not row.conditional:
            total += row.est_s
    print(f"\nestimated total ~{total / 60:.1f} min on {gpu_name or 'an unknown GPU'} (speed model + ~{LOAD_S:.0f} s per run to load;"
          f" conditional rows not counted)")  # fmt: skip
    if total > INVOCATION_S:
        print(f"warning: over {INVOCATION_S / 60:.0f} min: split the work with --only (one group per invocation)")
    return total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", choices=GROUPS, help="a group to run (repeatable; default: all)")
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="optimizer steps of each speed run")
    ap.add_argument("--uncapped-steps", type=int, default=UNCAPPED_STEPS, help="steps of a seed config measured without the cap")
    ap.add_argument("--ctx-steps", type=int, default=CTX_STEPS, help="optimizer steps of each max-context run")
    ap.add_argument("--fused", choices=["off", "on", "both"], default="both", help="max-context: without/with kernels.fused_loss")
    ap.add_argument("--no-fused", action="store_true", help="speed: skip the vramfit-auto-fused row")
    ap.add_argument("--liger-ops", action="store_true", help="speed: add the planner's plan with kernels.liger_ops on")
    ap.add_argument("--fused-lora", action="store_true",
                    help="speed: add the planner's plan with kernels.fused_lora off (on by default since session 13)")
    ap.add_argument("--offload-async", action="store_true", help="speed: add the planner's plan with train.offload_activations and train.offload_async on")
    ap.add_argument("--no-lean", action="store_true", help="speed: add the planner's plan with kernels.lean_recompute and kernels.lean_mlp off")
    ap.add_argument("--sync-embed", action="store_true", help="speed: add the planner's plan with train.offload_embeddings_async off")
    ap.add_argument("--skip", action="append", metavar="CONFIG",
                    help="leave out the rows of this config, e.g. seed-as-written-uncapped (repeatable)")
    ap.add_argument("--edge", action="store_true", help="max-context: also train the longest predicted under the budget with no margin")
    ap.add_argument("--peak", choices=["measured", "table"], default="measured", help="MFU against a measured or the data-sheet peak")
    ap.add_argument("--work", type=Path, default=Path("/tmp/vramfit-bench"))
    ap.add_argument("--results", type=Path, default=None, help="raw JSON lines, the run files and the CSVs go here")
    ap.add_argument("--archive", type=Path, default=None,
                    help="also keep RESULTS as this .tar.gz, rewritten after every run (survives a cut-off command)")
    ap.add_argument("--dry-run", action="store_true", help="print the commands, predictions and time estimates; run nothing")
    ap.add_argument("--gpu-name", default="NVIDIA H200", help="--dry-run: the GPU the plans are made for")
    ap.add_argument("--mapping", action="store_true", help="print each seed setting and its vramfit flag (markdown)")
    ap.add_argument("--collect", type=Path, nargs="+", help="result dirs: write the CSVs from their JSON lines (CPU)")
    ap.add_argument("--csv-dir", type=Path, default=ROOT / "docs/benchmarks")
    a = ap.parse_args(argv)

    if a.mapping:
        print(mapping_markdown())
        return 0
    if a.collect:
        n_speed, n_ctx = write_tables(a.collect, a.csv_dir)
        print(f"wrote {a.csv_dir / 'speed.csv'} ({n_speed} rows) and {a.csv_dir / 'max-context.csv'} ({n_ctx} rows)")
        return 0
    if a.dry_run:
        rows = plan_rows(a, a.gpu_name, 128 * 2**30)
        print_rows(rows, sorted({r.arch for r in rows}), a.gpu_name)
        return 0
    if a.results is None:
        ap.error("--results DIR is needed to run (or use --dry-run)")

    from vramfit.hardware import detect

    facts = detect()  # NVML only: no CUDA context in this process
    if not facts.has_gpu:
        print(f"no GPU ({facts.nvml_error}): use --dry-run here", file=sys.stderr)
        return 2
    a.work.mkdir(parents=True, exist_ok=True)
    a.results.mkdir(parents=True, exist_ok=True)
    gpu_name, host_ram = facts.gpus[0].name, facts.host_ram_bytes
    rows = plan_rows(a, gpu_name, host_ram)
    archs = sorted({r.arch for r in rows})
    print_rows(rows, archs, gpu_name)
    probe = measure_peak() if a.peak == "measured" else {}
    print(f"peak: {probe}", flush=True)
    meta = {"gpu": gpu_name, "peak_source": "measured" if probe.get("matmul_tflops") else "table",
            "peak_tflops_measured": probe.get("matmul_tflops"), "peak_probe": probe, "versions": versions(),
            "date": time.strftime("%Y-%m-%d")}  # fmt: skip
    r = BenchRunner(a.results)
    procs = []
    for arch in archs:
        model, data, cmds = input_commands(ROOT / f"scripts/archs/{arch}.json", a.work)
        procs.append(r.start(cmds[0]))  # the models build side by side on the one GPU
        for cmd in cmds[1:]:
            r.run(cmd)
    if any(p.wait() for p in procs):
        print("building a model failed: see benchmark.log", file=sys.stderr)
        return 1
    # The models just written (15 GB for a 7B) sit dirty in the page cache: flush them now, not
    # during a timed run. Suspected, not shown, of the slow step in four of session 14's first
    # runs after a build (docs/benchmarks.md).
    os.sync()
    t0 = time.perf_counter()
    failures = execute(rows, a.results, a.work, meta, r, a.archive)
    n_speed, n_ctx = write_tables([a.results], a.results)
    print(f"done in {time.perf_counter() - t0:.0f} s: {n_speed} speed rows, {n_ctx} max-context rows in {a.results}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

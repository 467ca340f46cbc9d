#!/usr/bin/env python3
"""Fit memory's fused-loss residual (FUSED_RESIDUAL_PER_TOKEN_HIDDEN, _PER_TOKEN_INTERMEDIATE,
_PER_TOKEN_INTERMEDIATE_LIGER, _PER_TOKEN_INTERMEDIATE_ADAPTED: memory.fused_residual_features
says what each multiplies) to every H200 run with the fused loss whose peak is on the GPU.

Three sources: the calibration runs in docs/benchmarks/calibration/fused.jsonl
(scripts/calibrate_memory.py with scripts/calibration_matrix_fused.yaml), the run directories
the benchmarks left (plan.yaml + metrics.json under docs/benchmarks/speed/ and
docs/benchmarks/savers/: long sequences, the tiled MLP, checkpointed inputs in host RAM,
micro-batches up to 16), and the allocator-snapshot runs (docs/benchmarks/calibration/snapshots/).
Runs with every saved tensor in host RAM (no checkpointing) are left out: memory.py adds no
residual there.

The residual is the backward's own transient, which memory.py takes instead of the
recomputation's where larger, so the model is flat in it up to that point. For each run the
residual at which the whole model meets the measured peak (NVML: allocator reserved + what
lives outside it) is found by bisection; runs the other terms already meet need none and are
left out of the fit. The needed residuals are fitted on the features by non-negative least
squares on the error relative to each run's measured peak (a 0.3 GiB miss matters on a 2 GiB
run, not on a 20 GiB one), each under-prediction weighted UNDER_WEIGHT times (reweighted until
the set of under-predicted runs settles): an under-prediction is an OOM for the user, an
over-prediction a little speed. Against the process peak, not allocated bytes: at long
sequences the allocator reserves up to 2.5 GiB beyond what is allocated. No GPU needed.

    python scripts/fit_fused_residual.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "scripts"))

from calibrate_memory import matrix_runs, run_config  # noqa: E402

import vramfit.memory as memory  # noqa: E402
from vramfit.config import RunConfig  # noqa: E402
from vramfit.model_shape import load_shape  # noqa: E402

GIB = 2**30
NAMES = (
    "FUSED_RESIDUAL_PER_TOKEN_HIDDEN", "FUSED_RESIDUAL_PER_TOKEN_INTERMEDIATE", "FUSED_RESIDUAL_PER_TOKEN_INTERMEDIATE_LIGER",
    "FUSED_RESIDUAL_PER_TOKEN_INTERMEDIATE_ADAPTED",
)
RUN_DIRS = ("docs/benchmarks/speed", "docs/benchmarks/savers", "docs/benchmarks/calibration/snapshots")
UNDER_WEIGHT = 3.0


# The random-weight models the runs trained, by (model_type, hidden, layers) as plan.yaml records them.
ARCHS = {(s.model_type, s.hidden, s.layers): s for s in (load_shape(str(p)) for p in sorted((ROOT / "scripts/archs").glob("*.json")))}


def _features(shape, cfg) -> list[float]:
    return memory.fused_residual_features(shape, cfg, cfg.data.seq_len)


def _calibration_runs():
    """(name, shape, config, measured allocated GiB, measured process GiB) of fused.jsonl."""
    for r, cfg, shape in matrix_runs(ROOT / "docs/benchmarks/calibration/fused.jsonl", "peak_allocated_gib"):
        yield f"{r['arch']} {cfg.method} mb{cfg.train.micro_batch} seq{cfg.data.seq_len}", shape, cfg, r["metrics"], cfg.data.seq_len


def _benchmark_runs():
    """The same for every benchmark run directory with the fused loss and its peak on the GPU."""
    for root in RUN_DIRS:
        for metrics in sorted((ROOT / root).rglob("metrics.json")):
            if not (metrics.parent / "plan.yaml").is_file():
                continue  # a comparison run kept without its plan
            m = json.loads(metrics.read_text())
            plan = yaml.safe_load((metrics.parent / "plan.yaml").read_text())
            cfg = RunConfig.model_validate(run_config(metrics.parent))
            if not m.get("peak_allocated_gib") or not cfg.kernels.fused_loss or plan["device"] != "cuda":
                continue
            if cfg.train.offload_activations and not cfg.train.grad_ckpt:
                continue  # memory.py adds no residual there
            shape = ARCHS[(plan["shape"]["model_type"], plan["shape"]["hidden"], plan["shape"]["layers"])]
            # Data shorter than seq_len (the auto-fit line says so) pads its micro-batches;
            # the benchmarks' data fills every sequence.
            short = any("holds the longest example" in line for line in plan.get("auto_fit") or [])
            yield f"{metrics.parent.relative_to(ROOT)}", shape, cfg, m, None if short else cfg.data.seq_len


def runs() -> list[tuple]:
    """(name, shape, config, shortest, measured process peak bytes) of every run, once."""
    out, seen = [], set()
    for name, shape, cfg, m, shortest in [*_calibration_runs(), *_benchmark_runs()]:
        key = (cfg.model_dump_json(), round(m["peak_allocated_gib"], 2))
        if key in seen:
            continue  # the same run kept in two places
        seen.add(key)
        out.append((name, shape, cfg, shortest, (m.get("peak_process_gib") or m["peak_reserved_gib"] + memory.CUDA_CONTEXT_GIB) * GIB))
    return out


def predict(run, residual: float | None = None) -> float:
    """The model's peak for a run, with the residual memory.py computes or, given, this many bytes."""
    _, shape, cfg, shortest, _ = run
    if residual is None:
        return memory.estimate(shape, cfg, "bfloat16", "cuda", shortest=shortest).peak
    real = memory.fused_residual_bytes
    memory.fused_residual_bytes = lambda *a, **k: residual
    try:
        return memory.estimate(shape, cfg, "bfloat16", "cuda", shortest=shortest).peak
    finally:
        memory.fused_residual_bytes = real


def needed(run) -> float:
    """The residual (bytes) at which the model meets the measured peak: 0 where it already
    does without one (the residual only takes over from the recomputation's transient, so
    the prediction is flat below it, then rises with the backward phase)."""
    measured = run[-1]
    if predict(run, 0.0) >= measured:
        return 0.0
    lo, hi = 0.0, 64.0 * GIB
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if predict(run, mid) < measured else (lo, mid)
    return hi


def nnls(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Non-negative least squares by active set over the columns (three: every subset)."""
    import itertools

    best, best_sse = np.zeros(x.shape[1]), float(np.sum(y**2))
    for k in range(1, x.shape[1] + 1):
        for cols in itertools.combinations(range(x.shape[1]), k):
            c = np.linalg.lstsq(x[:, cols], y, rcond=None)[0]
            if (c < 0).any():
                continue
            trial = np.zeros(x.shape[1])
            trial[list(cols)] = c
            sse = float(np.sum((x @ trial - y) ** 2))
            if sse < best_sse:
                best, best_sse = trial, sse
    return best


def main() -> int:
    data = runs()
    x = np.array([_features(r[1], r[2]) for r in data], float)
    y = np.array([needed(r) for r in data], float)
    peak = np.array([r[-1] for r in data], float)
    # Fit the residual to the runs that need one (those the other terms already over-predict
    # cannot be helped by it), relative to each run's peak, under-predictions weighted more.
    active = y > 0
    w = 1 / peak
    weights = w
    for _ in range(50):
        coef = nnls(x[active] * weights[active, None], y[active] * weights[active])
        fit = x @ coef
        again = w * np.where(fit < y, UNDER_WEIGHT, 1.0)
        if np.array_equal(again, weights):
            break
        weights = again
    saved = [getattr(memory, n) for n in NAMES]
    for n, c in zip(NAMES, coef):
        setattr(memory, n, float(c))
    try:
        pred = np.array([predict(r) for r in data], float)
    finally:
        for n, v in zip(NAMES, saved):
            setattr(memory, n, v)
    rel = (pred - peak) / peak
    for r, need, f, e in zip(data, y, fit, rel):
        print(f"{r[0][:70]:70} needs {need / GIB:5.2f} GiB, fitted {f / GIB:5.2f}: predicted {e:+.1%}")
    print(f"{len(data)} runs ({int(active.sum())} needing a residual): worst under {rel.min():+.1%}, worst over {rel.max():+.1%}, "
          f"median |error| {np.median(abs(rel)):.1%} (the whole model's prediction of the process peak)")
    for n, c in zip(NAMES, coef):
        print(f"{n} = {c:,.3f}  (in memory.py: {getattr(memory, n)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

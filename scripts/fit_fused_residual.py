#!/usr/bin/env python3
"""Fit memory's fused-loss residual (FUSED_RESIDUAL_PER_TOKEN, _PER_TOKEN_INTERMEDIATE and
_PER_SEQ2) to every H200 run with the fused loss whose peak is in the backward on the GPU.

Two sources: the calibration runs in docs/benchmarks/calibration/fused.jsonl
(scripts/calibrate_memory.py with scripts/calibration_matrix_fused.yaml), and the run
directories the benchmarks left (plan.yaml + metrics.json under docs/benchmarks/speed/ and
docs/benchmarks/savers/: long sequences, the tiled MLP, checkpointed inputs in host RAM,
micro-batches up to 16). Runs with every saved tensor in host RAM (no checkpointing) are
left out: memory.py adds no residual there.

For each, the memory model without the residual predicts the process's peak; the measured
peak (NVML: allocator reserved + what lives outside it) minus that is the deficit. Against
the process peak, not the allocator's allocated bytes: at long sequences the allocator
reserves up to 1.4 GiB beyond what is allocated, more than the model's slack, and that is
what a budget has to hold. The deficits are fitted as
a x tokens + b x tokens x intermediate_size + c x micro_batch x seq_len^2 by non-negative
least squares on the error relative to each run's measured peak (the targets are in percent:
a 0.3 GiB miss matters on a 2 GiB run, not on a 20 GiB one), with each under-prediction
weighted UNDER_WEIGHT times (reweighted until the set of under-predicted runs settles): an
under-prediction is an OOM for the user, an over-prediction a little speed. No GPU needed.

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

from calibrate_memory import matrix_runs  # noqa: E402

import vramfit.memory as memory  # noqa: E402
from vramfit.config import RunConfig  # noqa: E402
from vramfit.model_shape import load_shape  # noqa: E402

GIB = 2**30
NAMES = ("FUSED_RESIDUAL_PER_TOKEN", "FUSED_RESIDUAL_PER_TOKEN_INTERMEDIATE", "FUSED_RESIDUAL_PER_SEQ2")
RUN_DIRS = ("docs/benchmarks/speed", "docs/benchmarks/savers")
UNDER_WEIGHT = 2.0


# The random-weight models the runs trained, by (model_type, hidden, layers) as plan.yaml records them.
ARCHS = {(s.model_type, s.hidden, s.layers): s for s in (load_shape(str(p)) for p in sorted((ROOT / "scripts/archs").glob("*.json")))}


def _features(shape, cfg) -> list[float]:
    mb, seq = cfg.train.micro_batch, cfg.data.seq_len
    return [mb * seq, mb * seq * shape.intermediate, mb * seq * seq]


def _calibration_runs():
    """(name, shape, config, measured allocated GiB, measured process GiB) of fused.jsonl."""
    for r, cfg, shape in matrix_runs(ROOT / "docs/benchmarks/calibration/fused.jsonl", "peak_allocated_gib"):
        yield f"{r['arch']} {cfg.method} mb{cfg.train.micro_batch} seq{cfg.data.seq_len}", shape, cfg, r["metrics"]


def _benchmark_runs():
    """The same for every benchmark run directory with the fused loss and its peak on the GPU."""
    for root in RUN_DIRS:
        for metrics in sorted((ROOT / root).rglob("metrics.json")):
            m = json.loads(metrics.read_text())
            plan = yaml.safe_load((metrics.parent / "plan.yaml").read_text())
            cfg = RunConfig.model_validate(plan["config"])
            if not m.get("peak_allocated_gib") or not cfg.kernels.fused_loss or plan["device"] != "cuda":
                continue
            if cfg.train.offload_activations and not cfg.train.grad_ckpt:
                continue  # memory.py adds no residual there
            shape = ARCHS[(plan["shape"]["model_type"], plan["shape"]["hidden"], plan["shape"]["layers"])]
            yield f"{metrics.parent.relative_to(ROOT)}", shape, cfg, m


def deficits() -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """(features, deficit bytes, measured peak bytes, names) of every run."""
    saved = [getattr(memory, n) for n in NAMES]
    for n in NAMES:
        setattr(memory, n, 0)  # the model without the residual
    try:
        x, y, peak, names = [], [], [], []
        seen = set()
        for name, shape, cfg, m in [*_calibration_runs(), *_benchmark_runs()]:
            key = (cfg.model_dump_json(), round(m["peak_allocated_gib"], 2))
            if key in seen:
                continue  # the same run kept in two places
            seen.add(key)
            b = memory.estimate(shape, cfg, "bfloat16", "cuda", shortest=cfg.data.seq_len)  # full-length data only
            measured = (m.get("peak_process_gib") or m["peak_reserved_gib"] + memory.CUDA_CONTEXT_GIB) * GIB
            # In the backward the residual also carries the allocator slack (OTHER_SLACK x the phase).
            x.append([f * (1 + memory.OTHER_SLACK) for f in _features(shape, cfg)])
            y.append(measured - b.peak)
            peak.append(measured)
            names.append(name)
        return np.array(x, float), np.array(y, float), np.array(peak, float), names
    finally:
        for n, v in zip(NAMES, saved):
            setattr(memory, n, v)


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
    x, y, peak, names = deficits()
    w = 1 / peak  # relative error
    weights = w
    for _ in range(50):
        coef = nnls(x * weights[:, None], y * weights)
        fit = x @ coef
        again = w * np.where(fit < y, UNDER_WEIGHT, 1.0)
        if np.array_equal(again, weights):
            break
        weights = again
    for n, got, f, p in zip(names, y, fit, peak):
        print(f"{n[:70]:70} deficit {got / GIB:+.2f} GiB, fitted {f / GIB:+.2f} ({(f - got) / p:+.1%} of the peak)")
    rel = (fit - y) / peak
    print(f"{len(y)} runs: worst under {rel.min():+.1%}, worst over {rel.max():+.1%}, median |error| {np.median(abs(rel)):.1%}"
          " (of the measured peak, the residual's share only)")
    for n, c in zip(NAMES, coef):
        print(f"{n} = {c:,.3f}  (in memory.py: {getattr(memory, n)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

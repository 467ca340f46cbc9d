#!/usr/bin/env python3
"""Fit memory.FUSED_RESIDUAL_PER_TOKEN and FUSED_RESIDUAL_PER_SEQ2 to the fused-loss runs.

For every run in docs/benchmarks/calibration/fused.jsonl (scripts/calibrate_memory.py with
scripts/calibration_matrix_fused.yaml, on an H200), the memory model without the residual
predicts what the allocator holds at the peak (the breakdown less the CUDA context and the
allocator slack); the measured peak allocated minus that is the deficit. The deficits are fitted
as a x tokens + b x micro_batch x seq_len^2 by non-negative least squares (two columns: solve,
drop a column whose coefficient comes out negative, solve again). No GPU needed.

    python scripts/fit_fused_residual.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "scripts"))

from calibrate_memory import config_for, predict  # noqa: E402

import vramfit.memory as memory  # noqa: E402

GIB = 2**30


def deficits(raw: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    saved = memory.FUSED_RESIDUAL_PER_TOKEN, memory.FUSED_RESIDUAL_PER_SEQ2
    memory.FUSED_RESIDUAL_PER_TOKEN = memory.FUSED_RESIDUAL_PER_SEQ2 = 0  # the model without it
    try:
        x, y, names = [], [], []
        for line in raw.read_text().splitlines():
            r = json.loads(line)
            m = r["metrics"]
            if r["exit"] != 0 or not m.get("peak_allocated_gib"):
                continue
            cfg = config_for(r)
            b = predict(r, ROOT / f"scripts/archs/{r['arch']}.json")
            allocated = b.peak - b.cuda_context - b.allocator_slack
            mb, seq = cfg.train.micro_batch, cfg.data.seq_len
            x.append([mb * seq, mb * seq * seq])
            y.append(m["peak_allocated_gib"] * GIB - allocated)
            names.append(f"{r['arch']} {cfg.method} mb{mb} seq{seq} ckpt {'on' if cfg.train.grad_ckpt else 'off'}")
        return np.array(x, float), np.array(y, float), names
    finally:
        memory.FUSED_RESIDUAL_PER_TOKEN, memory.FUSED_RESIDUAL_PER_SEQ2 = saved


def nnls2(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    coef = np.linalg.lstsq(x, y, rcond=None)[0]
    if (coef >= 0).all():
        return coef
    out = np.zeros(2)
    for keep in (0, 1):  # one column alone, the better of the two
        c = max(0.0, float(np.linalg.lstsq(x[:, [keep]], y, rcond=None)[0][0]))
        trial = np.zeros(2)
        trial[keep] = c
        if not out.any() or np.sum((x @ trial - y) ** 2) < np.sum((x @ out - y) ** 2):
            out = trial
    return out


def main() -> int:
    x, y, names = deficits(ROOT / "docs/benchmarks/calibration/fused.jsonl")
    coef = nnls2(x, y)
    for n, got, fit in zip(names, y, x @ coef):
        print(f"{n:45} deficit {got / GIB:+.2f} GiB, fitted {fit / GIB:+.2f}")
    print(f"FUSED_RESIDUAL_PER_TOKEN = {coef[0]:,.0f}  (in memory.py: {memory.FUSED_RESIDUAL_PER_TOKEN:,})")
    print(f"FUSED_RESIDUAL_PER_SEQ2 = {coef[1]:.2f}  (in memory.py: {memory.FUSED_RESIDUAL_PER_SEQ2})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

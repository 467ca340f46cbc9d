#!/usr/bin/env python3
"""docs/benchmarks/autofit.md and autofit.csv from the raw lines scripts/prove_autofit.py wrote.

    python scripts/collect_autofit.py   # reads docs/benchmarks/autofit/autofit.jsonl
"""

from __future__ import annotations

import csv
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIELDS = ("arch,budget_gib,method,seq_len,micro_batch,grad_accum,grad_ckpt,optimizer,predicted_gib,measured_gib,"
          "mem_error_pct,under_budget,predicted_tokens_per_s,measured_tokens_per_s,speed_error_pct,steps,exit,gpu,command").split(",")


def table(raw: Path) -> list[dict]:
    out = []
    for line in raw.read_text().splitlines():
        r = json.loads(line)
        m, c, p = r["metrics"], r["config"], r["plan"]
        meas, pred = m.get("peak_process_gib"), p.get("predicted_peak_gib")
        rate, prate = m.get("steady_tokens_per_s"), p.get("predicted_tokens_per_s")
        out.append({
            "arch": r["arch"], "budget_gib": r["budget_gib"], "method": p.get("method"), **c,
            "predicted_gib": pred, "measured_gib": meas,
            "mem_error_pct": round(100 * (pred - meas) / meas, 1) if meas and pred else None,
            "under_budget": bool(meas and meas <= r["budget_gib"]),
            "predicted_tokens_per_s": prate, "measured_tokens_per_s": rate,
            "speed_error_pct": round(100 * (prate - rate) / rate, 1) if rate and prate else None,
            "steps": m.get("steps"), "exit": r["exit"], "gpu": r["gpu"], "command": r["command"],
        })  # fmt: skip
    return out


def main() -> int:
    rows = table(ROOT / "docs/benchmarks/autofit/autofit.jsonl")
    with (ROOT / "docs/benchmarks/autofit.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    print("| model | budget | plan (method, seq, mb x GA, ckpt) | predicted peak | measured peak | error | predicted tok/s | measured tok/s | error |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['arch']} | {r['budget_gib']:g} | {r['method']}, {r['seq_len']}, {r['micro_batch']}x{r['grad_accum']}, "
              f"{'on' if r['grad_ckpt'] else 'off'} | {r['predicted_gib']:.2f} | {r['measured_gib']:.2f} | {r['mem_error_pct']:+.1f}% "
              f"| {r['predicted_tokens_per_s']:,.0f} | {r['measured_tokens_per_s']:,.0f} | {r['speed_error_pct']:+.0f}% |")  # fmt: skip
    mem = [abs(r["mem_error_pct"]) for r in rows]
    sp = [abs(r["speed_error_pct"]) for r in rows]
    print(json.dumps({"runs": len(rows), "all_under_budget": all(r["under_budget"] for r in rows),
                      "all_exit_0": all(r["exit"] == 0 for r in rows), "steps_min": min(r["steps"] for r in rows),
                      "mem_median_abs_pct": statistics.median(mem), "mem_worst_abs_pct": max(mem),
                      "speed_median_abs_pct": statistics.median(sp), "speed_worst_abs_pct": max(sp)}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

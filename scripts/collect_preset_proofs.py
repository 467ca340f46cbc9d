#!/usr/bin/env python3
"""Aggregate scripts/prove_preset.py results into docs/benchmarks/presets.{csv,md}.

    python scripts/collect_preset_proofs.py docs/benchmarks/proofs

Every figure comes from a proof JSON (and its log) written on the GPU machine;
nothing here is typed in by hand.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = [
    "preset", "arch", "gpu", "budget_gib", "steps", "seq_len", "predicted_gib", "peak_allocated_gib",
    "peak_reserved_gib", "peak_process_gib", "cuda_context_gib", "tokens_per_s", "first_loss", "final_loss",
    "merge_max_diff", "merge_tolerance", "merged_loads", "date", "versions", "train_command", "merge_command",
]  # fmt: skip


def row(result: dict, log: str) -> dict:
    m = result.get("metrics", {})
    seq = re.search(r"seq (\d+), micro-batch", log)
    merge = re.search(r"largest logit difference (\S+) \(tolerance ([^;]+);", log)
    v = result.get("versions", {})
    return {
        "preset": result["preset"],
        "arch": result["arch"],
        "gpu": m.get("device"),
        "budget_gib": result["budget_gib"],
        "steps": m.get("steps"),
        "seq_len": int(seq.group(1)) if seq else None,
        "predicted_gib": m.get("predicted_peak_gib"),
        "peak_allocated_gib": m.get("peak_allocated_gib"),
        "peak_reserved_gib": m.get("peak_reserved_gib"),
        "peak_process_gib": m.get("peak_process_gib"),
        "cuda_context_gib": m.get("cuda_context_gib"),
        "tokens_per_s": m.get("tokens_per_s"),
        "first_loss": m.get("first_loss"),
        "final_loss": m.get("final_loss"),
        "merge_max_diff": float(merge.group(1)) if merge else None,
        "merge_tolerance": float(merge.group(2)) if merge else None,
        "merged_loads": result.get("merged_loads"),
        "date": result.get("date"),
        "versions": " ".join(f"{k}={v[k]}" for k in ("torch", "transformers", "peft", "bitsandbytes") if k in v),
        "train_command": result["train_command"],
        "merge_command": result.get("merge_command"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("proofs", type=Path)
    ap.add_argument("--out", type=Path, default=ROOT / "docs/benchmarks")
    a = ap.parse_args()
    rows = []
    for f in sorted(a.proofs.glob("*.json")):
        log = f.with_suffix(".log")
        rows.append(row(json.loads(f.read_text()), log.read_text() if log.is_file() else ""))
    rows.sort(key=lambda r: r["budget_gib"])
    with (a.out / "presets.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    lines = [
        "# Presets proven on a GPU",
        "",
        "Each row: the preset trained under `--budget` (the process's GPU memory capped with",
        "torch's per-process memory fraction, CUDA context counted) on a random-weight model of",
        "the named architecture and generated data whose every example fills the sequence length,",
        "then merged, and the merged model loaded with `from_pretrained`.",
        "Produced by `scripts/prove_preset.py`, gathered by `scripts/collect_preset_proofs.py`;",
        "raw results and logs in `proofs/`.",
        "",
        "| preset | model | GPU | budget | seq | steps | predicted | peak allocated | peak reserved | process (NVML) | tokens/s | loss | merge check |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        err = (r["predicted_gib"] - r["peak_process_gib"]) / r["peak_process_gib"] if r["peak_process_gib"] else None
        lines.append(
            f"| {r['preset']} | {r['arch']} | {r['gpu']} | {r['budget_gib']:g} GiB | {r['seq_len']} | {r['steps']} | "
            f"{r['predicted_gib']:.2f} GiB ({err:+.1%}) | {r['peak_allocated_gib']:.2f} GiB | {r['peak_reserved_gib']:.2f} GiB | "
            f"{r['peak_process_gib']:.2f} GiB | {r['tokens_per_s']:,.0f} | {r['first_loss']} -> {r['final_loss']} | "
            f"{r['merge_max_diff']:.2g} <= {r['merge_tolerance']:.2g} |"
        )
    lines += ["", "Commands (on the GPU machine; `python -m vramfit` there, as no console script is installed):", ""]
    for r in rows:
        lines += [f"- {r['preset']}: `{r['train_command']}` then `{r['merge_command']}`"]
        lines += [f"  ({r['date']}, {r['versions']})"]
    lines += [
        "",
        "The whole proof, model and data included, is one command per preset:",
        "",
        "```",
        "python scripts/prove_preset.py --preset 8gb --budget 8 --arch scripts/archs/qwen2.5-7b.json --steps 30 --work /tmp/vf --results $OUT/proofs",
        "python scripts/prove_preset.py --preset 24gb --budget 24 --arch scripts/archs/qwen2.5-7b.json --steps 30 --work /tmp/vf --results $OUT/proofs",
        "```",
        "",
    ]
    (a.out / "presets.md").write_text("\n".join(lines))
    print(f"wrote {len(rows)} rows to {a.out}/presets.csv and presets.md")


if __name__ == "__main__":
    main()

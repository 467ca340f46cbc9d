#!/usr/bin/env python3
"""The plots of docs/benchmarks.md, from the benchmark's raw results (CPU).

Reads the JSON lines that scripts/benchmark_speed.py wrote on the GPU (RESULTS/speed.jsonl,
RESULTS/max-context.jsonl in each directory given) and draws three PNGs:

- max-context.png: the longest sequence the planner chose and trained under each budget,
  beside the published figures it is compared with;
- speed.png: tokens/s of the seed configs and of vramfit's plan at each budget;
- breakdown.png: the predicted peak of every trained row as its breakdown (weights,
  activations, ...), with the measured process peak (NVML) marked on each bar.

    python scripts/benchmark_plots.py docs/benchmarks/speed/2-max-context docs/benchmarks/speed/3-24gb-lora \\
        docs/benchmarks/speed/4-8gb-qlora --out docs/benchmarks
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PARTS = ("weights", "adapters", "gradients", "optimizer", "activations", "logits", "allocator_slack", "cuda_context")


def records(dirs: list[Path], kind: str) -> list[dict]:
    out = []
    for d in dirs:
        f = d / f"{kind}.jsonl"
        if f.is_file():
            out += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return [r for r in out if str(r.get("status", "")).startswith("ok")]


def plot_max_context(rows: list[dict], out: Path, plt) -> None:
    # The latest run of each case (later result dirs re-ran some with a refitted model).
    latest = {r["group"]: r for r in rows}
    rows = sorted(latest.values(), key=lambda r: (r["arch"], r["budget_gib"], r["group"]))
    fig, ax = plt.subplots(figsize=(8, 4.2))
    xs = range(len(rows))
    ours = [r.get("predicted_max_seq") or 0 for r in rows]  # the length each row trained at
    ax.bar([x - 0.2 for x in xs], ours, 0.4, label="vramfit --preset auto (trained under the cap)")
    pub = [r.get("published_max_seq") or 0 for r in rows]
    ax.bar([x + 0.2 for x in xs], pub, 0.4, label="published (Unsloth)", color="grey")
    names = [f"{r['arch']}, {r['budget_gib']:g} GiB" + (", dropout 0" if r["group"].endswith("dropout0") else "") for r in rows]
    ax.set_xticks(list(xs), names, fontsize=7, rotation=30, ha="right")
    ax.set_ylabel("longest sequence (tokens)")
    ax.set_title("Longest trainable sequence, micro-batch 1, H200 under a memory cap", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def card(r: dict) -> str:
    """A short name for the row's GPU: "H200", "H100", or what NVML called it."""
    name = r.get("gpu") or "?"
    return next((k for k in ("H200", "H100", "A100") if k in name), name)


def plot_speed(rows: list[dict], out: Path, plt) -> None:
    # The latest run of each config, as speed.csv keeps them (the directories are in run order).
    # Per card too: an H100's rows do not replace an H200's (speeds differ by card).
    rows = sorted({(r.get("gpu"), r["group"], r["config"]): r for r in rows}.values(), key=lambda r: (r["group"], card(r), r["config"]))
    fig, ax = plt.subplots(figsize=(11, 5.2))
    tps = [r["metrics"]["steady_tokens_per_s"] for r in rows]
    colors = ["tab:blue" if r["config"].startswith("vramfit") else "grey" for r in rows]
    ax.bar(range(len(rows)), tps, color=colors)
    ax.set_xticks(range(len(rows)), [f"{r['group']}: {r['config']} ({card(r)})" for r in rows], fontsize=6, rotation=35, ha="right")
    ax.set_ylabel("tokens/s")
    ax.set_title("Qwen2.5-7B: seed guide configs (grey) and vramfit's plan (blue), same cap, data, batch", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def plot_breakdown(rows: list[dict], out: Path, plt) -> None:
    # The latest run of each case, as the CSVs keep them.
    rows = list({(r.get("gpu"), r["group"], r["config"]): r for r in rows}.values())
    fig, ax = plt.subplots(figsize=(12, 5.6))
    bottom = [0.0] * len(rows)
    for part in PARTS:
        vals = [(r.get("breakdown_gib") or {}).get(part, 0.0) for r in rows]
        ax.bar(range(len(rows)), vals, bottom=bottom, label=part)
        bottom = [b + v for b, v in zip(bottom, vals)]
    measured = [r["metrics"].get("peak_process_gib") for r in rows]
    ax.scatter(range(len(rows)), measured, color="black", marker="_", s=400, zorder=3, label="measured (NVML)")
    ax.set_xticks(range(len(rows)), [f"{r['group']}/{r['config']} ({card(r)})" for r in rows], fontsize=5, rotation=35, ha="right")
    ax.set_ylabel("GiB")
    ax.set_title("Predicted peak breakdown and measured process peak", fontsize=9)
    ax.legend(fontsize=7, ncol=3, loc="upper left")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dirs", type=Path, nargs="+")
    ap.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    a = ap.parse_args(argv)
    speed, ctx = records(a.dirs, "speed"), records(a.dirs, "max-context")
    if not speed and not ctx:
        print("no trained rows in " + ", ".join(map(str, a.dirs)), file=sys.stderr)
        return 2
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a.out.mkdir(parents=True, exist_ok=True)
    written = []
    if ctx:
        plot_max_context(ctx, a.out / "max-context.png", plt)
        written.append("max-context.png")
    if speed:
        plot_speed(speed, a.out / "speed.png", plt)
        written.append("speed.png")
    with_breakdown = [r for r in speed + ctx if r.get("breakdown_gib") and r.get("metrics", {}).get("peak_process_gib")]
    if with_breakdown:
        plot_breakdown(with_breakdown, a.out / "breakdown.png", plt)
        written.append("breakdown.png")
    print("wrote " + ", ".join(str(a.out / w) for w in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Predicted against measured: docs/benchmarks/memory-calibration.csv, the error table and plot.

Reads the raw GPU measurements (docs/benchmarks/calibration/calibration.jsonl, written
by scripts/calibrate_memory.py, and the multi-GPU runs in
docs/benchmarks/distributed/distributed.jsonl, written by scripts/prove_distributed.py:
their largest per-rank peak) and predicts each configuration again with the
current memory model, so the CSV always shows the model as it is in this checkout.
No GPU needed. Measured = the process's peak (allocator peak reserved + memory
outside the allocator, from NVML).

    python scripts/calibration_report.py            # writes the CSV, prints the tables
    python scripts/calibration_report.py --plot docs/benchmarks/memory-calibration.png
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "scripts"))

from calibrate_memory import config_from_command, matrix_runs, model_of  # noqa: E402

from vramfit.memory import estimate  # noqa: E402
from vramfit.model_shape import load_shape  # noqa: E402

FIELDS = (
    "arch,method,lora_r,targets,micro_batch,seq_len,grad_ckpt,optimizer,zero_stage,gpus,"
    "predicted_gib,measured_gib,error_pct,peak_phase,measured_reserved_gib,measured_allocated_gib,"
    "outside_allocator_gib,tokens_per_s,gpu,torch,transformers,peft,bitsandbytes,date,source,command"
).split(",")


def _measured(cfg, b, m: dict, measured: float, reserved: float, gpu, r: dict, source: str, command: str) -> dict:
    """The CSV columns every measured row shares: prediction against measurement, the
    GPU, the versions and the command."""
    return {
        "zero_stage": cfg.deepspeed.stage,
        "gpus": cfg.world_size,
        "predicted_gib": round(b.peak_gib, 3),
        "measured_gib": measured,
        "error_pct": round(100 * (b.peak_gib - measured) / measured, 2),
        "peak_phase": b.phase,
        "measured_reserved_gib": reserved,
        "measured_allocated_gib": m["peak_allocated_gib"],
        "outside_allocator_gib": m.get("outside_allocator_gib"),
        "tokens_per_s": m.get("steady_tokens_per_s"),
        "gpu": gpu,
        **{k: r["versions"].get(k) for k in ("torch", "transformers", "peft", "bitsandbytes")},
        "date": r["date"],
        "source": source,
        "command": command,
    }


def rows(raw: Path) -> list[dict]:
    out = []
    for r, cfg, shape in matrix_runs(raw):
        m = r["metrics"]
        b = estimate(shape, cfg, "bfloat16", "cuda", shortest=cfg.data.seq_len)  # every example fills the sequence
        measured = m["peak_process_gib"]
        out.append(
            {
                **{k: r[k] for k in ("arch", "method", "lora_r", "targets", "micro_batch", "seq_len", "grad_ckpt", "optimizer")},
                **_measured(cfg, b, m, measured, m["peak_reserved_gib"], r["gpu"], r, "matrix", r["command"]),
                "attn": cfg.model.attn_implementation,
                "loss": "fused" if cfg.kernels.fused_loss else "plain",
            }
        )
    return out


def distributed_rows(raw: Path) -> list[dict]:
    """One row per multi-GPU training run that finished, its largest per-rank peak as measured."""
    out = []
    for line in raw.read_text().splitlines() if raw.is_file() else []:
        r = json.loads(line)
        runs = [r[k] for k in ("2gpu_zero2", "1gpu", "train") if isinstance(r.get(k), dict)]
        if r["case"] in ("full3", "offload", "scaling"):
            runs = [r]
        for run in runs:
            m = run.get("metrics") or {}
            if not m.get("peak_process_gib"):
                continue
            cfg = config_from_command(run["command"])
            arch = Path(model_of(run["command"])).name
            shape = load_shape(str(ROOT / f"scripts/archs/{arch}.json"))
            b = estimate(shape, cfg, "bfloat16", "cuda")
            measured = m.get("max_rank_peak_process_gib") or m["peak_process_gib"]
            targets = cfg.lora.target_modules
            out.append(
                {
                    "arch": arch,
                    "method": cfg.method,
                    "lora_r": cfg.lora.r if cfg.method != "full" else 0,
                    "targets": "all" if targets == "all-linear" else "+".join(targets),
                    "micro_batch": cfg.train.micro_batch,
                    "seq_len": cfg.data.seq_len,
                    "grad_ckpt": cfg.train.grad_ckpt,
                    "optimizer": cfg.train.optimizer,
                    **_measured(
                        cfg, b, m, measured, m.get("max_rank_peak_reserved_gib") or m["peak_reserved_gib"], m.get("device"), r,
                        "distributed", run["command"],
                    ),
                    "attn": cfg.model.attn_implementation,
                    "loss": "fused" if cfg.kernels.fused_loss else "plain",
                }
            )
    return out


def summary(table: list[dict]) -> dict:
    errs = [abs(r["error_pct"]) for r in table]
    under = [r["error_pct"] for r in table if r["error_pct"] < 0]
    return {
        "runs": len(table),
        "archs": len({r["arch"] for r in table}),
        "median_abs_error_pct": round(statistics.median(errs), 2),
        "worst_abs_error_pct": round(max(errs), 2),
        "worst_under_prediction_pct": round(-min(under), 2) if under else 0.0,
    }


def plot(table: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 6))
    colors = {"qlora": "tab:blue", "lora": "tab:green", "full": "tab:red"}
    for method, c in colors.items():
        pts = [r for r in table if r["method"] == method]
        ax.scatter([r["measured_gib"] for r in pts], [r["predicted_gib"] for r in pts], c=c, label=method, s=28)
    top = max(max(r["measured_gib"], r["predicted_gib"]) for r in table) * 1.05
    ax.plot([0, top], [0, top], "k-", lw=0.8, label="exact")
    ax.plot([0, top], [0, top * 1.05], "k--", lw=0.5, label="±5%")
    ax.plot([0, top], [0, top * 0.95], "k--", lw=0.5)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("measured peak per process, GiB (allocator reserved + outside, NVML)")
    ax.set_ylabel("predicted peak, GiB (vramfit memory model)")
    s = summary(table)
    ax.set_title(f"{s['runs']} runs, {s['archs']} architectures: median |error| {s['median_abs_error_pct']}%, worst {s['worst_abs_error_pct']}%")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--raw", type=Path, nargs="+", default=[ROOT / f"docs/benchmarks/calibration/{n}.jsonl" for n in ("calibration", "fused", "archs")],
                    help="calibrate_memory.py's calibration.jsonl files (the matrices' runs)")
    ap.add_argument("--csv", type=Path, default=ROOT / "docs/benchmarks/memory-calibration.csv")
    ap.add_argument("--plot", type=Path)
    ap.add_argument("--distributed", type=Path, default=ROOT / "docs/benchmarks/distributed/distributed.jsonl")
    a = ap.parse_args()
    matrix = [r for raw in a.raw for r in rows(raw)]
    extra = distributed_rows(a.distributed) + distributed_rows(a.distributed.with_name("scaling.jsonl"))
    table = matrix + extra
    # attention implementation: a trailing column once some run used other than sdpa
    fields = FIELDS + (["attn"] if any(r["attn"] != "sdpa" for r in table) else [])
    fields += ["loss"] if any(r["loss"] != "plain" for r in table) else []  # likewise the fused loss
    tmp = a.csv.with_suffix(".tmp")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(table)
    tmp.replace(a.csv)
    print("| arch | method | r | targets | mb | seq | ckpt | optimizer | predicted | measured | error |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in sorted(matrix, key=lambda r: (r["arch"], r["method"], r["seq_len"] * r["micro_batch"])):
        print(
            f"| {r['arch']}{'' if r['attn'] == 'sdpa' else ' (' + r['attn'] + ')'}{' (fused loss)' if r['loss'] == 'fused' else ''} | {r['method']} | {r['lora_r'] or '-'} | {r['targets'] if r['method'] != 'full' else '-'} | {r['micro_batch']} "
            f"| {r['seq_len']} | {'on' if r['grad_ckpt'] else 'off'} | {r['optimizer']} | {r['predicted_gib']:.2f} "
            f"| {r['measured_gib']:.2f} | {r['error_pct']:+.1f}% |"
        )
    print(json.dumps(summary(matrix)))
    if extra:
        print("\nmulti-GPU runs (largest per-rank peak):")
        print("| arch | method | ZeRO | GPUs | seq | predicted | measured | error |")
        print("|---|---|---|---|---|---|---|---|")
        for r in extra:
            print(
                f"| {r['arch']} | {r['method']} | {r['zero_stage']} | {r['gpus']} | {r['seq_len']} | {r['predicted_gib']:.2f} "
                f"| {r['measured_gib']:.2f} | {r['error_pct']:+.1f}% |"
            )
    if a.plot:
        plot(matrix, a.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Prove auto-fit on a GPU: `vramfit train --preset auto --budget B` for each model and budget.

For every architecture and budget this runs the real CLI on a random-weight model
and a generated dataset whose example lengths spread over a range (so the plan's
sequence length, padding and speed come from the data), trains the given number
of steps one run at a time (the speed is measured alone), and writes one JSON line
per run with the command, the plan's choices, predicted and measured peak, and
predicted and measured tokens/s to RESULTS/autofit.jsonl.

    python scripts/prove_autofit.py --arch qwen2.5-7b --budgets 8 12 16 24 40 80 --results $OUT

scripts/collect_autofit.py turns the lines into docs/benchmarks/autofit.md.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from prove_preset import sh, versions  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", action="append", required=True, help="scripts/archs/NAME.json (repeatable)")
    ap.add_argument("--budgets", type=float, nargs="+", default=[8, 12, 16, 24, 40, 80])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--work", type=Path, default=Path("/tmp/vramfit-autofit"))
    ap.add_argument("--results", type=Path, required=True)
    ap.add_argument("--min-chars", type=int, default=100)
    ap.add_argument("--max-chars", type=int, default=500)
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    a.results.mkdir(parents=True, exist_ok=True)
    log = a.results / "autofit.log"
    py = sys.executable
    data = a.work / "spread.jsonl"
    if not data.exists():
        rc, _ = sh([py, str(ROOT / "scripts/make_embedded_dataset.py"), "--n", "2000", "--min-chars", str(a.min_chars),
                    "--max-chars", str(a.max_chars), "--out", str(data)], log)  # fmt: skip
        if rc:
            return rc
    import torch

    gpu, ver = torch.cuda.get_device_name(0), versions()
    failures = 0
    for arch in a.arch:
        model = a.work / arch
        rc, _ = sh([py, str(ROOT / "scripts/make_random_model.py"), str(ROOT / f"scripts/archs/{arch}.json"), str(model), "--device", "cuda"], log)
        if rc:
            return rc
        for budget in a.budgets:
            run = a.work / f"run-{arch}-{budget:g}"
            shutil.rmtree(run, ignore_errors=True)
            args = ["train", "--preset", "auto", "--budget", f"{budget:g}", "--model", str(model), "--data", str(data),
                    "--out", str(run), "--set", f"train.max_steps={a.steps}", "--set", f"train.save_steps={a.steps}"]  # fmt: skip
            rc, wall = sh([py, "-m", "vramfit", *args], log)
            plan = yaml.safe_load((run / "plan.yaml").read_text()) if (run / "plan.yaml").is_file() else {}
            m = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").is_file() else {}
            rec = {
                "arch": arch,
                "budget_gib": budget,
                "command": "vramfit " + shlex.join(args),
                "exit": rc,
                "wall_s": round(wall, 1),
                "gpu": gpu,
                "versions": ver,
                "date": time.strftime("%Y-%m-%d"),
                "plan": {k: plan.get(k) for k in ("method", "predicted_peak_gib", "predicted_tokens_per_s", "peak_phase", "breakdown", "auto_fit")},
                "config": {
                    "seq_len": plan.get("config", {}).get("data", {}).get("seq_len"),
                    "micro_batch": plan.get("config", {}).get("train", {}).get("micro_batch"),
                    "grad_accum": plan.get("config", {}).get("train", {}).get("grad_accum"),
                    "grad_ckpt": plan.get("config", {}).get("train", {}).get("grad_ckpt"),
                    "grad_ckpt_layers": plan.get("config", {}).get("train", {}).get("grad_ckpt_layers"),
                    "optimizer": plan.get("config", {}).get("train", {}).get("optimizer"),
                    "lora_r": plan.get("config", {}).get("lora", {}).get("r"),
                    "fused_loss": plan.get("config", {}).get("kernels", {}).get("fused_loss"),
                },
                "metrics": {k: v for k, v in m.items() if k not in ("output",)},
                "planned_config": plan.get("config"),  # the whole plan, savers and kernels included
            }
            with (a.results / "autofit.jsonl").open("a") as f:
                f.write(json.dumps(rec) + "\n")
            failures += rc != 0
            shutil.rmtree(run, ignore_errors=True)
        shutil.rmtree(model, ignore_errors=True)  # the disk is shared by every architecture
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

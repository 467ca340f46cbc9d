#!/usr/bin/env python3
"""Measure the fused loss (kernels.fused_loss: liger-kernel's fused linear cross-entropy),
alone and with train.offload_activations, on one GPU through the real CLI, beside the
plan's prediction. Not yet run on a GPU.

Each run appends one JSON line to RESULTS/fused_loss.jsonl with its command, the plan's
predicted peak and breakdown, and the measured metrics (scripts/calibration_report.py
reads it).

    python scripts/prove_fused_loss.py --results $OUT/fused

Random-weight models (scripts/make_random_model.py) and generated full-length data,
built in --work like scripts/prove_distributed.py does.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from prove_distributed import Runner, build_inputs, summary, vramfit  # noqa: E402
from prove_preset import versions  # noqa: E402

# (arch, budget GiB, --set flags): a QLoRA and a LoRA run where the plain loss would dominate.
RUNS = [
    ("qwen2.5-7b", 16, ["method=qlora", "data.seq_len=8192", "lora.target_modules=[q_proj,k_proj,v_proj,o_proj]"]),
    ("qwen2.5-3b", 16, ["method=lora", "data.seq_len=4096", "lora.r=64", "lora.alpha=128", "lora.target_modules=all-linear"]),
    # With train.offload_activations too, on an 8 GB card: the shared README's hand-tuned
    # plain-HF route (liger + save_on_cpu) trained seq 8192 at 7.91 GiB here.
    ("qwen2.5-7b", 8, ["method=qlora", "data.seq_len=8192", "lora.r=8", "lora.alpha=16", "lora.target_modules=[q_proj,v_proj]",
                       "train.offload_activations=true"]),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--work", type=Path, default=Path("/tmp/vramfit-dist"))
    ap.add_argument("--results", type=Path, required=True)
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    a.results.mkdir(parents=True, exist_ok=True)
    r = Runner(a.results)
    inp = build_inputs(r, a.work, sorted({arch for arch, _, _ in RUNS}))
    import torch

    meta = {"gpu": torch.cuda.get_device_name(0), "versions": versions(), "date": time.strftime("%Y-%m-%d")}
    for arch, budget, sets in RUNS:
        run = a.work / f"fused-{arch}-{budget:g}"
        shutil.rmtree(run, ignore_errors=True)
        flags = [x for s in [*sets, "kernels.fused_loss=true", f"train.max_steps={a.steps}", "train.grad_accum=2",
                             "train.save_steps=1000", "train.logging_steps=1"] for x in ("--set", s)]  # fmt: skip
        cmd = vramfit("train", "--preset", "24gb", "--budget", f"{budget:g}", "--model", str(inp[arch]), "--data", str(inp["data"]),
                      "--out", str(run), *flags)  # fmt: skip
        rc, secs = r.run(cmd)
        row = {"case": "fused", "arch": arch, "command": shlex.join(["vramfit", *cmd[3:]]), "exit": rc, "seconds": secs,
               **summary(run), **meta}  # fmt: skip
        with (a.results / "fused_loss.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")
        m = row.get("metrics", {})
        print(json.dumps({"arch": arch, "exit": rc, "predicted": row.get("predicted_peak_gib"), "measured": m.get("peak_process_gib"),
                          "reserved": m.get("peak_reserved_gib"), "tok_s": m.get("steady_tokens_per_s")}), flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Prove a preset on a GPU: train it under its card's budget, merge, load the merge.

Runs the real CLI (`python -m vramfit train/merge`) on a random-weight model of a
real architecture and a generated dataset whose examples fill the sequence length
(so the measured peak is the real one), then writes one JSON result with the exact
commands, peak memory (allocator and NVML), tokens/s and the merge check.

    python scripts/prove_preset.py --preset 8gb --budget 8 --arch scripts/archs/qwen2.5-7b.json \\
        --steps 30 --work /tmp/vf --results $OUT

Aggregate results into docs/benchmarks/ with scripts/collect_preset_proofs.py.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def sh(argv: list[str], log: Path) -> tuple[int, float]:
    """Run a command, streaming its output to stdout and the log as it comes (a killed
    proof still leaves its log)."""
    t = time.perf_counter()
    with log.open("a") as f:
        f.write("$ " + shlex.join(argv) + "\n")
        print("$ " + shlex.join(argv), flush=True)
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        for line in p.stdout:
            f.write(line)
            f.flush()
            print(line, end="", flush=True)
        p.wait()
    return p.returncode, time.perf_counter() - t


def input_commands(arch: Path, work: Path, device: str = "cuda") -> tuple[Path, Path, list[list[str]]]:
    """The random-weight model and long dataset in ``work`` that every proof shares, and
    the commands that make them (the model one keeps an existing model; the data one is
    left out when the file exists)."""
    py = sys.executable
    model, data = work / arch.stem, work / "long.jsonl"
    cmds = [[py, str(ROOT / "scripts/make_random_model.py"), str(arch), str(model), "--device", device]]
    if not data.exists():
        # ~9k characters per example: byte-level tokens, so every example fills seq_len <= 8192.
        cmds.append([py, str(ROOT / "scripts/make_embedded_dataset.py"), "--n", "600", "--min-chars", "9000", "--out", str(data)])
    return model, data, cmds


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "datasets", "deepspeed"):
        try:
            mod = __import__(name)
            out[name] = getattr(mod, "__version__", "?")
        except Exception as e:  # record what is missing rather than fail the proof
            out[name] = f"unavailable ({type(e).__name__})"
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", required=True)
    ap.add_argument("--budget", type=float, required=True)
    ap.add_argument("--arch", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--work", type=Path, default=Path("/tmp/vramfit-proof"))
    ap.add_argument("--results", type=Path, required=True)
    ap.add_argument("--keep-merged", action="store_true")
    a = ap.parse_args()

    a.work.mkdir(parents=True, exist_ok=True)
    a.results.mkdir(parents=True, exist_ok=True)
    arch = a.arch.stem
    log = a.results / f"{a.preset}-{arch}.log"
    py = sys.executable
    model, data, cmds = input_commands(a.arch, a.work)
    for cmd in cmds:
        rc, _ = sh(cmd, log)
        if rc:
            return rc
    run = a.work / f"run-{a.preset}-{arch}"
    shutil.rmtree(run, ignore_errors=True)
    train_args = [
        "train", "--preset", a.preset, "--budget", f"{a.budget:g}", "--model", str(model), "--data", str(data),
        "--out", str(run), "--set", f"train.max_steps={a.steps}", "--set", f"train.save_steps={a.steps}",
    ]  # fmt: skip
    rc_train, t_train = sh([py, "-m", "vramfit", *train_args], log)
    result: dict = {
        "preset": a.preset,
        "arch": arch,
        "budget_gib": a.budget,
        "steps": a.steps,
        "train_command": "vramfit " + shlex.join(train_args),
        "train_exit": rc_train,
        "train_wall_s": round(t_train, 1),
        "versions": versions(),
        "date": time.strftime("%Y-%m-%d"),
    }
    if (run / "metrics.json").is_file():
        result["metrics"] = json.loads((run / "metrics.json").read_text())
    if rc_train == 0:
        merged = a.work / f"merged-{a.preset}-{arch}"
        merge_args = ["merge", str(run), "--out", str(merged), "--force"]
        rc_merge, t_merge = sh([py, "-m", "vramfit", *merge_args], log)
        result.update(merge_command="vramfit " + shlex.join(merge_args), merge_exit=rc_merge, merge_wall_s=round(t_merge, 1))
        if rc_merge == 0:
            import torch
            from transformers import AutoModelForCausalLM

            m = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.bfloat16, device_map={"": 0})
            with torch.no_grad():
                logits = m(torch.tensor([[5, 6, 7, 8]], device="cuda")).logits
            result["merged_loads"] = bool(torch.isfinite(logits).all())
            result["merged_files"] = sorted(p.name for p in merged.iterdir())
            del m
            if not a.keep_merged:
                shutil.rmtree(merged)  # 15 GB for a 7B: the disk is shared by every proof
    out = a.results / f"{a.preset}-{arch}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result.get(k) for k in ("preset", "train_exit", "merge_exit", "merged_loads")}))
    return 0 if rc_train == 0 and result.get("merge_exit") == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Prove preemption on a GPU: an uninterrupted reference run; a run sent SIGTERM mid-way
(must checkpoint and exit 75) then rerun with the same command; a run whose trainer is
SIGKILLed mid-way then rerun. Both reruns must resume and finish, and their final
adapters are compared with the reference's.

    python scripts/prove_preemption.py --preset 8gb --budget 8 --arch scripts/archs/qwen2.5-7b.json \\
        --steps 8 --kill-at 3 --work /tmp/vf --results $OUT/proofs

Reuses the model and data that scripts/prove_preset.py builds in --work.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from prove_distributed import kill_when_logged as kill_at_step  # noqa: E402
from prove_preset import input_commands  # noqa: E402  (the same model and data as the preset proofs)


def adapter_diff(a: Path, b: Path) -> dict:
    import torch
    from safetensors.torch import load_file

    x, y = load_file(str(a / "adapter" / "adapter_model.safetensors")), load_file(str(b / "adapter" / "adapter_model.safetensors"))
    if x.keys() != y.keys():
        return {"same_keys": False}
    num = sum(float(torch.sum((x[k].double() - y[k].double()) ** 2)) for k in x)
    den = sum(float(torch.sum(x[k].double() ** 2)) for k in x)
    return {
        "same_keys": True,
        "max_abs_diff": max(float((x[k] - y[k]).abs().max()) for k in x),
        "relative_l2": (num / den) ** 0.5 if den else None,
        "bit_identical": all(torch.equal(x[k], y[k]) for k in x),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", required=True)
    ap.add_argument("--budget", type=float, required=True)
    ap.add_argument("--arch", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--kill-at", type=int, default=3)
    ap.add_argument("--grad-accum", type=int, default=4, help="memory does not depend on it; time does")
    ap.add_argument("--device", default="cuda", help="where to build the model (cpu: a dry run of this script)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/vramfit-proof"))
    ap.add_argument("--results", type=Path, required=True)
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    a.results.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    model, data, cmds = input_commands(a.arch, a.work, a.device)
    for cmd in cmds:
        subprocess.run(cmd, check=True)
    name = f"{a.preset}-{a.arch.stem}"
    log = a.results / f"preempt-{name}.log"
    fh = log.open("w")

    def args_for(run: Path) -> list[str]:
        return [
            "train", "--preset", a.preset, "--budget", f"{a.budget:g}", "--model", str(model), "--data", str(data),
            "--out", str(run), "--set", f"train.max_steps={a.steps}", "--set", f"train.grad_accum={a.grad_accum}",
            "--set", "train.save_steps=2",
        ]  # fmt: skip

    def start(argv: list[str]) -> subprocess.Popen:
        fh.write("$ " + shlex.join(argv) + "\n")
        fh.flush()
        return subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT)

    def kill_when_logged(proc: subprocess.Popen, run: Path, sig: int) -> float | None:
        return kill_at_step(proc, run, a.kill_at, sig, timeout=400, poll=0.1)

    result: dict = {"kill_at": a.kill_at, "steps": a.steps, "save_steps": 2}
    runs = {k: a.work / f"preempt-{k}-{name}" for k in ("reference", "sigterm", "sigkill")}
    for r in runs.values():
        shutil.rmtree(r, ignore_errors=True)

    # 1. uninterrupted reference
    ref = start([py, "-m", "vramfit", *args_for(runs["reference"])])
    result["reference_exit"] = ref.wait()
    result["command"] = "vramfit " + shlex.join(args_for(runs["sigterm"]))

    # 2. SIGTERM to `vramfit train`, then the same command again
    p = start([py, "-m", "vramfit", *args_for(runs["sigterm"])])
    t = kill_when_logged(p, runs["sigterm"], signal.SIGTERM)
    result["sigterm_exit"] = p.wait()
    result["sigterm_stop_seconds"] = round(time.perf_counter() - t, 1) if t else None
    result["sigterm_checkpoints"] = sorted(c.name for c in (runs["sigterm"] / "checkpoints").glob("checkpoint-*"))
    result["sigterm_rerun_exit"] = start([py, "-m", "vramfit", *args_for(runs["sigterm"])]).wait()

    # 3. SIGKILL to the trainer itself (launch.sh exec's it), then the same command again
    result["sigkill_plan_exit"] = start([py, "-m", "vramfit", *args_for(runs["sigkill"]), "--dry-run"]).wait()
    p = start(["bash", str(runs["sigkill"] / "launch.sh")])
    kill_when_logged(p, runs["sigkill"], signal.SIGKILL)
    result["sigkill_exit"] = p.wait()
    result["sigkill_checkpoints"] = sorted(c.name for c in (runs["sigkill"] / "checkpoints").glob("checkpoint-*"))
    result["sigkill_rerun_exit"] = start([py, "-m", "vramfit", *args_for(runs["sigkill"])]).wait()
    fh.close()

    text = log.read_text()
    result["resumed_lines"] = [line for line in text.splitlines() if "resuming from" in line or "holds this same run" in line]
    for k in ("sigterm", "sigkill"):
        done = (runs[k] / "adapter" / "adapter_model.safetensors").is_file()
        result[f"{k}_finished"] = done
        if done and (runs["reference"] / "adapter").is_dir():
            result[f"{k}_vs_reference"] = adapter_diff(runs["reference"], runs[k])
    m = runs["reference"] / "metrics.json"
    if m.is_file():
        result["reference_metrics"] = json.loads(m.read_text())
    ok = (
        result["reference_exit"] == 0
        and result["sigterm_exit"] == 75
        and result["sigterm_rerun_exit"] == 0
        and result["sigkill_exit"] == -signal.SIGKILL
        and result["sigkill_rerun_exit"] == 0
        and result["sigterm_finished"]
        and result["sigkill_finished"]
    )
    result["ok"] = ok
    (a.results / f"preempt-{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "reference_metrics"}, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

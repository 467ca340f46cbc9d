#!/usr/bin/env python3
"""Prove preemption on a GPU: SIGTERM mid-run checkpoints and exits 75; rerunning the
same command resumes and finishes; the final adapter is saved.

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
    model, data = a.work / a.arch.stem, a.work / "long.jsonl"
    subprocess.run([py, str(ROOT / "scripts/make_random_model.py"), str(a.arch), str(model), "--device", a.device], check=True)
    if not data.exists():
        subprocess.run(
            [py, str(ROOT / "scripts/make_embedded_dataset.py"), "--n", "600", "--min-chars", "9000", "--out", str(data)],
            check=True,
        )
    run = a.work / f"preempt-{a.preset}-{a.arch.stem}"
    shutil.rmtree(run, ignore_errors=True)
    args = [
        "train", "--preset", a.preset, "--budget", f"{a.budget:g}", "--model", str(model), "--data", str(data),
        "--out", str(run), "--set", f"train.max_steps={a.steps}", "--set", f"train.grad_accum={a.grad_accum}",
        "--set", "train.save_steps=1000",
    ]  # fmt: skip
    log = a.results / f"preempt-{a.preset}-{a.arch.stem}.log"
    result: dict = {"command": "vramfit " + shlex.join(args), "kill_at": a.kill_at, "steps": a.steps}
    with log.open("w") as fh:
        fh.write("$ vramfit " + shlex.join(args) + "\n")
        fh.flush()
        proc = subprocess.Popen([py, "-m", "vramfit", *args], stdout=fh, stderr=subprocess.STDOUT)
        deadline = time.time() + 400
        while time.time() < deadline and proc.poll() is None:
            tl = run / "train.log"
            if tl.is_file() and f"step {a.kill_at}/" in tl.read_text():
                t_signal = time.perf_counter()
                proc.send_signal(signal.SIGTERM)
                break
            time.sleep(0.2)
        result["first_exit"] = proc.wait()
        result["stop_seconds_after_sigterm"] = round(time.perf_counter() - t_signal, 1) if "t_signal" in locals() else None
        result["checkpoints_after_kill"] = sorted(p.name for p in (run / "checkpoints").glob("checkpoint-*"))
        fh.write("$ (same command again)\n")
        fh.flush()
        again = subprocess.run([py, "-m", "vramfit", *args], stdout=fh, stderr=subprocess.STDOUT)
        result["second_exit"] = again.returncode
    text = log.read_text()
    result["resumed"] = "holds this same run: continuing it" in text and "resuming from" in text
    result["finished"] = f"step {a.steps}/{a.steps}" in text and (run / "adapter" / "adapter_model.safetensors").is_file()
    if (run / "metrics.json").is_file():
        result["metrics"] = json.loads((run / "metrics.json").read_text())
    ok = result["first_exit"] == 75 and result["second_exit"] == 0 and result["resumed"] and result["finished"]
    result["ok"] = ok
    (a.results / f"preempt-{a.preset}-{a.arch.stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "metrics"}, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

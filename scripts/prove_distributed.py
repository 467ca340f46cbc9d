#!/usr/bin/env python3
"""Prove the multi-GPU paths on a machine with two GPUs, through the real CLI.

Cases (``--case``, repeatable; each appends one JSON line to RESULTS/distributed.jsonl
with its commands, exit codes, per-rank measured peaks and the plan's prediction):

- ``zero2``: bf16 LoRA on the 7B with the multi-gpu preset (ZeRO-2) on 2 GPUs, and the
  same global batch on 1 GPU without DeepSpeed: both losses per step, tokens/s, speedup.
- ``scaling``: the same, longer, at micro-batch 8 and 1, ZeRO-2 against plain DDP; one
  line per run in RESULTS/scaling.jsonl (SCALING below).
- ``qlora3``: QLoRA on the 7B with ZeRO-3 on 2 GPUs, then ``vramfit merge``.
- ``full3``: full fine-tuning of the 3B with ZeRO-3 on 2 GPUs, SIGTERM to ``vramfit train``
  mid-run (through accelerate launch: must checkpoint on both ranks and exit 75), the same
  command again (must resume and finish), then the saved model loaded by transformers.
- ``offload``: the 8 GB seed guide's route on 1 GPU under a budget (3B, LoRA r64,
  sequence 4096, ZeRO-3 with parameters and optimizer in host RAM).

    python scripts/prove_distributed.py --case zero2 --case qlora3 --results $OUT/distributed

Random-weight models (scripts/make_random_model.py) and generated full-length data.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from prove_preset import versions  # noqa: E402

PY = sys.executable
STEP_LINE = re.compile(r"^step (\d+)/\d+ \| loss ([\d.]+)")


class Runner:
    def __init__(self, results: Path) -> None:
        self.log = (results / "distributed.log").open("a")

    def start(self, argv: list[str], env: dict | None = None) -> subprocess.Popen:
        self.log.write("$ " + shlex.join(argv) + "\n")
        self.log.flush()
        print("$ " + shlex.join(argv), flush=True)
        return subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def run(self, argv: list[str]) -> tuple[int, float]:
        t = time.perf_counter()
        rc = self.start(argv).wait()
        print(f"  -> exit {rc} in {time.perf_counter() - t:.0f} s", flush=True)
        return rc, round(time.perf_counter() - t, 1)


def vramfit(*args: str) -> list[str]:
    return [PY, "-m", "vramfit", *args]


def losses(run: Path) -> list[float]:
    out = []
    tl = run / "train.log"
    for line in tl.read_text().splitlines() if tl.is_file() else []:
        m = STEP_LINE.match(line)
        if m:
            out.append(float(m.group(2)))
    return out


def summary(run: Path) -> dict:
    """What a run directory says about itself: plan prediction and measured metrics."""
    out: dict = {"run": str(run)}
    try:
        import yaml

        plan = yaml.safe_load((run / "plan.yaml").read_text())
        out["predicted_peak_gib"] = plan.get("predicted_peak_gib")
        out["predicted_tokens_per_s"] = plan.get("predicted_tokens_per_s")
        out["breakdown_gib"] = plan.get("breakdown")
    except Exception as e:  # noqa: BLE001 - record, don't fail the proof
        out["plan_error"] = repr(e)
    m = run / "metrics.json"
    if m.is_file():
        out["metrics"] = json.loads(m.read_text())
    out["losses"] = losses(run)
    return out


def build_inputs(r: Runner, work: Path, archs: list[str]) -> dict[str, Path]:
    """Random-weight models, one GPU each in parallel, and a full-length dataset."""
    import torch

    procs, models, gpus = [], {}, max(torch.cuda.device_count(), 1)
    for i, arch in enumerate(archs):
        models[arch] = work / arch
        if (models[arch] / "config.json").is_file():
            continue
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(i % gpus)}
        procs.append(r.start([PY, str(ROOT / "scripts/make_random_model.py"), str(ROOT / f"scripts/archs/{arch}.json"),
                              str(models[arch]), "--device", "cuda"], env=env))  # fmt: skip
    data = work / "long.jsonl"
    if not data.is_file():
        # Byte-level tokens: ~5k characters fill any seq_len up to 4096.
        r.run([PY, str(ROOT / "scripts/make_embedded_dataset.py"), "--n", "600", "--min-chars", "5000", "--out", str(data)])
    for p in procs:
        if p.wait():
            raise SystemExit("building a model failed: see distributed.log")
    if procs:
        # A 7B's 15 GB just written sit in the page cache, dirty: flush them before any timed
        # run rather than let the kernel write them back during one. Suspected (not shown) of
        # the slow step in four of the first runs after a build (docs/benchmarks.md, session 14).
        os.sync()
    models["data"] = data
    return models


def kill_when_logged(
    proc: subprocess.Popen, run: Path, step: int, sig: int, timeout: float = 500, poll: float = 0.2
) -> float | None:
    """Send ``sig`` once RUN/train.log shows ``step``; the time it was sent, or None if
    the run ended (or ``timeout`` passed) first."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        tl = run / "train.log"
        if tl.is_file() and f"step {step}/" in tl.read_text():
            proc.send_signal(sig)
            return time.perf_counter()
        time.sleep(poll)
    return None


def case_zero2(r: Runner, inp: dict, work: Path, steps: int, only_one: bool = False) -> dict:
    common = ["--model", str(inp["qwen2.5-7b"]), "--data", str(inp["data"]), "--set", "data.seq_len=1024",
              "--set", f"train.max_steps={steps}", "--set", "train.save_steps=1000", "--set", "train.logging_steps=1"]  # fmt: skip
    runs = {"2gpu_zero2": work / "z2-2gpu", "1gpu": work / "z2-1gpu"}
    cmds = {
        "2gpu_zero2": vramfit("train", "--preset", "multi-gpu", "--gpus", "2", "--out", str(runs["2gpu_zero2"]), *common,
                              "--set", "train.grad_accum=8"),  # fmt: skip
        "1gpu": vramfit("train", "--preset", "multi-gpu", "--gpus", "1", "--out", str(runs["1gpu"]), *common,
                        "--set", "deepspeed.stage=0", "--set", "train.grad_accum=16"),  # fmt: skip
    }
    out: dict = {"case": "zero2", "global_batch": 16, "seq_len": 1024}
    for k, cmd in cmds.items():
        if only_one and k != "1gpu":
            continue  # the 2-GPU half came from an earlier call
        shutil.rmtree(runs[k], ignore_errors=True)
        rc, secs = r.run(cmd)
        out[k] = {"command": shlex.join(["vramfit", *cmd[3:]]), "exit": rc, "seconds": secs, **summary(runs[k])}
    if only_one:
        return out
    a, b = (out[k].get("metrics", {}).get("steady_tokens_per_s") for k in ("2gpu_zero2", "1gpu"))
    out["speedup"] = round(a / b, 3) if a and b else None
    la, lb = out["2gpu_zero2"]["losses"], out["1gpu"]["losses"]
    if la and lb:
        n = min(len(la), len(lb))
        out["loss_max_abs_diff"] = round(max(abs(x - y) for x, y in zip(la[:n], lb[:n])), 4)
    return out


# The 2-GPU throughput proof: the same global batch (32 sequences of 1024) on 1 GPU and
# on 2, with ZeRO-2 and with plain DDP (deepspeed.stage=0), at the micro-batch --preset
# auto picks on an H200 (8, no checkpointing) and at the multi-gpu preset's (1, with
# checkpointing; half the steps: 6 s each). The 1-GPU run goes first and again after the
# 2-GPU ones: the two bound the drift.
SCALING = [
    # name, gpus, deepspeed.stage, micro_batch, grad_accum, grad_ckpt
    ("mb8-1gpu", 1, 0, 8, 4, False),
    ("mb8-2gpu-zero2", 2, 2, 8, 2, False),
    ("mb8-2gpu-ddp", 2, 0, 8, 2, False),
    ("mb8-1gpu-again", 1, 0, 8, 4, False),
    ("mb1-2gpu-ddp", 2, 0, 1, 16, True),
    ("mb1-2gpu-zero2", 2, 2, 1, 16, True),
]


def case_scaling(r: Runner, inp: dict, work: Path, steps: int, results: Path, meta: dict) -> dict:
    out: dict = {"case": "scaling", "global_batch": 32, "seq_len": 1024}
    for name, gpus, stage, mb, ga, ckpt in SCALING:
        run = work / f"scale-{name}"
        shutil.rmtree(run, ignore_errors=True)
        cmd = vramfit("train", "--preset", "multi-gpu", "--gpus", str(gpus), "--out", str(run), "--model", str(inp["qwen2.5-7b"]),
                      "--data", str(inp["data"]), "--set", "data.seq_len=1024", "--set", f"deepspeed.stage={stage}",
                      "--set", f"train.micro_batch={mb}", "--set", f"train.grad_accum={ga}",
                      "--set", f"train.grad_ckpt={str(ckpt).lower()}", "--set", f"train.max_steps={steps if mb > 1 else steps // 2}",
                      "--set", "train.save_steps=1000", "--set", "train.logging_steps=1")  # fmt: skip
        rc, secs = r.run(cmd)
        res = {"case": "scaling", "name": name, "gpus": gpus, "stage": stage, "micro_batch": mb, "grad_accum": ga,
               "grad_ckpt": ckpt, "command": shlex.join(["vramfit", *cmd[3:]]), "exit": rc, "seconds": secs,
               **summary(run), **meta}  # fmt: skip
        with (results / "scaling.jsonl").open("a") as f:  # one line per run: a timeout keeps the finished ones
            f.write(json.dumps(res) + "\n")
        out[name] = res.get("metrics", {}).get("steady_tokens_per_s")
        print(json.dumps({"name": name, "exit": rc, "tok_s": out[name]}), flush=True)
    return out


def case_qlora3(r: Runner, inp: dict, work: Path, steps: int, merge: bool = True) -> dict:
    run = work / "q3-2gpu"
    shutil.rmtree(run, ignore_errors=True)
    cmd = vramfit("train", "--preset", "multi-gpu", "--gpus", "2", "--model", str(inp["qwen2.5-7b"]), "--data", str(inp["data"]),
                  "--out", str(run), "--set", "method=qlora", "--set", "deepspeed.stage=3", "--set", "data.seq_len=1024",
                  "--set", "train.grad_accum=4", "--set", f"train.max_steps={steps}", "--set", "train.save_steps=1000",
                  "--set", "train.logging_steps=1")  # fmt: skip
    out: dict = {"case": "qlora3"}
    rc, secs = r.run(cmd)
    out["train"] = {"command": shlex.join(["vramfit", *cmd[3:]]), "exit": rc, "seconds": secs, **summary(run)}
    if rc == 0 and merge:
        merge = vramfit("merge", str(run))
        rc, secs = r.run(merge)
        out["merge"] = {"command": shlex.join(["vramfit", *merge[3:]]), "exit": rc, "seconds": secs,
                        "merged_files": sorted(p.name for p in (run / "merged").glob("*"))}  # fmt: skip
        shutil.rmtree(run / "merged", ignore_errors=True)  # 15 GB the next cases need
    return out


def case_full3(r: Runner, inp: dict, work: Path, steps: int, kill_at: int) -> dict:
    run = work / "f3-2gpu"
    shutil.rmtree(run, ignore_errors=True)
    cmd = vramfit("train", "--preset", "multi-gpu", "--gpus", "2", "--model", str(inp["qwen2.5-3b"]), "--data", str(inp["data"]),
                  "--out", str(run), "--set", "method=full", "--set", "deepspeed.stage=3", "--set", "data.seq_len=1024",
                  "--set", "train.lr=1e-5", "--set", "train.grad_accum=4", "--set", f"train.max_steps={steps}",
                  "--set", "train.save_steps=1000", "--set", "train.logging_steps=1")  # fmt: skip
    out: dict = {"case": "full3", "command": shlex.join(["vramfit", *cmd[3:]]), "kill_at": kill_at}
    t0 = time.perf_counter()
    p = r.start(cmd)
    t = kill_when_logged(p, run, kill_at, signal.SIGTERM)
    out["sigterm_exit"] = p.wait()
    out["sigterm_to_exit_s"] = round(time.perf_counter() - t, 1) if t else None
    out["first_run_s"] = round(time.perf_counter() - t0, 1)
    out["checkpoints"] = sorted(c.name for c in (run / "checkpoints").glob("checkpoint-*"))
    out["checkpoint_files"] = sorted(
        str(f.relative_to(run / "checkpoints")) for f in (run / "checkpoints").rglob("*") if f.is_file()
    )[:60]
    out["preempted_json"] = (run / "preempted.json").read_text() if (run / "preempted.json").is_file() else None
    out["losses_before"] = losses(run)
    rc, secs = r.run(cmd)
    out["rerun_exit"], out["rerun_s"] = rc, secs
    text = (run / "train.log").read_text() if (run / "train.log").is_file() else ""
    out["resumed_lines"] = [x for x in text.splitlines() if "resuming from" in x]
    out.update(summary(run))
    # The saved model as a user loads it: whole (not ZeRO shards), every weight there.
    probe = (
        "import json,sys,torch;from transformers import AutoModelForCausalLM as M;"
        f"m=M.from_pretrained({str(run / 'model')!r},dtype=torch.bfloat16);"
        "n=sum(p.numel() for p in m.parameters());x=torch.tensor([[1,2,3,4]]);"
        "l=m(input_ids=x).logits;print(json.dumps({'params':n,'logits_finite':bool(torch.isfinite(l).all())}))"
    )
    res = subprocess.run([PY, "-c", probe], capture_output=True, text=True)
    r.log.write(res.stdout + res.stderr)
    out["load_check"] = json.loads(res.stdout.strip().splitlines()[-1]) if res.returncode == 0 else {"error": res.stderr[-500:]}
    merge = vramfit("merge", str(run))
    rc, _ = r.run(merge)
    out["merge_exit"] = rc  # a full run has no adapter: merge says the model is already whole (exit 2)
    shutil.rmtree(run / "checkpoints", ignore_errors=True)
    return out


def case_offload(r: Runner, inp: dict, work: Path, steps: int, budget: float) -> dict:
    run = work / "offload-1gpu"
    shutil.rmtree(run, ignore_errors=True)
    cmd = vramfit("train", "--preset", "zero3-offload", "--gpus", "1", "--budget", f"{budget:g}", "--model", str(inp["qwen2.5-3b"]),
                  "--data", str(inp["data"]), "--out", str(run), "--set", f"train.max_steps={steps}",
                  "--set", "train.grad_accum=4", "--set", "train.save_steps=1000", "--set", "train.logging_steps=1")  # fmt: skip
    rc, secs = r.run(cmd)
    return {"case": "offload", "command": shlex.join(["vramfit", *cmd[3:]]), "exit": rc, "seconds": secs, **summary(run)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", action="append", required=True, choices=["zero2", "zero2-1gpu", "scaling", "qlora3", "full3", "offload"])
    ap.add_argument("--no-merge", action="store_true", help="qlora3: skip the merge")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--kill-at", type=int, default=3)
    ap.add_argument("--budget", type=float, default=8)
    ap.add_argument("--work", type=Path, default=Path("/tmp/vramfit-dist"))
    ap.add_argument("--results", type=Path, required=True)
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    a.results.mkdir(parents=True, exist_ok=True)
    r = Runner(a.results)
    which = {"scaling": "qwen2.5-7b", "zero2": "qwen2.5-7b", "zero2-1gpu": "qwen2.5-7b", "qlora3": "qwen2.5-7b", "full3": "qwen2.5-3b", "offload": "qwen2.5-3b"}
    archs = sorted({which[c] for c in a.case})
    inp = build_inputs(r, a.work, archs)
    import torch

    meta = {"gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())], "versions": versions(),
            "date": time.strftime("%Y-%m-%d")}  # fmt: skip
    ok = True
    for c in a.case:
        t = time.perf_counter()
        if c == "scaling":
            res = case_scaling(r, inp, a.work, a.steps, a.results, meta)
        elif c in ("zero2", "zero2-1gpu"):
            res = case_zero2(r, inp, a.work, a.steps, only_one=c == "zero2-1gpu")
        elif c == "qlora3":
            res = case_qlora3(r, inp, a.work, min(a.steps, 6), merge=not a.no_merge)
        elif c == "full3":
            res = case_full3(r, inp, a.work, a.steps, a.kill_at)
        else:
            res = case_offload(r, inp, a.work, min(a.steps, 6), a.budget)
        res.update(meta, wall_s=round(time.perf_counter() - t, 1))
        with (a.results / "distributed.jsonl").open("a") as f:
            f.write(json.dumps(res) + "\n")
        print(json.dumps({k: v for k, v in res.items() if k not in ("versions",)}, default=str)[:3000], flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

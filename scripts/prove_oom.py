#!/usr/bin/env python3
"""Prove OOM recovery on a real CUDA out-of-memory, on one GPU, through the real CLI.

The scenario: a user plans and starts a run that fits the whole card, and another process
(a second job, a notebook) then takes memory on the same GPU. ``vramfit train`` must meet
the out-of-memory, halve the micro-batch (16 x 1 -> 8 x 2, the same effective batch),
resume from the last checkpoint and finish, exit 0.

Design, and why. A process that takes memory while the trainer is mid-run cannot make it
run out: after the first step the trainer's caching allocator keeps its peak reserved,
and every later step (same shapes: each example fills seq_len) reuses it without asking
the driver for more. The newcomer only gets what is left (if anything fails then, it is
the newcomer). The trainer meets the other process's memory the next time it asks the
driver for memory: when it starts again. So:

1. ``vramfit train`` (random-weight Qwen2.5-0.5B, LoRA, seq 1024, micro-batch 16 x 1,
   no checkpointing, no --budget: planned against the whole card), stopped with SIGTERM
   once step STOP_AT is logged, after checkpoint-2 (save_steps 2): the trainer saves a
   checkpoint where it stopped and exits 75, as on a preemption or a Ctrl-C.
2. A ballast process (this script, --ballast) allocates one tensor so that the GPU's free
   memory, after its own CUDA context, is what micro-batch 8 needs and micro-batch 16 does
   not, by the plan's breakdown in RUN/plan.yaml (BALLAST_FRACTION), and holds it.
3. The same command again: vramfit plans against the card's total (it fits; a note says
   less is free now), resumes from the last checkpoint at micro-batch 16, and the first
   step runs out of memory for real. vramfit then halves the micro-batch and resumes from
   the same checkpoint to the last step.

Not chosen: the ballast before the first start (the OOM would come in step 1, with no
checkpoint to resume from, so the resume half of the recovery would go untested); a
ballast mid-run (no OOM, for the reason above).

One JSON line goes to RESULTS/oom.jsonl: the command, both exits, seconds, the planned peak
and breakdown, the ballast's numbers (RESULTS/oom-ballast.json), the OOM event(s) from
events.jsonl (with torch's whole message: free memory and the processes holding it),
the final micro-batch and accumulation, per-step losses, metrics.json, GPU and versions;
then one verdict line. Exit 1 when there was no real OOM or the run did not finish.
Needs a GPU of about 64 GiB or more (micro-batch 16 is predicted at 60.7 GiB).

    python scripts/prove_oom.py --results $OUT/oom          # expected under 4 minutes on an H100 (not yet run)
    python scripts/prove_oom.py --dry-run                    # no GPU: commands and arithmetic
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
from prove_distributed import PY, Runner, build_inputs, kill_when_logged, summary, vramfit  # noqa: E402
from prove_preset import versions  # noqa: E402

GIB = 1 << 30
ARCH = "qwen2.5-0.5b"
PRESET = "24gb"
MICRO_BATCH = 16
SAVE_STEPS = 2
STEP_LINE = re.compile(r"^step (\d+)/\d+ \| loss ([\d.]+)")
# Parts of the peak that do not grow with the micro-batch.
FIXED = ("weights", "adapters", "optimizer", "cuda_context")
# The ballast leaves free FIXED + this share of the rest of micro-batch 16's predicted peak.
# The rest (activations, logits, allocator slack) is 0.513 of itself at micro-batch 8 (the
# slack does not quite halve), so 0.55 leaves micro-batch 8 about 2 GiB to spare while
# micro-batch 16 is 26 GiB short: no OOM would take a 45% over-prediction at 16, a second
# one (which recovery handles at 4) a 7% under-prediction at 8. Calibration: worst
# under-prediction 4.9%, and this config (at micro-batch 4) was over-predicted by 4%.
BALLAST_FRACTION = 0.55
FAULT_ENV = "VRAMFIT_FAULT_OOM_ABOVE_MICRO_BATCH"  # the tests' injected OOM: never here


def train_sets(steps: int, micro_batch: int = MICRO_BATCH) -> list[str]:
    return ["method=lora", "data.seq_len=1024", f"train.micro_batch={micro_batch}", "train.grad_accum=1",
            "train.grad_ckpt=false", f"train.max_steps={steps}", f"train.save_steps={SAVE_STEPS}", "train.logging_steps=1"]  # fmt: skip


def train_args(model: Path, data: Path, run: Path, steps: int) -> list[str]:
    """`vramfit train` at micro-batch 16, no --budget: planned against the whole card."""
    return ["train", "--preset", PRESET, "--model", str(model), "--data", str(data), "--out", str(run),
            *[x for s in train_sets(steps) for x in ("--set", s)]]  # fmt: skip


def free_target_gib(breakdown: dict[str, float], fraction: float = BALLAST_FRACTION) -> float:
    """GiB to leave free on the GPU for a plan's breakdown (plan.yaml's, in GiB)."""
    fixed = sum(breakdown.get(k, 0.0) for k in FIXED)
    return fixed + fraction * (sum(breakdown.values()) - fixed)


def ballast_bytes(free_bytes: int, target_gib: float) -> int:
    """Bytes the ballast takes so that ``target_gib`` stays free."""
    n = free_bytes - int(target_gib * GIB)
    if n <= 0:
        raise ValueError(f"{free_bytes / GIB:.2f} GiB free, not more than the {target_gib:.2f} GiB to leave: the GPU is too small")
    return n


def predicted_breakdown(micro_batch: int, steps: int = 12) -> dict[str, float]:
    """The memory model's breakdown for this proof's plan on a GPU in bf16 (what `vramfit plan`
    computes there), without a GPU or the model's weights."""
    from vramfit.memory import estimate
    from vramfit.model_shape import shape_from_config
    from vramfit.presets import resolve_layers

    shape = shape_from_config(json.loads((ROOT / f"scripts/archs/{ARCH}.json").read_text()))
    config = resolve_layers(PRESET, None, {}, train_sets(steps, micro_batch)).config
    # long.jsonl: every example is longer than the sequence, so no micro-batch is padded.
    return estimate(shape, config, "bfloat16", "cuda", shortest=config.data.seq_len).gib()


def hold_ballast(target_gib: float, out: Path) -> int:
    """The other process: leave ``target_gib`` free on the GPU and hold the rest until killed."""
    import torch

    torch.zeros(1, device="cuda")  # its own context first: what is free after it is the trainer's
    free, total = torch.cuda.mem_get_info()
    for _ in range(40):  # the stopped trainer's memory returns as its process ends: let it settle
        time.sleep(0.25)
        now = torch.cuda.mem_get_info()[0]
        settled, free = abs(now - free) < 64 << 20, now
        if settled:
            break
    report: dict = {"pid": os.getpid(), "gpu": torch.cuda.get_device_name(), "total_gib": round(total / GIB, 3),
                    "free_before_gib": round(free / GIB, 3), "target_free_gib": round(target_gib, 3)}  # fmt: skip
    try:
        ballast = torch.empty(ballast_bytes(free, target_gib), dtype=torch.uint8, device="cuda")  # committed at once
        report.update(ballast_gib=round(ballast.numel() / GIB, 3), free_after_gib=round(torch.cuda.mem_get_info()[0] / GIB, 3))
    except (ValueError, torch.OutOfMemoryError) as e:
        report["error"] = str(e)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(report) + "\n")
    os.replace(tmp, out)  # the proof reads it whole or not at all
    if "error" in report:
        return 1
    while True:
        time.sleep(3600)


def wait_for_report(path: Path, proc: subprocess.Popen, timeout: float = 120) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline and not path.is_file() and proc.poll() is None:
        time.sleep(0.2)
    return json.loads(path.read_text()) if path.is_file() else {"error": f"no report (ballast exit {proc.poll()})"}


def dry_run(steps: int, stop_at: int, work: Path) -> int:
    b16, b8 = predicted_breakdown(MICRO_BATCH, steps), predicted_breakdown(MICRO_BATCH // 2, steps)
    p16, p8 = sum(b16.values()), sum(b8.values())
    target = free_target_gib(b16)
    fixed = sum(b16[k] for k in FIXED)
    cmd = shlex.join(["vramfit", *train_args(work / ARCH, work / "long.jsonl", work / "oom-run", steps)])
    print(f"1. $ {cmd}\n   SIGTERM once train.log shows step {stop_at}: checkpoint, exit 75")
    print(f"2. $ python scripts/prove_oom.py --ballast {target:.4f} RESULTS/oom-ballast.json   (held until the end)")
    print(f"3. $ {cmd}\n   expected: OOM at micro-batch 16, then 8 x 2 from the last checkpoint to step {steps}, exit 0")
    print("predicted at micro-batch 16 (GiB): " + ", ".join(f"{k} {v:.2f}" for k, v in b16.items()) + f"; peak {p16:.2f}")
    print(f"ballast leaves {target:.2f} GiB free = {fixed:.2f} ({' + '.join(FIXED)}) + {BALLAST_FRACTION} x {p16 - fixed:.2f} (the rest)")
    print(f"  micro-batch 16 needs {p16:.2f} ({p16 - target:.2f} short); micro-batch 8 needs {p8:.2f} ({target - p8:.2f} to spare)")
    print(f"  on an 80 GB H100 (79.2 GiB, ~0.5 of it the ballast's context) the ballast takes about {79.2 - 0.5 - target:.1f} GiB")
    return 0 if p8 < target < p16 else 1


class OomRunner(Runner):
    def __init__(self, results: Path) -> None:
        self.log = (results / "oom.log").open("a")


def judge(out: dict, steps: int) -> tuple[bool, str]:
    """(passed, one verdict line) for a proof's record."""
    b = out.get("ballast") or {"error": "not started"}
    done = (out.get("final", {}).get("metrics") or {}).get("steps")
    events = out.get("oom_events") or []
    first = events[0] if events else {}
    real = bool(first) and "injected" not in (first.get("message") or "") and "Tried to allocate" in (first.get("detail") or "")
    fails = [why for why, bad in (
        (f"first run exit {out.get('first_exit')}, not 75", out.get("first_exit") != 75),
        (f"ballast: {b.get('error')}", "error" in b),
        ("no real CUDA OOM event", not real),
        (f"first OOM at micro-batch {first.get('micro_batch')}, not [16, 8]", real and first.get("micro_batch") != [MICRO_BATCH, MICRO_BATCH // 2]),
        (f"first OOM at step {first.get('step')}, before a checkpoint", real and (first.get("step") or 0) < SAVE_STEPS),
        (f"rerun exit {out.get('exit')}", out.get("exit") != 0),
        (f"finished {done} of {steps} steps", done != steps),
    ) if bad]  # fmt: skip
    if fails:
        return False, "FAIL: " + "; ".join(fails)
    return True, (
        f"PASS: real CUDA OOM at step {first['step']}, micro-batch {MICRO_BATCH}, with {b.get('free_after_gib')} GiB free "
        f"(another process held {b.get('ballast_gib')} GiB; planned peak {out['planned']['predicted_peak_gib']} GiB); "
        f"{len(events)} OOM event(s); finished {done}/{steps} steps at micro-batch {out['final_micro_batch']} x "
        f"{out['final_grad_accum']}, exit 0 (rerun {out.get('seconds')} s)"
    )


def prove(steps: int, stop_at: int, work: Path, results: Path) -> int:
    import yaml

    from vramfit.oom import oom_events

    os.environ.pop(FAULT_ENV, None)
    work.mkdir(parents=True, exist_ok=True)
    results.mkdir(parents=True, exist_ok=True)
    r = OomRunner(results)
    log_start = r.log.tell()
    t0 = time.perf_counter()
    inp = build_inputs(r, work, [ARCH])
    run = work / "oom-run"
    shutil.rmtree(run, ignore_errors=True)
    cmd = vramfit(*train_args(inp[ARCH], inp["data"], run, steps))
    out: dict = {"case": "oom", "command": shlex.join(["vramfit", *cmd[3:]]), "stop_at": stop_at, "fraction": BALLAST_FRACTION}

    # 1. Start the run; stop it (checkpoint, exit 75) once it is under way.
    p = r.start(cmd)
    if kill_when_logged(p, run, stop_at, signal.SIGTERM, timeout=300) is None and p.poll() is None:
        p.send_signal(signal.SIGTERM)  # never reached the step: stop it, the verdict says so
    out["first_exit"] = p.wait()
    out["checkpoints_at_stop"] = sorted(c.name for c in (run / "checkpoints").glob("checkpoint-*"))
    plan = yaml.safe_load((run / "plan.yaml").read_text()) if (run / "plan.yaml").is_file() else {}
    out["planned"] = {k: plan.get(k) for k in ("predicted_peak_gib", "breakdown", "budget_gib", "budget_source")}
    if out["first_exit"] == 75 and plan:
        # 2. The other process takes memory; 3. the same command again.
        target = out["free_target_gib"] = round(free_target_gib(plan["breakdown"]), 4)
        report = results / "oom-ballast.json"
        report.unlink(missing_ok=True)
        ballast = r.start([PY, str(Path(__file__).resolve()), "--ballast", str(target), str(report)])
        try:
            out["ballast"] = wait_for_report(report, ballast)
            if "error" not in out["ballast"]:
                out["exit"], out["seconds"] = r.run(cmd)
        finally:
            ballast.kill()
            ballast.wait()

    events = oom_events(run)
    train = yaml.safe_load((run / "plan.yaml").read_text())["config"]["train"] if (run / "plan.yaml").is_file() else {}
    tl = (run / "train.log").read_text() if (run / "train.log").is_file() else ""
    r.log.flush()
    text = (results / "oom.log").read_text()[log_start:]
    keys = ("oom:", "out of memory", "note: only", "holds this same run", "resuming from", "error:")
    out.update(
        oom_events=events,
        oom_json_left=(run / "oom.json").is_file(),  # adjust_after_oom reads it into the event and deletes it
        final_micro_batch=train.get("micro_batch"),
        final_grad_accum=train.get("grad_accum"),
        steps_logged=[[int(m.group(1)), float(m.group(2))] for m in map(STEP_LINE.match, tl.splitlines()) if m],
        log_lines=[x.strip() for x in text.splitlines() if any(k in x for k in keys)],
        final=summary(run),
        wall_s=round(time.perf_counter() - t0, 1),
    )
    # The GPU's name from the ballast: this process never opens a CUDA context of its own,
    # which would take memory from the runs (versions() only imports, after the ballast is gone).
    out.update(gpu=(out.get("ballast") or {}).get("gpu"), versions=versions(), date=time.strftime("%Y-%m-%d"))

    out["ok"], out["verdict"] = judge(out, steps)
    with (results / "oom.jsonl").open("a") as f:
        f.write(json.dumps(out) + "\n")
    print(out["verdict"], flush=True)
    return 0 if out["ok"] else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--stop-at", type=int, default=3, help="SIGTERM the first run once this step is logged (after checkpoint-2)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/vramfit-dist"))
    ap.add_argument("--results", type=Path)
    ap.add_argument("--dry-run", action="store_true", help="print the commands and the ballast arithmetic (no GPU)")
    ap.add_argument("--ballast", nargs=2, metavar=("TARGET_GIB", "REPORT"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.ballast:
        return hold_ballast(float(a.ballast[0]), Path(a.ballast[1]))
    if a.dry_run:
        return dry_run(a.steps, a.stop_at, a.work)
    if a.results is None:
        ap.error("--results is required (or --dry-run)")
    return prove(a.steps, a.stop_at, a.work, a.results)


if __name__ == "__main__":
    sys.exit(main())

"""OOM recovery and --probe, end to end on CPU (an OOM is injected: no GPU here)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import subprocess_env, vramfit_exe

ARGS = ["train", "--set", "train.max_steps=6", "--set", "train.save_steps=2", "--set", "train.logging_steps=1"]


def run(cwd: Path, *extra: str, fault: str | None = None) -> subprocess.CompletedProcess:
    env = subprocess_env()
    if fault is not None:
        env["VRAMFIT_FAULT_OOM_ABOVE_MICRO_BATCH"] = fault
    return subprocess.run([vramfit_exe(), *ARGS, *extra], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def cpu_only():
    from vramfit.hardware import detect

    if detect().has_gpu:
        pytest.skip("the CPU preset path (no NVIDIA GPU) is what these runs exercise")


def test_oom_halves_micro_batch_keeps_effective_batch_and_finishes(tmp_path, cpu_only):
    r = run(tmp_path, "--out", "r", fault="2")  # the cpu preset's micro-batch 8 "does not fit" above 2
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("resuming from the last checkpoint") == 2
    assert "micro-batch 4 x accumulation 2" in r.stderr and "micro-batch 2 x accumulation 4" in r.stderr
    run_dir = tmp_path / "r"
    events = [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines()]
    assert [e["micro_batch"] for e in events] == [[8, 4], [4, 2]]
    assert events[0]["detail"] == "CUDA out of memory (injected). Tried to allocate 1.00 GiB"  # torch's whole message
    train = yaml.safe_load((run_dir / "plan.yaml").read_text())["config"]["train"]
    assert (train["micro_batch"], train["grad_accum"]) == (2, 4)  # effective batch 8 kept
    args = json.loads((run_dir / "training_args.json").read_text())
    assert (args["per_device_train_batch_size"], args["gradient_accumulation_steps"]) == (2, 4)
    assert json.loads((run_dir / "metrics.json").read_text())["steps"] == 6
    assert not (run_dir / "oom.json").exists()
    # The same command again is the same run (the recovered batch split included): nothing to train.
    again = run(tmp_path, "--out", "r")
    assert again.returncode == 0, again.stderr
    assert "holds this same run" in again.stdout


def test_oom_gives_up_at_micro_batch_1_with_one_line(tmp_path, cpu_only):
    r = run(tmp_path, "--out", "r", fault="0")
    assert r.returncode == 4, r.stderr
    err = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert err and "CUDA out of memory at micro-batch 1" in err[-1] and "hint:" in err[-1]
    assert "Traceback" not in r.stderr
    assert len((tmp_path / "r" / "events.jsonl").read_text().splitlines()) == 3


def test_probe_trains_a_few_steps_and_keeps_nothing(tmp_path, cpu_only):
    r = run(tmp_path, "--out", "r", "--probe", "--probe-steps", "2")
    assert r.returncode == 0, r.stderr
    assert "probe: 2 steps on the longest examples" in r.stdout and "probe passed" in r.stdout
    assert not (tmp_path / "r").exists()
    assert not list(tmp_path.glob(".vramfit-probe-*"))


def test_oom_cause_tells_an_under_prediction_from_memory_taken_by_another_process():
    from vramfit.oom import oom_cause

    assert oom_cause(None, 5.0) == (None, "") and oom_cause(5.0, None) == (None, "")
    cause, words = oom_cause(10.0, 11.5)
    assert cause == "under_prediction" and "needed at least 11.50 GiB" in words and "15% under" in words
    # The GPU proof (docs/benchmarks/oom.md): 42.66 GiB held against 60.66 planned.
    cause, words = oom_cause(60.657, 42.657)
    assert cause == "less_memory_than_planned" and "another process" in words and "60.66 GiB planned" in words

"""Preemption on CPU: SIGTERM checkpoints and exits 75; rerunning the command resumes to
the same final adapter as an uninterrupted run; one trainer per run directory."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import subprocess_env, vramfit_exe

pytestmark = pytest.mark.slow

STEPS = 24
# save_steps beyond the run: the only mid-run checkpoint is the one preemption writes.
ARGS = ["train", "--set", f"train.max_steps={STEPS}", "--set", "train.save_steps=1000", "--set", "train.logging_steps=1"]


@pytest.fixture(scope="module", autouse=True)
def cpu_only():
    from vramfit.hardware import detect

    if detect().has_gpu:
        pytest.skip("these runs expect the CPU path (no NVIDIA GPU)")


def run(cwd: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [vramfit_exe(), *ARGS, *extra], cwd=cwd, env=subprocess_env(), capture_output=True, text=True, timeout=300
    )


def adapter(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def _wait_for(cond, proc, timeout=240, poll=0.002) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if cond():
            return True
        time.sleep(poll)
    return False


def _logged(log: Path, step: int):
    return lambda: log.is_file() and f"step {step}/" in log.read_text()


def _staging(ckpt: Path) -> Path:
    """Where the trainer writes `ckpt` before renaming it into place."""
    return ckpt.parent / f".tmp-{ckpt.name}"


def _saving(ckpt: Path):
    """True while the trainer is writing `ckpt`: its staging directory exists."""
    return lambda: _staging(ckpt).is_dir()


def _checkpoints(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "checkpoints").glob("checkpoint-*"), key=lambda c: int(c.name.split("-")[1]))


def _staged(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").glob(".tmp-*"))


def interrupt(cwd: Path, out: str, sig: int, when, extra=(), direct: bool = False) -> tuple[subprocess.CompletedProcess, bool]:
    """Start the run (the CLI, or launch.sh directly), send `sig` once `when(run_dir)` holds."""
    run_dir = cwd / out
    if direct:
        argv = ["bash", str(run_dir / "launch.sh")]  # exec's the trainer: the pid is the trainer's
    else:
        argv = [vramfit_exe(), *ARGS, *extra, "--out", out]
    proc = subprocess.Popen(argv, cwd=cwd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    hit = _wait_for(when(run_dir), proc)
    if hit:
        proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=240)
    return subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr), hit


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("uninterrupted")
    p = run(cwd, "--out", "ref")
    assert p.returncode == 0, p.stdout + p.stderr
    return adapter(cwd / "ref")


def assert_same_adapter(run_dir: Path, reference: dict) -> None:
    import torch

    resumed = adapter(run_dir)
    assert resumed.keys() == reference.keys()
    # Resume restores weights, Adam state, scheduler, RNG and data position, so on
    # the same machine the arithmetic is the same; allow fp32 reduction-order noise.
    for k in reference:
        torch.testing.assert_close(resumed[k], reference[k], rtol=1e-4, atol=1e-6)


# Ten points: early, mid and late steps, and three while a checkpoint is being written.
SIGTERM_POINTS = [("step", n) for n in (1, 3, 6, 9, 13, 17, 22)] + [("saving", n) for n in (4, 12, 20)]


@pytest.mark.parametrize("kind,n", SIGTERM_POINTS, ids=[f"{k}-{n}" for k, n in SIGTERM_POINTS])
def test_sigterm_checkpoints_and_rerun_resumes_to_same_adapter(tmp_path, reference, kind, n):
    extra = ["--set", "train.save_steps=4"] if kind == "saving" else []
    for _attempt in range(3):  # a save can finish between two polls: try again from scratch
        shutil.rmtree(tmp_path / "run", ignore_errors=True)
        if kind == "step":
            when = lambda d: _logged(d / "train.log", n)  # noqa: E731
        else:
            when = lambda d: _saving(d / "checkpoints" / f"checkpoint-{n}")  # noqa: E731
        p, hit = interrupt(tmp_path, "run", signal.SIGTERM, when, extra)
        if hit:
            break
    assert hit, "never caught the run at the chosen point"
    assert p.returncode == 75, p.stdout + p.stderr
    assert "Traceback" not in p.stderr
    assert "rerun the same command" in p.stderr
    ckpts = _checkpoints(tmp_path / "run")
    stopped = int(ckpts[-1].name.split("-")[1])
    assert n <= stopped < STEPS
    assert all((c / "trainer_state.json").is_file() for c in ckpts)  # a signal never leaves a partial one
    assert _staged(tmp_path / "run") == []  # the save in progress was finished and renamed
    assert not (tmp_path / "run" / "adapter").exists()  # no final adapter from a stopped run

    again = run(tmp_path, *extra, "--out", "run")  # the same command, as a cloud script would rerun it
    assert again.returncode == 0, again.stdout + again.stderr
    assert "holds this same run: continuing it" in again.stdout
    assert f"resuming from {ckpts[-1]}" in again.stdout
    assert f"step {STEPS}/{STEPS}" in again.stdout
    assert_same_adapter(tmp_path / "run", reference)


# SIGKILL gives no chance to save: resume must use the last COMPLETE checkpoint.
SIGKILL_POINTS = ["before-first-checkpoint", "after-checkpoint-4", "saving-8", "step-14", "final-step"]


@pytest.mark.parametrize("point", SIGKILL_POINTS)
def test_sigkill_resumes_from_last_complete_checkpoint(tmp_path, reference, point):
    extra = ["--set", "train.save_steps=4"]
    if point == "saving-8":
        # Keep one checkpoint only: rotation must not delete checkpoint-4 before -8 is complete.
        extra += ["--set", "train.save_total_limit=1"]
    conds = {
        "before-first-checkpoint": (lambda d: _logged(d / "train.log", 2), 0),
        "after-checkpoint-4": (lambda d: lambda: (d / "checkpoints" / "checkpoint-4" / "trainer_state.json").is_file(), 4),
        "saving-8": (lambda d: _saving(d / "checkpoints" / "checkpoint-8"), 4),
        "step-14": (lambda d: _logged(d / "train.log", 14), 12),
        "final-step": (lambda d: _logged(d / "train.log", STEPS), None),
    }
    when, expect_from = conds[point]
    run_dir = tmp_path / "run"
    for _attempt in range(3):
        shutil.rmtree(run_dir, ignore_errors=True)
        planned = run(tmp_path, *extra, "--out", "run", "--dry-run")
        assert planned.returncode == 0, planned.stderr
        p, hit = interrupt(tmp_path, "run", signal.SIGKILL, when, direct=True)
        # Wherever the kill lands, every checkpoint-N is complete.
        assert all((c / "trainer_state.json").is_file() for c in _checkpoints(run_dir)), _checkpoints(run_dir)
        if point == "saving-8" and hit and not _staged(run_dir):
            hit = False  # the save finished between the poll and the kill: try again
        if hit:
            break
    assert hit, "never caught the run at the chosen point"
    assert p.returncode == -signal.SIGKILL
    if point == "saving-8":
        # Killed mid-save: only the staging directory holds step 8, checkpoint-4 is kept.
        assert _staged(run_dir) == [".tmp-checkpoint-8"]
        assert [c.name for c in _checkpoints(run_dir)] == ["checkpoint-4"]
    again = run(tmp_path, *extra, "--out", "run")
    assert again.returncode == 0, again.stdout + again.stderr
    assert _staged(run_dir) == []  # the rerun removed the cut-short save
    if expect_from == 0:
        assert "no checkpoint yet: starting from step 0" in again.stdout
    elif expect_from is not None:
        # The newest COMPLETE checkpoint at kill time (a later one may have finished
        # between the kill condition and the signal only for the "after" points).
        m = re.search(r"resuming from .*checkpoint-(\d+)", again.stdout)
        assert m, again.stdout
        assert int(m.group(1)) >= expect_from
        if point == "saving-8":
            assert int(m.group(1)) == 4, "resumed from a partial checkpoint"
    assert f"step {STEPS}/{STEPS}" in again.stdout or "nothing to train" in again.stdout
    assert_same_adapter(tmp_path / "run", reference)


def test_completed_run_is_not_retrained(tmp_path):
    first = run(tmp_path, "--out", "run")
    assert first.returncode == 0, first.stderr
    before = (tmp_path / "run" / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns
    again = run(tmp_path, "--out", "run")
    assert again.returncode == 0, again.stderr
    assert "nothing to train" in again.stdout
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns == before


def test_different_plan_in_existing_run_dir_is_refused(tmp_path):
    first = run(tmp_path, "--out", "run", "--dry-run")
    assert first.returncode == 0, first.stderr
    plan_before = (tmp_path / "run" / "plan.yaml").read_bytes()
    p = run(tmp_path, "--out", "run", "--set", "lora.r=4")
    assert p.returncode == 2
    assert "holds a different run (differs in lora.r)" in p.stderr
    assert (tmp_path / "run" / "plan.yaml").read_bytes() == plan_before


def test_second_concurrent_trainer_is_refused(tmp_path):
    from vramfit.train import lock_run_dir

    p = run(tmp_path, "--out", "run", "--dry-run")
    assert p.returncode == 0, p.stderr
    held = lock_run_dir(tmp_path / "run")  # stands in for a trainer already running
    try:
        second = subprocess.run(
            [vramfit_exe(), "train", "--resume", "--out", "run"], cwd=tmp_path, env=subprocess_env(),
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert second.returncode == 6, second.stdout + second.stderr
        assert f"another training process (pid {os.getpid()})" in second.stderr
        assert not (tmp_path / "run" / "checkpoints").exists()
    finally:
        held.close()


# Two ranks (torch.distributed over gloo, on CPU), started as torchrun starts them: the same
# command with RANK/LOCAL_RANK/WORLD_SIZE/MASTER_* set. Not through launch.sh: on a machine
# without GPUs `accelerate launch --num_processes 2` starts one process, and torchrun itself
# exits 1 (not 75) once a worker exits non-zero, so only the ranks' own exit codes say "75".
MR_STEPS = 12


def _start_ranks(run_dir: Path, *extra: str, port: int) -> list[tuple[subprocess.Popen, Path]]:
    """Both ranks, each writing its stdout+stderr to a file (a full pipe would stall a rank,
    and with it the other in a collective)."""
    import sys

    ranks = []
    for rank in (0, 1):
        env = subprocess_env() | {
            "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
        }  # fmt: skip
        log = run_dir.parent / f"{run_dir.name}-rank{rank}-{port}.out"
        with open(log, "w") as f:
            argv = [sys.executable, "-m", "vramfit.train", str(run_dir), *extra]
            ranks.append((subprocess.Popen(argv, env=env, stdout=f, stderr=subprocess.STDOUT), log))
    return ranks


def _finish(ranks: list[tuple[subprocess.Popen, Path]], timeout: float = 120) -> list[tuple[int, str]]:
    """(exit code, output) of each rank. Once one fails the other would wait in a collective
    for gloo's 30-minute timeout: then, or after `timeout`, the rest are killed."""
    procs = [p for p, _ in ranks]
    deadline = time.time() + timeout
    while time.time() < deadline and any(p.poll() is None for p in procs):
        if any(p.poll() not in (None, 0, 75) for p in procs):
            break
        time.sleep(0.05)
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()
    return [(p.returncode, log.read_text()) for p, log in ranks]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_to_one_of_two_ranks_stops_both_at_the_same_step_and_resumes(tmp_path):
    from vramfit.model_source import embedded_model_dir

    embedded_model_dir()  # built now: two ranks building it at once would race
    two = ["--set", "launch.gpus=2", "--set", f"train.max_steps={MR_STEPS}"]
    for name in ("ref", "run"):
        p = run(tmp_path, *two, "--out", name, "--dry-run")
        assert p.returncode == 0, p.stdout + p.stderr

    ref = _finish(_start_ranks(tmp_path / "ref", port=_free_port()))
    assert [rc for rc, _ in ref] == [0, 0], ref
    reference = adapter(tmp_path / "ref")

    run_dir = tmp_path / "run"
    ranks = _start_ranks(run_dir, port=_free_port())
    assert _wait_for(_logged(run_dir / "train.log", 3), ranks[0][0]), "never reached step 3"
    ranks[1][0].send_signal(signal.SIGTERM)  # rank 1 only: it neither logs nor renames checkpoints
    (rc0, out0), (rc1, out1) = _finish(ranks)
    assert (rc0, rc1) == (75, 75), out0 + out1
    assert "Traceback" not in out0 + out1
    m0 = re.search(r"training stopped by a signal to another rank at step (\d+); checkpoint saved", out0)
    m1 = re.search(r"training stopped by signal 15 at step (\d+); checkpoint saved", out1)
    assert m0 and m1, out0 + out1
    stopped = int(m0.group(1))
    assert int(m1.group(1)) == stopped and 3 <= stopped < MR_STEPS  # the all-reduced flag: the same step
    # One complete checkpoint at that step, with both ranks' RNG state; nothing staged left.
    ckpts = _checkpoints(run_dir)
    assert [c.name for c in ckpts] == [f"checkpoint-{stopped}"] and _staged(run_dir) == []
    names = {p.name for p in ckpts[0].iterdir()}
    assert {"trainer_state.json", "rng_state_0.pth", "rng_state_1.pth", "adapter_model.safetensors"} <= names
    assert not (run_dir / "adapter").exists()

    resumed = _finish(_start_ranks(run_dir, "--resume", port=_free_port()))
    assert [rc for rc, _ in resumed] == [0, 0], resumed
    out = resumed[0][1]
    assert f"resuming from {ckpts[0]}" in out and f"step {MR_STEPS}/{MR_STEPS}" in out, out
    assert_same_adapter(run_dir, reference)

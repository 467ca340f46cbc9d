"""Preemption on CPU: SIGTERM checkpoints and exits 75; rerunning the command resumes to
the same final adapter as an uninterrupted run; one trainer per run directory."""

from __future__ import annotations

import os
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


def sigterm_at_step(cwd: Path, out: str, step: int) -> subprocess.CompletedProcess:
    """Start the run, send SIGTERM to `vramfit train` once train.log shows `step`."""
    proc = subprocess.Popen(
        [vramfit_exe(), *ARGS, "--out", out], cwd=cwd, env=subprocess_env(), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    log = cwd / out / "train.log"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if log.is_file() and f"step {step}/" in log.read_text():
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.05)
    stdout, stderr = proc.communicate(timeout=240)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("uninterrupted")
    p = run(cwd, "--out", "ref")
    assert p.returncode == 0, p.stdout + p.stderr
    return adapter(cwd / "ref")


@pytest.mark.parametrize("step", [3, 11])
def test_sigterm_checkpoints_and_rerun_resumes_to_same_adapter(tmp_path, reference, step):
    import torch

    p = sigterm_at_step(tmp_path, "run", step)
    assert p.returncode == 75, p.stdout + p.stderr
    assert "Traceback" not in p.stderr
    assert "rerun the same command" in p.stderr
    ckpts = sorted((tmp_path / "run" / "checkpoints").glob("checkpoint-*"))
    assert len(ckpts) == 1, ckpts
    stopped = int(ckpts[0].name.split("-")[1])
    assert step <= stopped < STEPS
    assert not (tmp_path / "run" / "adapter").exists()  # no final adapter from a stopped run

    again = run(tmp_path, "--out", "run")  # the same command, as a cloud script would rerun it
    assert again.returncode == 0, again.stdout + again.stderr
    assert "holds this same run: continuing it" in again.stdout
    assert f"resuming from {ckpts[0]}" in again.stdout
    assert f"step {STEPS}/{STEPS}" in again.stdout
    resumed = adapter(tmp_path / "run")
    assert resumed.keys() == reference.keys()
    # Resume restores weights, Adam state, scheduler, RNG and data position, so on
    # the same machine the arithmetic is the same; allow fp32 reduction-order noise.
    for k in reference:
        torch.testing.assert_close(resumed[k], reference[k], rtol=1e-4, atol=1e-6, msg=lambda m: m + "\n" + (tmp_path / "run" / "train.log").read_text())


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

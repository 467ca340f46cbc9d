"""scripts/cloud_train.sh on CPU: the embedded tiny model, the cpu preset, 4 steps.

The script is what a user copies onto a rented GPU machine; here it runs the same
commands on CPU. The point under test is that running it again resumes instead of
starting over: the second run trains nothing and merges nothing.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from conftest import REPO, subprocess_env

SCRIPT = REPO / "scripts" / "cloud_train.sh"
ARGS = ["--preset", "cpu", "--set", "train.max_steps=4", "--set", "train.save_steps=2"]


def run_script(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), *args], cwd=cwd, env={**subprocess_env(), "VRAMFIT_OUT": "runs/r", **env},
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def mtimes(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): p.stat().st_mtime_ns for p in sorted(root.rglob("*"))}


@pytest.mark.skipif(not SCRIPT.is_file(), reason="no scripts/ in this install")
def test_cloud_script_trains_merges_then_reruns_without_retraining(tmp_path):
    first = run_script(tmp_path, *ARGS)
    assert first.returncode == 0, first.stdout + first.stderr
    run = tmp_path / "runs" / "r"
    log = tmp_path / "runs" / "r.log"
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert (run / "merged" / "config.json").is_file()
    text = log.read_text()
    # Everything went to the log, in order: detect, train, merge.
    for needle in ("cloud_train: vramfit detect", "recommended preset:", "step 1/4", "done: 4 steps",
                   "cloud_train: vramfit merge runs/r", "merged model:", "cloud_train: done"):  # fmt: skip
        assert needle in text, needle
    assert text.index("recommended preset:") < text.index("step 1/4") < text.index("merged model:")
    before = mtimes(run)

    second = run_script(tmp_path, *ARGS)
    assert second.returncode == 0, second.stdout + second.stderr
    out = second.stdout
    assert "holds this same run: continuing it" in out
    assert "run already complete at step 4: nothing to train" in out
    assert "step 1/4" not in out  # no training step ran
    assert "runs/r/merged exists: merge already done, skipping" in out
    # Nothing under the run directory was rewritten: no checkpoint, adapter or merged file,
    # only the appended train.log and the run lock (which the trainer rewrites with its pid).
    after = mtimes(run)
    changed = [k for k in before if before[k] != after.get(k)] + [k for k in after if k not in before]
    assert sorted(changed) == [".lock", "train.log"], changed
    # The log kept the first run and appended the second.
    assert log.read_text().startswith(text) and log.read_text().count("cloud_train: vramfit detect") == 2


def test_cloud_script_fails_non_zero_and_logs_why(tmp_path):
    r = run_script(tmp_path, "--preset", "cpu", "--data", "missing.jsonl")
    assert r.returncode == 2, r.stdout + r.stderr
    text = (tmp_path / "runs" / "r.log").read_text()
    assert "error: dataset not found: missing.jsonl" in text
    assert "cloud_train: failed with exit 2" in text and "cloud_train: done" not in text
    assert not (tmp_path / "runs" / "r").exists()


def test_cloud_script_refuses_out(tmp_path):
    for args in (["--out", "x"], ["-o", "x"], ["--out=x"]):
        r = run_script(tmp_path, "--preset", "cpu", *args)
        assert r.returncode == 2 and "set VRAMFIT_OUT instead" in r.stderr, r.stderr
    assert not (tmp_path / "runs").exists()


def test_help_prints_usage_and_runs_nothing(tmp_path):
    script = REPO / "scripts" / "cloud_train.sh"
    r = subprocess.run(["bash", str(script), "--help"], cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("cloud_train.sh: detect, train and merge")
    assert not list(tmp_path.iterdir())  # no run directory, no log

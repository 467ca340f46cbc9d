"""VRAMFIT_PROFILE's callback (step_profile.StepProfiler), on the CPU: it records the steps
after the warm-up ones and writes its summary and tables atomically."""

from __future__ import annotations

import json
import types

import torch

from vramfit.step_profile import FIRST, STEPS, StepProfiler


def test_profiles_the_steps_after_warm_up(tmp_path):
    out = tmp_path / "profile.txt"
    prof = StepProfiler(str(out), cuda=False)
    x = torch.randn(64, 64)
    for step in range(FIRST + STEPS + 3):
        state = types.SimpleNamespace(global_step=step)
        prof.on_step_begin(None, state, None)
        for _ in range(3):
            x = torch.tanh(x @ x)
        prof.on_step_end(None, types.SimpleNamespace(global_step=step + 1), None)
    text = out.read_text()
    summary = json.loads(text[: text.index("\n\n#")])
    assert summary["steps_profiled"] == STEPS
    assert len(summary["step_seconds"]) == STEPS
    assert summary["ops_self_cpu_s_per_step"] > 0
    assert summary["gpu_kernels_s_per_step"] == 0  # no GPU here
    assert "aten::mm" in text and "aten::tanh" in text
    assert not list(tmp_path.glob("*.tmp"))


def test_a_resumed_run_is_profiled_after_its_own_warm_up(tmp_path):
    out = tmp_path / "profile.txt"
    prof = StepProfiler(str(out), cuda=False)
    for step in range(50, 50 + FIRST + STEPS):  # resumed at step 50
        prof.on_step_begin(None, types.SimpleNamespace(global_step=step), None)
        torch.ones(8) @ torch.ones(8)
        prof.on_step_end(None, types.SimpleNamespace(global_step=step + 1), None)
    text = out.read_text()
    assert json.loads(text[: text.index("\n\n#")])["steps_profiled"] == STEPS


def test_a_run_that_ends_inside_the_window_writes_the_steps_it_had(tmp_path):
    out = tmp_path / "profile.txt"
    prof = StepProfiler(str(out), cuda=False)
    for step in range(FIRST + 2):
        prof.on_step_begin(None, types.SimpleNamespace(global_step=step), None)
        prof.on_step_end(None, types.SimpleNamespace(global_step=step + 1), None)
    assert not out.exists()
    prof.on_train_end(None, None, None)
    text = out.read_text()
    assert json.loads(text[: text.index("\n\n#")])["steps_profiled"] == 2


def test_the_profiled_steps_and_the_one_the_trace_is_written_in_are_left_out_of_the_rate(tmp_path):
    """train.Progress marks a step's end before this callback writes the trace, so the writing
    lands in the next step: that one and the profiled ones are untimed, and no others."""
    untimed: list[int] = []
    step = 0
    prof = StepProfiler(str(tmp_path / "profile.txt"), cuda=False, untimed=lambda: untimed.append(step))
    for step in range(FIRST + STEPS + 3):
        prof.on_step_begin(None, types.SimpleNamespace(global_step=step), None)
        prof.on_step_end(None, types.SimpleNamespace(global_step=step + 1), None)
    assert untimed == list(range(FIRST, FIRST + STEPS + 1))

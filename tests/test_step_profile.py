"""VRAMFIT_PROFILE's callback (step_profile.StepProfiler), on the CPU: it records the steps
after the warm-up ones and writes its summary and tables atomically."""

from __future__ import annotations

import json
import time
import types

import pytest
import torch

from vramfit.step_profile import FIRST, STEPS, Kernel, StepProfiler


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


# ---------------------------------------------------------------- the compute stream's idle time


def test_gpu_gaps_finds_the_busiest_streams_idle_time_and_what_ended_each_wait():
    from vramfit.step_profile import Kernel, gpu_gaps

    k = [
        Kernel(0, 100, 7, "mm", "aten::mm"),
        Kernel(105, 200, 7, "mm", "aten::mm"),  # 5 us gap: a launch
        Kernel(150, 180, 7, "add", "aten::add"),  # overlaps the one before: no gap, busy counted once
        Kernel(2200, 2300, 7, "mm", "aten::mm"),  # 2 ms gap ended by an mm
        Kernel(2350, 2400, 7, "elementwise", "aten::mul"),  # 50 us gap ended by a mul
        Kernel(0, 1500, 9, "Memcpy DtoH", ""),  # a copy stream, busier than stream 7 here
    ]
    g = gpu_gaps(k, steps=1)
    assert g["stream"] == 9  # the busiest stream is the one analysed, whatever it runs
    g = gpu_gaps([x for x in k if x.stream == 7], steps=2)
    assert g["stream"] == 7
    assert g["span_s_per_step"] == round(2400 / 2e6, 4)
    assert g["busy_s_per_step"] == round((100 + 100 + 100 + 50) / 2e6, 4)
    assert g["idle_s_per_step"] == round((5 + 2000 + 50) / 2e6, 4)
    assert g["idle_gaps_per_step"] == 1.5
    sizes = g["idle_by_gap_size_s_per_step"]
    assert list(sizes.values()) == [round(5 / 2e6, 4), round(50 / 2e6, 4), 0.0, round(2000 / 2e6, 4)]
    assert list(g["idle_by_next_op_s_per_step"]) == ["aten::mm", "aten::mul"]
    assert g["longest_gaps_us"][0] == [2000.0, "aten::mm", "mm"]
    assert gpu_gaps([]) == {}


def test_gpu_gaps_reads_the_profilers_own_events():
    # On the CPU the trace has no device events: trace_kernels finds none, and nothing breaks.
    from torch.profiler import ProfilerActivity, profile

    from vramfit.step_profile import trace_kernels

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        torch.ones(8) @ torch.ones(8)
    assert trace_kernels(prof) == []


def test_each_kernel_is_named_with_the_operator_its_linked_correlation_id_points_to():
    # kineto's events as torch 2.13 gives them, then (without activity_type) as torch 2.11 does:
    # an operator, the runtime call it made (a CPU event too, numbered in CUPTI's own series,
    # here colliding with the operator's id), and the kernel, linked to the operator.
    from torch.autograd import DeviceType

    from vramfit.step_profile import trace_kernels

    def event(name, kind, device, corr, linked=0, start=0, dur=0, stream=0):
        return types.SimpleNamespace(
            name=lambda: name, activity_type=lambda: kind, device_type=lambda: device, correlation_id=lambda: corr,
            linked_correlation_id=lambda: linked, start_ns=lambda: start, duration_ns=lambda: dur,
            device_resource_id=lambda: stream, is_user_annotation=lambda: False,
        )  # fmt: skip

    events = [
        event("cudaLaunchKernel", "cuda_runtime", DeviceType.CPU, 5),
        event("aten::mm", "cpu_op", DeviceType.CPU, 5),
        event("sm90_gemm", "kernel", DeviceType.CUDA, 77, linked=5, start=2000, dur=3000, stream=7),
        event("Memcpy DtoH", "gpu_memcpy", DeviceType.CUDA, 78, start=9000, dur=1000, stream=9),
    ]
    prof = types.SimpleNamespace(profiler=types.SimpleNamespace(kineto_results=types.SimpleNamespace(events=lambda: events)))
    want = [Kernel(2.0, 5.0, 7, "sm90_gemm", "aten::mm"), Kernel(9.0, 10.0, 9, "Memcpy DtoH", "")]
    assert trace_kernels(prof) == want
    for e in events:  # torch 2.11's events have no activity_type: the runtime call is told by its name
        del e.activity_type, e.is_user_annotation
    assert trace_kernels(prof) == want


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_gpu_gaps_on_a_cuda_trace():
    from torch.profiler import ProfilerActivity, profile

    from vramfit.step_profile import gpu_gaps, trace_kernels

    x = torch.randn(2048, 2048, device="cuda")
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(4):
            x = torch.tanh(x @ x)
            time.sleep(0.002)  # the host makes the GPU wait: ~2 ms gaps
        torch.cuda.synchronize()
    kernels = trace_kernels(prof)
    assert any(k.op == "aten::mm" for k in kernels), [(k.name[:40], k.op) for k in kernels[:8]]
    g = gpu_gaps(kernels)
    assert g["idle_s_per_step"] > 0.004 and g["busy_s_per_step"] > 0


def test_sync_sites_counts_each_wait_by_where_it_was_called(monkeypatch):
    """On a GPU, torch's sync debug mode warns at every synchronizing call; SyncSites keys
    each by its Python stack and lets every other warning through. Here the warnings are
    issued by hand (a CPU has no sync debug mode)."""
    import warnings

    import torch

    from vramfit.step_profile import SyncSites

    modes = []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)

    def read_loss():
        warnings.warn("called a synchronizing CUDA operation")

    def time_step():
        warnings.warn("called a synchronizing CUDA operation")

    with warnings.catch_warnings(record=True) as other:
        warnings.simplefilter("always")
        with SyncSites() as sites:
            for _ in range(4):
                read_loss()
            time_step()
            warnings.warn("something else")
    assert modes == ["warn", "default"]
    counts = sites.per_step(2)
    assert len(counts) == 2
    (first, n1), (second, n2) = counts.items()
    assert "read_loss" in first.split(" < ")[0] and n1 == 2.0
    assert "time_step" in second.split(" < ")[0] and n2 == 0.5
    assert [str(w.message) for w in other] == ["something else"]


@pytest.mark.filterwarnings("ignore:CUDA is not available")  # the profiler, told cuda=True on a CPU
def test_waits_are_counted_in_the_step_after_the_window_and_added_to_the_summary(tmp_path, monkeypatch):
    """The sync debug mode slows what it watches: StepProfiler turns it on only for the step
    after the profiled ones (untimed already) and adds what it counted to the written summary.
    On a CPU the mode is stood in for (the counting itself: the test above)."""
    import warnings

    modes = []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    out = tmp_path / "profile.txt"
    prof = StepProfiler(str(out), cuda=True)
    monkeypatch.setattr("vramfit.step_profile.gpu_gaps", lambda *a, **k: {})
    for step in range(FIRST + STEPS + 2):
        prof.on_step_begin(None, types.SimpleNamespace(global_step=step), None)
        assert bool(modes) == (step >= FIRST + STEPS)  # never inside the window
        if prof.syncs is not None:
            warnings.warn("called a synchronizing CUDA operation")
        prof.on_step_end(None, types.SimpleNamespace(global_step=step + 1), None)
    assert modes == ["warn", "default"]  # one step only
    text = out.read_text()
    summary = json.loads(text[: text.index("\n\n#")])
    assert summary["steps_profiled"] == STEPS
    (site, n), = summary["syncs_per_step"].items()
    assert "test_waits_are_counted" in site and n == 1.0
    assert "# by self CPU time" in text and not list(tmp_path.glob("*.tmp"))

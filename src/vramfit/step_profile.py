"""VRAMFIT_PROFILE=FILE: where a few training steps spend their time, for finding what makes a
run slower than the speed model predicts (scripts/speed_ab.py compares runs with it).

torch.profiler records STEPS optimizer steps after the first FIRST this process trains (which
pay one-off costs; counted from where a resumed run starts) and FILE gets: each step's wall
time, the CPU time of the training thread's operators against the GPU's kernel time (a step
whose GPU time is well below its wall time waits on the CPU), where the busiest CUDA stream
stood idle between kernels and which operator's kernel ended each wait (gpu_gaps), and the
operators with the most self CPU and self GPU time. On a GPU also where the CPU waited for the
GPU (syncs_per_step: torch's sync debug mode, each warning's Python stack): after each wait
the GPU's queue is empty and it idles until the CPU has queued the next kernels. Those are
counted in the step after the profiled ones (left out of the rate already): reading a stack
at every sync, inside the window, made a 7B's profiled steps 13% slower than an earlier
profile of the same plan's, and its 0.1-1 ms GPU gaps four times as long.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from transformers import TrainerCallback

FIRST = 3  # optimizer steps left to warm up before recording
STEPS = 4


@dataclass(frozen=True)
class Kernel:
    """One GPU kernel or copy from the profiler's trace, times in microseconds."""

    start: float
    end: float
    stream: int
    name: str
    op: str = ""  # the operator that launched it, where the trace links them


GAP_SIZES_US = (10.0, 100.0, 1000.0)  # gaps shorter than each, and the rest


def gpu_gaps(kernels: list[Kernel], steps: int = 1, top: int = 12) -> dict:
    """Where the busiest stream (the compute stream) stood idle between its first and last
    kernel, per step: the total, by the gap's size (many short gaps: kernel launches that
    cannot keep up; a few long ones: a wait on the host, a copy or a sync), by the operator
    whose kernel ended the gap, and the longest gaps. Every stream's busy time too, so that
    copies on their own stream show beside it."""
    if not kernels:
        return {}
    per_stream: dict[int, list[Kernel]] = defaultdict(list)
    for k in kernels:
        per_stream[k.stream].append(k)
    busy: dict[int, float] = {}
    gaps: dict[int, list[tuple[float, Kernel]]] = {}
    for stream, ks in per_stream.items():
        ks.sort(key=lambda k: k.start)
        total, end, found = ks[0].end - ks[0].start, ks[0].end, []
        for k in ks[1:]:
            if k.start > end:
                found.append((k.start - end, k))
            total += max(0.0, k.end - max(k.start, end))  # overlapping kernels count once
            end = max(end, k.end)
        busy[stream], gaps[stream] = total, found
    main = max(busy, key=busy.get)
    ks, idle = per_stream[main], gaps[main]
    span = max(k.end for k in ks) - ks[0].start
    per = 1e6 * steps  # microseconds to seconds per step
    by_size = [0.0] * (len(GAP_SIZES_US) + 1)
    by_op: dict[str, float] = defaultdict(float)
    for us, k in idle:
        by_size[sum(us >= b for b in GAP_SIZES_US)] += us
        by_op[k.op or k.name] += us
    labels = [f"<{GAP_SIZES_US[0]:g}us"] + [f"{a:g}-{b:g}us" for a, b in zip(GAP_SIZES_US, GAP_SIZES_US[1:])] + [f">={GAP_SIZES_US[-1]:g}us"]
    return {
        "stream": main,
        "span_s_per_step": round(span / per, 4),
        "busy_s_per_step": round(busy[main] / per, 4),
        "idle_s_per_step": round(sum(us for us, _ in idle) / per, 4),
        "idle_gaps_per_step": round(len(idle) / steps, 1),
        "idle_by_gap_size_s_per_step": {lab: round(v / per, 4) for lab, v in zip(labels, by_size)},
        "idle_by_next_op_s_per_step": {op: round(v / per, 4) for op, v in sorted(by_op.items(), key=lambda x: -x[1])[:top]},
        "longest_gaps_us": [[round(us, 1), k.op or "", k.name[:80]] for us, k in sorted(idle, key=lambda x: -x[0])[:top]],
        "busy_s_per_step_by_stream": {str(st): round(b / per, 4) for st, b in sorted(busy.items(), key=lambda x: -x[1])},
    }


def trace_kernels(prof) -> list[Kernel]:
    """The device events of a finished ``torch.profiler.profile`` as Kernels, each named with
    the operator that launched it.

    Read from kineto's own events, not ``prof.events()``: torch's FunctionEvents fold each
    kernel's name and duration into its operator and keep no link back, so a kernel's
    operator is found here as torch finds it (torch/autograd/profiler.py): the operator whose
    correlation id is the kernel's linked correlation id. CUDA runtime calls (also CPU events,
    with ids of their own numbering) are left out of that lookup."""
    from torch.autograd import DeviceType

    results = getattr(getattr(prof, "profiler", None), "kineto_results", None)
    if results is None:
        return []
    events = results.events()
    ops: dict[int, str] = {}
    for e in events:
        if e.device_type() == DeviceType.CPU and _is_operator(e):
            ops.setdefault(e.correlation_id(), e.name())
    kernels = []
    for e in events:
        if e.device_type() != DeviceType.CUDA or (hasattr(e, "is_user_annotation") and e.is_user_annotation()):
            continue
        start = e.start_ns() / 1e3
        op = ops.get(e.linked_correlation_id(), "") if e.linked_correlation_id() else ""
        kernels.append(Kernel(start, start + e.duration_ns() / 1e3, int(e.device_resource_id()), e.name(), op))
    return kernels


def _is_operator(e) -> bool:
    """Whether a CPU event is an operator, not a CUDA runtime or driver call. torch 2.13's
    events say so (activity_type); torch 2.11's do not, and there the calls are told by name
    (cudaLaunchKernel, cuLaunchKernelEx, cudaMemcpyAsync, ...)."""
    if hasattr(e, "activity_type"):
        return e.activity_type() == "cpu_op"
    return not e.name().startswith("cu")


class SyncSites:
    """Counts the CPU's waits on the GPU by where they were called from, while entered.

    torch.cuda.set_sync_debug_mode("warn") makes every synchronizing CUDA call (``.item()``,
    a copy to pageable memory, ``torch.cuda.synchronize()``, ...) issue a warning from the
    Python line that made it; the warning hook reads the stack there. Only the innermost
    frames are kept: the line itself and its callers, enough to tell a library's read of a
    loss from our own step timing."""

    FRAMES = 3

    def __init__(self) -> None:
        self.counts: dict[str, int] = defaultdict(int)
        self._catch = None

    def __enter__(self):
        import warnings

        import torch

        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter("always")
        shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if "synchroniz" not in str(message):
                return shown(message, category, filename, lineno, file, line)
            import traceback

            skip = {__file__, warnings.__file__}
            frames = [f for f in traceback.extract_stack()[:-1] if f.filename not in skip]
            self.counts[" < ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames[-self.FRAMES :]))] += 1

        warnings.showwarning = show
        torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc) -> None:
        import torch

        torch.cuda.set_sync_debug_mode("default")
        self._catch.__exit__(*exc)

    def per_step(self, steps: int, top: int = 15) -> dict[str, float]:
        return {site: round(n / steps, 2) for site, n in sorted(self.counts.items(), key=lambda x: -x[1])[:top]}


class StepProfiler(TrainerCallback):
    """``untimed``: called during each step the measured rate should leave out (train.py's
    steady rate): the profiled steps (the profiler's overhead) and the one after them, in
    whose interval the trace is written (this callback runs after train.Progress marks the
    step's end; writing took 47 s for a 7B on an H200)."""

    def __init__(self, path: str, cuda: bool, untimed=None) -> None:
        self.path = Path(path)
        self.cuda = cuda
        self.untimed = untimed or (lambda: None)
        self.prof = None
        self.syncs: SyncSites | None = None  # counting the waits, in the step after the window
        self.summary: dict | None = None  # what write() wrote, to add the waits to
        self.tables = ""
        self.marks: list[float] = []
        self.start: int | None = None  # the step this process began training at
        self.wrote = False  # the trace was written at the end of the step before this one

    def on_step_begin(self, args, state, control, **kw):
        if self.start is None:
            self.start = state.global_step
        if self.prof is None and state.global_step == self.start + FIRST:
            import torch
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
            if self.cuda:
                torch.cuda.synchronize()
            self.prof = profile(activities=acts)
            self.prof.__enter__()
            self.marks = [time.perf_counter()]
        if self.marks or self.wrote:
            self.untimed()
            if self.wrote and self.cuda and self.summary is not None:
                self.syncs = SyncSites().__enter__()
            self.wrote = False

    def on_step_end(self, args, state, control, **kw):
        self._write_syncs()
        if self.prof is None or not self.marks:
            return
        import torch

        if self.cuda:
            torch.cuda.synchronize()
        self.marks.append(time.perf_counter())
        if len(self.marks) == STEPS + 1:
            self.prof.__exit__(None, None, None)
            self.write()
            self.marks = []
            self.wrote = True

    def on_train_end(self, args, state, control, **kw):
        self._write_syncs()  # a run that ended in the step after the window
        # A run that ended inside the window: stop recording, and write the steps it had.
        if self.prof is not None and self.marks:
            self.prof.__exit__(None, None, None)
            if len(self.marks) > 1:
                self.write()
            self.marks = []

    def _write_syncs(self) -> None:
        """Ends the step the waits were counted in and adds them to the summary."""
        if self.syncs is None:
            return
        self.syncs.__exit__(None, None, None)
        # train.Progress's own synchronize, for the step's timing, is one of them.
        self.summary["syncs_per_step"] = self.syncs.per_step(1)
        self.syncs = None
        self._save()

    def _save(self) -> None:
        from .render import write_text_atomic

        write_text_atomic(self.path, json.dumps(self.summary, indent=2) + "\n\n" + self.tables + "\n")

    def write(self) -> None:
        events = self.prof.key_averages()
        gpu_attr = "self_device_time_total" if not events or hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
        steps = [b - a for a, b in zip(self.marks, self.marks[1:])]
        # Self times do not double count nested operators: the operators' CPU time (the
        # Python between them is not in it). The GPU's: the kernels' own events only (an
        # operator's self device time repeats its kernels'), as torch's table totals it.
        from torch.autograd import DeviceType

        cpu_ops_us = sum(e.self_cpu_time_total for e in events)
        gpu_us = sum(
            getattr(e, gpu_attr, 0) or 0 for e in events if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)
        )
        summary = {
            "steps_profiled": len(steps),
            "step_seconds": [round(x, 4) for x in steps],
            "mean_step_s": round(sum(steps) / len(steps), 4),
            "ops_self_cpu_s_per_step": round(cpu_ops_us / 1e6 / len(steps), 6),
            "gpu_kernels_s_per_step": round(gpu_us / 1e6 / len(steps), 6),
            # Where gpu_kernels_s_per_step is well below mean_step_s the GPU waits on the CPU.
            "note": "profiled steps run slower than unprofiled ones (the profiler's own overhead is CPU time)",
        }
        if self.cuda:
            try:
                summary["gpu_gaps"] = gpu_gaps(trace_kernels(self.prof), len(steps))
            except Exception as e:  # a diagnostic: never lose the tables over it
                summary["gpu_gaps"] = {"error": f"{type(e).__name__}: {e}"}
        # Kernel names are long (GEMM variants, Triton kernels): wide enough to tell apart.
        by_cpu = events.table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=90)
        by_gpu = events.table(sort_by=gpu_attr, row_limit=40, max_name_column_width=120) if self.cuda else ""
        self.summary, self.tables = summary, "# by self CPU time\n" + by_cpu + "\n\n# by self GPU time\n" + by_gpu
        self._save()

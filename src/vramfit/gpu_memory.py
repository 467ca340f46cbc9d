"""Measure and cap this process's GPU memory (used inside the training process).

Two figures matter and both are reported: the caching allocator's peaks (what
torch hands out and reserves) and the process's total as NVML sees it, which
adds the CUDA context and library workspaces outside the allocator. A card OOMs
on the second.
"""

from __future__ import annotations

import os
from typing import Any

GIB = 1 << 30


def _nvml_process_bytes() -> int | None:
    """This process's GPU memory on its current device per NVML, or None if NVML can't say."""
    import torch

    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return None
    try:
        uuid = str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid)
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            dev_uuid = pynvml.nvmlDeviceGetUUID(h)
            dev_uuid = dev_uuid.decode() if isinstance(dev_uuid, bytes) else dev_uuid
            if uuid not in dev_uuid:
                continue
            for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h):
                if p.pid == os.getpid() and p.usedGpuMemory:
                    return int(p.usedGpuMemory)
            # In a PID namespace NVML may not list our pid: with the card to
            # ourselves, the device's used memory is ours.
            procs = pynvml.nvmlDeviceGetComputeRunningProcesses(h)
            if len(procs) <= 1:
                return int(pynvml.nvmlDeviceGetMemoryInfo(h).used)
            return None
    except Exception:
        return None
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass
    return None


class MemoryMonitor:
    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.nvml_peak: int | None = None
        self.context_bytes: int | None = None
        # What the process holds outside the caching allocator (CUDA context, cuBLAS/
        # cuDNN handles, NCCL): NVML's figure minus the allocator's reserved bytes.
        self.outside_peak: int | None = None
        self.setup_peak: int | None = None  # allocator peak before the first step

    def sample(self) -> None:
        if not self.cuda:
            return
        import torch

        used = _nvml_process_bytes()
        if used is not None:
            self.nvml_peak = max(self.nvml_peak or 0, used)
            self.outside_peak = max(self.outside_peak or 0, used - torch.cuda.memory_reserved())

    def process_peak(self) -> int | None:
        """The process's peak as a card sees it. NVML is only sampled between steps; the
        allocator's reserved peak (exact) plus the outside-allocator bytes covers a peak
        reached mid-step too."""
        import torch

        if self.outside_peak is None:
            return self.nvml_peak
        return max(self.nvml_peak or 0, torch.cuda.max_memory_reserved() + self.outside_peak)

    def line(self) -> str:
        if not self.cuda:
            return ""
        import torch

        return (
            f"gpu {torch.cuda.memory_allocated() / GIB:.2f} GiB"
            f" (peak alloc {torch.cuda.max_memory_allocated() / GIB:.2f}, reserved {torch.cuda.max_memory_reserved() / GIB:.2f}"
            + (f", process {self.nvml_peak / GIB:.2f}" if self.nvml_peak else "")
            + ")"
        )

    def summary(self) -> dict[str, Any]:
        if not self.cuda:
            return {"device": "cpu"}
        import torch

        self.sample()
        stats = torch.cuda.memory_stats()
        return {
            "device": torch.cuda.get_device_name(),
            "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / GIB, 3),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / GIB, 3),
            "peak_process_gib": round(self.process_peak() / GIB, 3) if self.process_peak() else None,
            "peak_nvml_sampled_gib": round(self.nvml_peak / GIB, 3) if self.nvml_peak else None,
            "outside_allocator_gib": round(self.outside_peak / GIB, 3) if self.outside_peak is not None else None,
            "cuda_context_gib": round(self.context_bytes / GIB, 3) if self.context_bytes else None,
            "setup_peak_allocated_gib": round(self.setup_peak / GIB, 3) if self.setup_peak else None,
            # cudaMalloc failures the caching allocator recovered from by freeing its cache
            # and retrying (each a device sync): a run close to its cap can slow down on them.
            "alloc_retries": int(stats.get("num_alloc_retries", 0)),
            **_reserve_detail(torch, stats),
        }


def _reserve_detail(torch, stats: dict[str, Any]) -> dict[str, Any]:
    """Where reserved memory beyond the allocated sits, for calibrating the memory model's
    allocator terms: the peak of free pieces split off blocks in use (fragmentation), and
    the reserved bytes at the end by CUDA stream (each stream's blocks are a pool of their
    own; the allocator returns nothing to the driver during training, so the end shows what
    each stream's pool grew to). ``stats``: torch.cuda.memory_stats(). A snapshot of the
    segments only: no allocation history."""
    by_stream: dict[str, float] = {}
    for seg in torch.cuda.memory_snapshot():
        key = str(seg.get("stream", 0))
        by_stream[key] = by_stream.get(key, 0.0) + seg.get("total_size", 0)
    return {
        "peak_inactive_split_gib": round(stats.get("inactive_split_bytes.all.peak", 0) / GIB, 3),
        "reserved_by_stream_gib": {k: round(v / GIB, 3) for k, v in sorted(by_stream.items())},
    }


def apply_budget(budget_gib: float, monitor: MemoryMonitor) -> str:
    """Cap the caching allocator so the whole process (context included) stays within the budget."""
    import torch

    torch.zeros(1, device="cuda")  # create the context so it can be measured
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    used = _nvml_process_bytes()
    # Outside the allocator: the CUDA context now, and later the cuBLAS/cuDNN handles
    # and workspaces the first matmuls create. The budget must leave room for all of
    # it, so reserve the larger of what is there now and what the memory model
    # expects by the peak (calibrated on GPUs: docs/memory-model.md).
    from .memory import CUDA_CONTEXT_GIB

    context = (used - torch.cuda.memory_reserved()) if used else int(CUDA_CONTEXT_GIB * GIB)
    monitor.context_bytes = context
    context = max(context, int(CUDA_CONTEXT_GIB * GIB))
    allowed = budget_gib * GIB - context
    if allowed <= 0:
        raise ValueError(f"budget {budget_gib} GiB is below the CUDA context ({context / GIB:.2f} GiB)")
    fraction = min(1.0, allowed / total)
    torch.cuda.set_per_process_memory_fraction(fraction)
    return (
        f"budget: {budget_gib:g} GiB per process = allocator cap {allowed / GIB:.2f} GiB"
        f" + {context / GIB:.2f} GiB outside the allocator ({fraction:.4f} of {total / GIB:.1f} GiB)"
    )

"""What hardware is here: GPUs via NVML, host RAM and CPUs via /proc and os.

This is the only module that talks to NVML. ``pynvml`` is imported inside ``detect``
so ``vramfit --help`` stays fast, and torch is never imported: initialising CUDA
takes seconds and ~300 MiB of VRAM on every card, which would skew what we measure.
Detection never raises; "no GPU" is a normal answer (``nvml_error`` says why).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

GIB = 2**30
# NVML reports "not available" for a process's memory as ULLONG_MAX (e.g. under
# Windows WDDM or without permission); pynvml maps it to None only in some versions.
_NVML_VALUE_NOT_AVAILABLE = 2**64 - 1
# Cards are sold in GB but report GiB minus firmware reservations (an "8 GB" card
# shows 7.6-8.0 GiB), so a preset named for N GB must still match such a card.
CARD_TOLERANCE = 0.10


@dataclass(frozen=True)
class GpuProcess:
    pid: int
    used_bytes: int | None  # None when NVML can't tell (no permission, WDDM)
    name: str | None  # from /proc/<pid>/comm; None when the pid is in another pid namespace


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    total_bytes: int
    free_bytes: int
    used_bytes: int
    compute_capability: tuple[int, int]
    bf16: bool  # native bf16 needs Ampere or newer: compute capability >= (8, 0)
    processes: tuple[GpuProcess, ...]
    uuid: str | None = None

    @property
    def total_gib(self) -> float:
        return self.total_bytes / GIB

    @property
    def free_gib(self) -> float:
        return self.free_bytes / GIB


@dataclass(frozen=True)
class HardwareFacts:
    gpus: tuple[GpuInfo, ...]
    driver_version: str | None
    cuda_version: str | None  # highest CUDA the driver supports, e.g. "13.0"
    host_ram_bytes: int
    host_ram_available_bytes: int
    cpu_count: int
    nvml_error: str | None  # why there are no GPUs; None when NVML worked

    @property
    def has_gpu(self) -> bool:
        return bool(self.gpus)

    @property
    def gpu_count(self) -> int:
        return len(self.gpus)

    # Plans target the smallest card: data-parallel ranks must all fit the same shard.
    @property
    def min_total_gib(self) -> float:
        return min((g.total_gib for g in self.gpus), default=0.0)

    @property
    def min_free_gib(self) -> float:
        return min((g.free_gib for g in self.gpus), default=0.0)

    @property
    def all_same_model(self) -> bool:
        return len({g.name for g in self.gpus}) <= 1

    def to_dict(self) -> dict[str, Any]:
        # Built by hand, not dataclasses.asdict: asdict keeps tuples, which
        # yaml.safe_dump (plan.yaml) refuses. GiB figures are added for humans.
        return {
            "gpus": [
                {
                    "index": g.index, "name": g.name, "uuid": g.uuid,
                    "total_bytes": g.total_bytes, "free_bytes": g.free_bytes,
                    "used_bytes": g.used_bytes,
                    "total_gib": round(g.total_gib, 2), "free_gib": round(g.free_gib, 2),
                    "compute_capability": list(g.compute_capability), "bf16": g.bf16,
                    "processes": [
                        {"pid": p.pid, "used_bytes": p.used_bytes, "name": p.name}
                        for p in g.processes
                    ],
                }
                for g in self.gpus
            ],
            "driver_version": self.driver_version,
            "cuda_version": self.cuda_version,
            "host_ram_bytes": self.host_ram_bytes,
            "host_ram_available_bytes": self.host_ram_available_bytes,
            "cpu_count": self.cpu_count,
            "nvml_error": self.nvml_error,
        }


def _text(value: Any) -> str:
    # pynvml < 11.5 returns bytes for names, UUIDs and versions.
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _optional(fn, *args, default=None):
    """One optional NVML query: an error (NOT_SUPPORTED on vGPU/MIG, NO_PERMISSION
    in containers) must not lose the whole GPU, so it yields ``default``."""
    try:
        return fn(*args)
    except Exception:
        return default


def _process_name(pid: int) -> str | None:
    # NVML gives host pids; inside a container they may not exist in our /proc.
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as f:
            return f.read().strip() or None
    except OSError:
        return None


def _processes(nvml, handle) -> tuple[GpuProcess, ...]:
    seen: dict[int, GpuProcess] = {}
    # A process using CUDA and graphics appears in both lists; keep it once.
    for query in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
        fn = getattr(nvml, query, None)
        for p in (_optional(fn, handle, default=[]) if fn else []) or []:
            used = getattr(p, "usedGpuMemory", None)
            if used is None or used == _NVML_VALUE_NOT_AVAILABLE:
                used = None
            if p.pid not in seen:
                seen[p.pid] = GpuProcess(int(p.pid), used, _process_name(p.pid))
    return tuple(seen.values())


def _cuda_version(nvml) -> str | None:
    for query in ("nvmlSystemGetCudaDriverVersion_v2", "nvmlSystemGetCudaDriverVersion"):
        fn = getattr(nvml, query, None)
        v = _optional(fn) if fn else None
        if v:  # encoded as 1000*major + 10*minor: 12040 -> "12.4"
            return f"{int(v) // 1000}.{int(v) % 1000 // 10}"
    return None


def _gpu(nvml, index: int) -> GpuInfo:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    mem = nvml.nvmlDeviceGetMemoryInfo(handle)
    cc = tuple(int(x) for x in nvml.nvmlDeviceGetCudaComputeCapability(handle))
    uuid = _optional(nvml.nvmlDeviceGetUUID, handle)
    return GpuInfo(
        index=index, name=_text(nvml.nvmlDeviceGetName(handle)),
        total_bytes=int(mem.total), free_bytes=int(mem.free), used_bytes=int(mem.used),
        compute_capability=cc, bf16=cc >= (8, 0),  # type: ignore[arg-type]
        processes=_processes(nvml, handle), uuid=_text(uuid) if uuid is not None else None,
    )


def _init_reason(err: BaseException) -> str:
    """A short human reason for "no GPU" from whatever nvmlInit (or import) raised."""
    if isinstance(err, ImportError):
        return "pynvml (nvidia-ml-py) not installed"
    text = f"{type(err).__name__} {err}".lower()
    if "librarynotfound" in text or "library not found" in text or isinstance(err, OSError):
        return "NVML library not found"
    if "drivernotloaded" in text or "driver not loaded" in text:
        return "NVIDIA driver not loaded"
    return f"NVML failed: {err or type(err).__name__}"


def _host_memory() -> tuple[int, int]:
    """(total, available) host RAM in bytes, without psutil. Note: this is the
    machine's RAM, not a container's cgroup limit."""
    fields: dict[str, int] = {}
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                key, _, rest = line.partition(":")
                fields[key] = int(rest.split()[0]) * 1024  # values are in kB
    except (OSError, ValueError, IndexError):
        pass
    if "MemTotal" in fields:
        # MemAvailable is missing before Linux 3.14; MemFree underestimates but is safe.
        return fields["MemTotal"], fields.get("MemAvailable", fields.get("MemFree", 0))
    try:  # macOS/BSD or no /proc
        page = os.sysconf("SC_PAGE_SIZE")
        total = page * os.sysconf("SC_PHYS_PAGES")
        has_avail = "SC_AVPHYS_PAGES" in os.sysconf_names
        avail = page * os.sysconf("SC_AVPHYS_PAGES") if has_avail else total
        return total, avail
    except (ValueError, OSError, AttributeError):
        return 0, 0


def _cpu_count() -> int:
    # Respect taskset/cgroup cpusets: dataloader workers beyond these only contend.
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def detect(nvml=None) -> HardwareFacts:
    """Probe GPUs (through ``nvml``, default the real ``pynvml``), host RAM and CPUs.

    Never raises: any failure to start NVML gives facts with no GPUs and
    ``nvml_error`` set. Tests inject a fake module implementing the same functions.
    """
    ram, ram_avail = _host_memory()
    host = dict(host_ram_bytes=ram, host_ram_available_bytes=ram_avail, cpu_count=_cpu_count())

    def none(reason: str) -> HardwareFacts:
        return HardwareFacts((), None, None, nvml_error=reason, **host)

    try:
        if nvml is None:
            import pynvml as nvml
        nvml.nvmlInit()
    except Exception as err:  # NVMLError, ImportError, OSError from ctypes...
        return none(_init_reason(err))
    try:
        try:
            count = int(nvml.nvmlDeviceGetCount())
        except Exception as err:
            return none(f"NVML could not count GPUs: {err}")
        gpus, last_err = [], None
        for i in range(count):
            try:
                gpus.append(_gpu(nvml, i))
            except Exception as err:  # e.g. GPU_IS_LOST: skip that card, keep the rest
                last_err = err
        if not gpus:
            return none(f"GPU query failed: {last_err}" if last_err else "no NVIDIA GPU")
        driver = _optional(nvml.nvmlSystemGetDriverVersion)
        return HardwareFacts(
            tuple(gpus), _text(driver) if driver is not None else None, _cuda_version(nvml),
            nvml_error=None, **host,
        )
    finally:
        _optional(nvml.nvmlShutdown)


def fake_facts(
    total_gib: float, count: int = 1, name: str = "Fake GPU", free_gib: float | None = None,
    cc: tuple[int, int] = (8, 9), host_ram_gib: float = 64.0,
) -> HardwareFacts:
    """Facts for ``count`` identical made-up GPUs: for tests, and for planning with
    ``--budget`` only (no GPU needed). ``free_gib`` defaults to ``total_gib``."""
    total = int(total_gib * GIB)
    free = total if free_gib is None else int(free_gib * GIB)
    cc = (int(cc[0]), int(cc[1]))
    gpus = tuple(GpuInfo(i, name, total, free, total - free, cc, cc >= (8, 0), ()) for i in range(count))
    ram = int(host_ram_gib * GIB)
    return HardwareFacts(gpus, None, None, ram, ram, _cpu_count(), nvml_error=None)


def recommend_preset(
    facts: HardwareFacts, preset_cards: dict[str, float | None]
) -> tuple[str, str]:
    """Pick a preset for this machine: (name, one-line reason).

    ``preset_cards`` maps preset name -> card size in GiB, or None for presets that
    aren't a single-card size ("cpu", "zero3-offload", "multi-gpu").
    """
    if not facts.has_gpu:
        return "cpu", (f"no NVIDIA GPU found ({facts.nvml_error}); "
                       "the cpu preset trains the embedded tiny model")
    # With several cards, judge by the one with least free memory: every rank must fit.
    gpu = min(facts.gpus, key=lambda g: g.free_bytes)
    seen = f"{gpu.name}: {gpu.free_gib:.1f} GiB free of {gpu.total_gib:.1f} GiB"
    if facts.gpu_count >= 2 and "multi-gpu" in preset_cards:
        return "multi-gpu", (f"{facts.gpu_count} GPUs (least free: {seen}); "
                             "multi-gpu spreads training across them")
    cards = sorted((size, name) for name, size in preset_cards.items() if size is not None)
    if not cards:
        raise ValueError("no single-card presets to choose from")
    # Judge by FREE memory: another process on the card takes VRAM we can't use.
    fits = [(size, name) for size, name in cards if size <= gpu.free_gib + CARD_TOLERANCE * size]
    if fits:
        size, name = fits[-1]
        return name, (f"{seen}; {name} is the largest preset whose {size:g} GiB card fits "
                      "free memory (10% tolerance for GB vs GiB)")
    size, name = cards[0]
    return name, (f"{seen}; free memory is below the smallest preset ({name}, {size:g} GiB "
                  "card) even with 10% tolerance: expect to cut batch size or sequence length")

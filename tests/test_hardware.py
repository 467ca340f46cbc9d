"""hardware.detect against a fake NVML module, the real (GPU-less) machine, and
recommend_preset's choice of preset for typical cards."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
import yaml

from vramfit import hardware
from vramfit.hardware import GIB, HardwareFacts, detect, fake_facts, recommend_preset

PRESET_CARDS = {
    "cpu": None, "8gb": 8, "12gb": 12, "16gb": 16, "24gb": 24, "40gb": 40, "80gb": 80,
    "zero3-offload": None, "multi-gpu": None,
}


class FakeNVMLError(Exception):
    """Stands in for pynvml.NVMLError (which needs the real library to format)."""


class FakeNvml:
    """Implements the pynvml functions hardware.detect uses, with call tracking."""

    def __init__(self, gpus, init_error=None, fail=(), cuda=13000, driver=b"580.65.06"):
        self.gpus = gpus  # list of dicts: name, total, free, cc, procs, gprocs, uuid
        self.init_error = init_error
        self.fail = set(fail)  # names of functions that raise FakeNVMLError
        self.cuda = cuda
        self.driver = driver
        self.shutdowns = 0

    def _check(self, fn):
        if fn in self.fail:
            raise FakeNVMLError(f"{fn}: Not Supported")

    def nvmlInit(self):
        if self.init_error:
            raise self.init_error

    def nvmlShutdown(self):
        self.shutdowns += 1

    def nvmlDeviceGetCount(self):
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i):
        return self.gpus[i]

    def nvmlDeviceGetName(self, h):
        return h["name"]

    def nvmlDeviceGetMemoryInfo(self, h):
        self._check("nvmlDeviceGetMemoryInfo")
        return SimpleNamespace(total=h["total"], free=h["free"], used=h["total"] - h["free"])

    def nvmlDeviceGetCudaComputeCapability(self, h):
        return h["cc"]

    def nvmlDeviceGetComputeRunningProcesses(self, h):
        self._check("nvmlDeviceGetComputeRunningProcesses")
        return [SimpleNamespace(pid=p, usedGpuMemory=m) for p, m in h.get("procs", [])]

    def nvmlDeviceGetGraphicsRunningProcesses(self, h):
        self._check("nvmlDeviceGetGraphicsRunningProcesses")
        return [SimpleNamespace(pid=p, usedGpuMemory=m) for p, m in h.get("gprocs", [])]

    def nvmlDeviceGetUUID(self, h):
        self._check("nvmlDeviceGetUUID")
        return h["uuid"]

    def nvmlSystemGetDriverVersion(self):
        return self.driver

    def nvmlSystemGetCudaDriverVersion_v2(self):
        self._check("nvmlSystemGetCudaDriverVersion_v2")
        return self.cuda

    def nvmlSystemGetCudaDriverVersion(self):
        self._check("nvmlSystemGetCudaDriverVersion")
        return self.cuda


def _gpu(name=b"NVIDIA GeForce RTX 4090", total_gib=23.99, free_gib=23.5, cc=(8, 9), **kw):
    return {"name": name, "total": int(total_gib * GIB), "free": int(free_gib * GIB),
            "cc": cc, "uuid": kw.pop("uuid", b"GPU-1234"), **kw}


# --- detect with a fake NVML ------------------------------------------------


def test_detect_one_gpu_decodes_bytes_and_reads_processes():
    me = os.getpid()
    nvml = FakeNvml([_gpu(procs=[(me, 512 * 2**20), (999_999_999, None)], gprocs=[(me, 1)])])
    facts = detect(nvml)

    assert facts.nvml_error is None and facts.has_gpu and facts.gpu_count == 1
    g = facts.gpus[0]
    assert g.name == "NVIDIA GeForce RTX 4090"  # bytes decoded
    assert g.uuid == "GPU-1234"
    assert g.total_bytes == int(23.99 * GIB) and g.free_bytes == int(23.5 * GIB)
    assert g.used_bytes == g.total_bytes - g.free_bytes
    assert g.total_gib == pytest.approx(23.99) and g.free_gib == pytest.approx(23.5)
    assert g.compute_capability == (8, 9) and g.bf16 is True
    # Our own pid appears in both lists but is reported once, with the compute figure;
    # an unknown pid keeps None memory and no name.
    assert [(p.pid, p.used_bytes) for p in g.processes] == [(me, 512 * 2**20), (999_999_999, None)]
    with open(f"/proc/{me}/comm") as f:
        assert g.processes[0].name == f.read().strip()
    assert g.processes[1].name is None
    assert facts.driver_version == "580.65.06"
    assert facts.cuda_version == "13.0"
    assert nvml.shutdowns == 1


def test_detect_two_gpus_mixed_models():
    nvml = FakeNvml(
        [_gpu(b"NVIDIA A100-SXM4-80GB", 79.25, 70.0, (8, 0)), _gpu("Tesla V100-SXM2-32GB", 31.74, 31.0, (7, 0))],
        cuda=12040,
    )
    facts = detect(nvml)

    assert facts.gpu_count == 2 and [g.index for g in facts.gpus] == [0, 1]
    assert [g.bf16 for g in facts.gpus] == [True, False]  # V100 (7.0) has no bf16
    assert facts.min_total_gib == pytest.approx(31.74)
    assert facts.min_free_gib == pytest.approx(31.0)
    assert facts.all_same_model is False
    assert facts.cuda_version == "12.4"


def test_detect_same_model_gpus():
    facts = detect(FakeNvml([_gpu(), _gpu()]))
    assert facts.all_same_model is True


def test_detect_init_failure_never_raises():
    nvml = FakeNvml([_gpu()], init_error=FakeNVMLError("Driver Not Loaded"))
    facts = detect(nvml)
    assert facts.gpus == () and not facts.has_gpu
    assert facts.nvml_error == "NVIDIA driver not loaded"
    assert facts.min_total_gib == 0.0 and facts.min_free_gib == 0.0
    assert nvml.shutdowns == 0  # init failed: nothing to shut down
    assert facts.host_ram_bytes > 0


@pytest.mark.parametrize(
    "err, reason",
    [
        (OSError("libnvidia-ml.so.1: cannot open shared object file"), "NVML library not found"),
        (ImportError("No module named 'pynvml'"), "pynvml (nvidia-ml-py) not installed"),
        (FakeNVMLError("Unknown Error"), "NVML failed: Unknown Error"),
    ],
)
def test_detect_init_failure_reasons(err, reason):
    assert detect(FakeNvml([], init_error=err)).nvml_error == reason


def test_detect_zero_gpus():
    nvml = FakeNvml([])
    facts = detect(nvml)
    assert facts.gpus == () and facts.nvml_error == "no NVIDIA GPU"
    assert nvml.shutdowns == 1


def test_failing_optional_queries_keep_the_gpu():
    nvml = FakeNvml(
        [_gpu(procs=[(1, 10)])],
        fail={"nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses",
              "nvmlDeviceGetUUID", "nvmlSystemGetCudaDriverVersion_v2", "nvmlSystemGetCudaDriverVersion"},
    )
    facts = detect(nvml)
    assert facts.gpu_count == 1 and facts.nvml_error is None
    g = facts.gpus[0]
    assert g.processes == () and g.uuid is None and g.total_gib == pytest.approx(23.99)
    assert facts.cuda_version is None
    assert nvml.shutdowns == 1


def test_cuda_version_falls_back_to_v1():
    nvml = FakeNvml([_gpu()], fail={"nvmlSystemGetCudaDriverVersion_v2"}, cuda=12020)
    assert detect(nvml).cuda_version == "12.2"


def test_failing_memory_query_drops_gpu_with_reason_and_shuts_down():
    nvml = FakeNvml([_gpu()], fail={"nvmlDeviceGetMemoryInfo"})
    facts = detect(nvml)
    assert facts.gpus == ()
    assert facts.nvml_error.startswith("GPU query failed:")
    assert nvml.shutdowns == 1


# --- the real machine (no GPU, no NVML library here) ------------------------


def test_real_detect_on_this_machine():
    facts = detect()
    if facts.has_gpu:  # pragma: no cover - only on GPU boxes
        pytest.skip("this machine has a GPU")
    assert facts.nvml_error  # a non-empty reason
    assert facts.nvml_error == "NVML library not found"
    assert facts.host_ram_bytes > 0
    assert 0 < facts.host_ram_available_bytes <= facts.host_ram_bytes
    assert facts.cpu_count >= 1


def test_host_memory_matches_proc_meminfo():
    total, avail = hardware._host_memory()
    with open("/proc/meminfo") as f:
        kb = {line.split(":")[0]: int(line.split()[1]) for line in f}
    assert total == kb["MemTotal"] * 1024


def test_host_memory_falls_back_to_sysconf(monkeypatch):
    real_open = open

    def no_meminfo(path, *a, **kw):
        if path == "/proc/meminfo":
            raise FileNotFoundError(path)
        return real_open(path, *a, **kw)

    monkeypatch.setattr("builtins.open", no_meminfo)
    total, _ = hardware._host_memory()
    assert total == os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


# --- serialisation ----------------------------------------------------------


def test_to_dict_is_json_and_yaml_serialisable():
    facts = detect(FakeNvml([_gpu(procs=[(os.getpid(), None)])]))
    d = facts.to_dict()
    back = json.loads(json.dumps(d))
    assert back["gpus"][0]["name"] == "NVIDIA GeForce RTX 4090"
    assert back["gpus"][0]["compute_capability"] == [8, 9]
    assert back["gpus"][0]["processes"][0]["used_bytes"] is None
    assert back["cuda_version"] == "13.0" and back["nvml_error"] is None
    assert yaml.safe_load(yaml.safe_dump(d)) == back  # plan.yaml uses safe_dump

    no_gpu = detect(FakeNvml([], init_error=FakeNVMLError("x"))).to_dict()
    assert json.loads(json.dumps(no_gpu))["gpus"] == []


# --- fake_facts -------------------------------------------------------------


def test_fake_facts():
    f = fake_facts(24, count=2, free_gib=20, cc=(7, 5), host_ram_gib=32)
    assert isinstance(f, HardwareFacts) and f.gpu_count == 2 and f.nvml_error is None
    assert f.min_total_gib == pytest.approx(24) and f.min_free_gib == pytest.approx(20)
    assert f.gpus[0].used_bytes == 4 * GIB and f.gpus[0].bf16 is False
    assert f.host_ram_bytes == 32 * GIB and f.all_same_model
    assert fake_facts(8).gpus[0].free_gib == pytest.approx(8)


# --- recommend_preset -------------------------------------------------------


def test_recommend_no_gpu_is_cpu():
    facts = detect(FakeNvml([], init_error=OSError("nope")))
    name, reason = recommend_preset(facts, PRESET_CARDS)
    assert name == "cpu"
    assert reason == "no NVIDIA GPU found (NVML library not found); the cpu preset trains the embedded tiny model"


@pytest.mark.parametrize(
    "gpu_name, total, free, expected",
    [
        ("NVIDIA GeForce RTX 3070", 7.6, 7.3, "8gb"),  # "8 GB" card in GiB
        ("NVIDIA GeForce RTX 3060", 11.66, 11.4, "12gb"),
        ("NVIDIA GeForce RTX 4090", 23.99, 23.5, "24gb"),
        ("NVIDIA A100-SXM4-40GB", 39.39, 39.0, "40gb"),
        ("NVIDIA H100 80GB HBM3", 79.19, 78.6, "80gb"),
        ("NVIDIA H200", 139.8, 139.0, "80gb"),  # bigger than any preset: the largest
        ("NVIDIA GeForce RTX 4090", 23.99, 14.0, "12gb"),  # busy card: judged by free memory
    ],
)
def test_recommend_single_card(gpu_name, total, free, expected):
    facts = fake_facts(total, name=gpu_name, free_gib=free)
    name, reason = recommend_preset(facts, PRESET_CARDS)
    assert name == expected
    assert gpu_name in reason and f"{free:.1f} GiB free of {total:.1f} GiB" in reason
    assert "largest preset" in reason and "\n" not in reason


def test_recommend_two_gpus_is_multi_gpu():
    name, reason = recommend_preset(fake_facts(24, count=2, name="NVIDIA L4"), PRESET_CARDS)
    assert name == "multi-gpu"
    assert "2 GPUs" in reason and "NVIDIA L4" in reason


def test_recommend_two_gpus_without_multi_gpu_preset_uses_smallest_free():
    facts = detect(FakeNvml([_gpu("big", 79.2, 78.0), _gpu("small", 23.99, 23.0)]))
    cards = {k: v for k, v in PRESET_CARDS.items() if k != "multi-gpu"}
    name, reason = recommend_preset(facts, cards)
    assert name == "24gb" and reason.startswith("small:")


def test_recommend_too_small_card_gets_smallest_preset():
    name, reason = recommend_preset(fake_facts(6.0, name="NVIDIA GeForce RTX 2060", free_gib=5.8), PRESET_CARDS)
    assert name == "8gb"
    assert "NVIDIA GeForce RTX 2060: 5.8 GiB free of 6.0 GiB" in reason
    assert "free memory is below the smallest preset (8gb" in reason


def test_recommend_without_card_presets_is_an_error():
    with pytest.raises(ValueError):
        recommend_preset(fake_facts(24), {"cpu": None})

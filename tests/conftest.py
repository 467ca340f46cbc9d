"""Shared fixtures: every test runs offline, with caches and outputs under tmp dirs."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

# Libraries such as `datasets` read their cache paths at import time, which can
# happen while test modules are collected: point them at a tmp dir before that.
_IMPORT_TMP = tempfile.mkdtemp(prefix="vramfit-tests-")
atexit.register(shutil.rmtree, _IMPORT_TMP, True)
for _k, _sub in (("VRAMFIT_HOME", "home"), ("HF_HOME", "hf"), ("HF_DATASETS_CACHE", "hf/datasets")):
    os.environ[_k] = os.path.join(_IMPORT_TMP, _sub)
# Hypothesis would otherwise create .hypothesis/ in the repository.
os.environ["HYPOTHESIS_STORAGE_DIRECTORY"] = os.path.join(_IMPORT_TMP, "hypothesis")
for _k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[_k] = "1"

REPO = Path(__file__).resolve().parents[1]
PRESET_FILES = sorted((REPO / "presets").glob("*.yaml"))
PRESET_NAMES = [p.stem for p in PRESET_FILES]
VENV_BIN = Path(sys.executable).parent

# Qwen2.5 shapes (config.json numbers), used without downloading anything.
QWEN05_CONFIG = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "tie_word_embeddings": True,
}
QWEN7B_CONFIG = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "vocab_size": 152064,
    "tie_word_embeddings": False,
}


@pytest.fixture(scope="session")
def _session_home() -> Path:
    # One model cache per session (a tmp dir): the embedded tiny model is built once,
    # and module-scoped fixtures, which run outside monkeypatch, see the same one.
    return Path(_IMPORT_TMP) / "home"


@pytest.fixture(autouse=True)
def offline_env(monkeypatch, tmp_path_factory, _session_home):
    hf = tmp_path_factory.mktemp("hf")
    monkeypatch.setenv("VRAMFIT_HOME", str(_session_home))
    monkeypatch.setenv("HF_HOME", str(hf))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(hf / "datasets"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.delenv("VRAMFIT_DEBUG", raising=False)
    monkeypatch.delenv("NODE_RANK", raising=False)
    yield


class _NoNvml:
    """An NVML module whose init fails as on a machine without the driver."""

    class NVMLError(Exception):
        pass

    def nvmlInit(self):
        raise OSError("NVML Shared Library Not Found")


@pytest.fixture
def no_gpu(monkeypatch):
    """In-process commands see a machine without GPUs, wherever the tests run."""
    import vramfit.hardware as hw

    real = hw.detect
    monkeypatch.setattr(hw, "detect", lambda nvml=None: real(nvml=_NoNvml()))


@pytest.fixture
def no_gpu_facts():
    from vramfit.hardware import HardwareFacts

    ram = 16 * 2**30
    return HardwareFacts((), None, None, ram, ram, 2, nvml_error="NVML library not found")


@pytest.fixture
def qwen7b_dir(tmp_path) -> Path:
    d = tmp_path / "qwen2.5-7b"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(QWEN7B_CONFIG))
    return d


def vramfit_exe() -> str:
    exe = VENV_BIN / "vramfit"
    return str(exe) if exe.exists() else "vramfit"


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """The embedded model trained for 2 steps, once per session; tests copy it, never change it."""
    cwd = tmp_path_factory.mktemp("trained")
    run = cwd / "run"
    proc = subprocess.run(
        [vramfit_exe(), "train", "--preset", "cpu", "--out", str(run), "--set", "train.max_steps=2"],
        cwd=cwd, env=subprocess_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, f"rc={proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    return run


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under root: relative path -> (kind, bytes or link target, permission bits)."""
    snap: dict[str, tuple] = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        rel = p.relative_to(root).as_posix()
        mode = stat.S_IMODE(st.st_mode)
        if stat.S_ISLNK(st.st_mode):
            snap[rel] = ("link", os.readlink(p), mode)
        elif stat.S_ISDIR(st.st_mode):
            snap[rel] = ("dir", None, mode)
        else:
            snap[rel] = ("file", p.read_bytes(), mode)
    return snap


def describe_changes(before: dict, after: dict) -> list[str]:
    out = [f"deleted: {k}" for k in before if k not in after]
    out += [f"created: {k}" for k in after if k not in before]
    out += [f"changed: {k}" for k in before if k in after and before[k] != after[k]]
    return out


_DISK_USAGE = shutil.disk_usage


def small_disk(monkeypatch, root: Path, free: int) -> list[Path]:
    """shutil.disk_usage reports `free` bytes for paths under `root` (the rest of the machine
    as it is); returns the list of paths it was asked about there."""
    root = root.resolve()
    asked: list[Path] = []

    def fake(path):
        p = Path(path).resolve()
        if p == root or root in p.parents:
            asked.append(p)
            return _DISK_USAGE(path)._replace(free=free)
        return _DISK_USAGE(path)

    monkeypatch.setattr(shutil, "disk_usage", fake)
    return asked

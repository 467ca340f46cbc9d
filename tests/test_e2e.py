"""End to end on CPU: the embedded tiny model trains, merges, resumes, and is deterministic.

Runs the installed `vramfit` executable in a subprocess (the trainer is a child
process, so only a subprocess sees all of its output).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import subprocess_env, vramfit_exe

pytestmark = pytest.mark.slow


def vramfit(*args, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [vramfit_exe(), *map(str, args)],
        cwd=cwd,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def show(p: subprocess.CompletedProcess) -> str:
    return f"rc={p.returncode}\n--- stdout\n{p.stdout}\n--- stderr\n{p.stderr}"


def tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.fixture(scope="module", autouse=True)
def cpu_only():
    from vramfit.hardware import detect

    if detect().has_gpu:
        pytest.skip("these end-to-end runs expect the CPU path (no NVIDIA GPU)")


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """`vramfit train` with no arguments, in an empty working directory."""
    cwd = tmp_path_factory.mktemp("e2e_default")
    proc = vramfit("train", cwd=cwd)
    assert proc.returncode == 0, show(proc)
    return cwd, cwd / "runs" / "tiny-cpu", proc


def test_default_train(default_run):
    cwd, run, proc = default_run
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out
    assert "preset cpu" in out
    # Falling loss, printed as it trains.
    losses = [float(x) for x in re.findall(r"^step \d+/\d+ \| loss ([\d.]+)", proc.stdout, re.M)]
    assert len(losses) >= 5, proc.stdout
    assert losses[-1] < losses[0] - 1.0, losses
    assert f"next: vramfit merge {run}" in proc.stdout
    # The run directory.
    adapter = run / "adapter"
    for f in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (adapter / f).is_file(), f
    m = json.loads((run / "metrics.json").read_text())
    assert m["steps"] == 60
    assert m["final_loss"] < m["first_loss"] - 1.0, m
    assert m["first_loss"] == pytest.approx(losses[0], abs=1e-3)
    assert m["device"] == "cpu"
    assert m["data"]["n_examples"] > 0
    # Speed over the steps after the first, steps that met a new batch shape left out (the
    # shipped examples pad to few shapes: with none new after step 1 the two rates agree).
    assert m["steady_tokens_per_s"] > 0 and m["window_tokens_per_s"] > 0
    assert 0 <= m["new_shape_steps"] < 59
    if m["new_shape_steps"] == 0:
        assert m["steady_tokens_per_s"] == m["window_tokens_per_s"]
    assert "done: 60 steps" in proc.stdout
    assert (run / "train.log").read_text().count("loss") >= 5
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["r"] == 16 and cfg["peft_type"] == "LORA"
    # No temporaries left behind.
    assert [p.name for p in run.rglob("*") if ".tmp" in p.name or ".old" in p.name] == []
    # The LoRA B matrices moved away from their zero init.
    t = tensors(adapter / "adapter_model.safetensors")
    bs = [v for k, v in t.items() if "lora_B" in k]
    assert bs and all(float(v.abs().max()) > 0 for v in bs)


def _logits(model, ids):
    import torch

    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def test_merge(default_run, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vramfit.model_source import embedded_model_dir

    cwd, run, _ = default_run
    base_dir = embedded_model_dir()
    base_listing = sorted(p.name for p in base_dir.rglob("*"))

    # Refuses to write inside the base model's directory.
    p = vramfit("merge", run, "--out", base_dir / "merged", cwd=cwd)
    assert p.returncode == 2, show(p)
    assert "refusing to write into the base model" in p.stderr and "Traceback" not in p.stderr
    assert sorted(p.name for p in base_dir.rglob("*")) == base_listing

    p = vramfit("merge", run, cwd=cwd)
    assert p.returncode == 0, show(p)
    merged = run / "merged"
    assert f"merged model: {merged}" in p.stdout
    m = re.search(r"largest logit difference (\S+) \(tolerance (\S+); merged in fp32 on (\w+), saved as (\w+)\)", p.stdout)
    assert m, p.stdout
    diff, tol, device, dtype = float(m.group(1)), float(m.group(2)), m.group(3), m.group(4)
    assert 0 <= diff <= tol and device == "cpu" and dtype == "bfloat16"

    # A normal model that from_pretrained loads, with its tokenizer.
    model = AutoModelForCausalLM.from_pretrained(merged)
    assert not any("lora" in n for n, _ in model.named_parameters())
    tok = AutoTokenizer.from_pretrained(merged)
    ids = tok("Add the two numbers.", return_tensors="pt")["input_ids"]
    logits = _logits(model, ids)
    assert logits.shape == (1, ids.shape[1], 262)
    assert torch.isfinite(logits).all()
    gen = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert gen.shape[1] == ids.shape[1] + 5 or int(gen[0, -1]) == tok.eos_token_id

    # Independently: merged == base + adapter (within bf16 rounding), and != base alone.
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    plain = _logits(base, ids)
    with_adapter = _logits(PeftModel.from_pretrained(base, str(run / "adapter")), ids)
    scale = with_adapter.abs().max().item()
    assert (logits - with_adapter).abs().max().item() <= 5e-2 * scale
    assert (plain - with_adapter).abs().max().item() > 5e-2 * scale  # the adapter changed something

    # A second merge without --force refuses and leaves the first output untouched.
    files = {f: (f.stat().st_mtime_ns, f.read_bytes()) for f in merged.iterdir()}
    p = vramfit("merge", run, cwd=cwd)
    assert p.returncode == 2, show(p)
    assert "already exists" in p.stderr and "--force" in p.stderr and "Traceback" not in p.stderr
    assert {f: (f.stat().st_mtime_ns, f.read_bytes()) for f in merged.iterdir()} == files

    # --force replaces it.
    (merged / "marker.txt").write_text("old output")
    p = vramfit("merge", run, "--force", cwd=cwd)
    assert p.returncode == 0, show(p)
    assert not (merged / "marker.txt").exists()
    weights = next(f for f in files if f.suffix == ".safetensors")
    assert weights.is_file() and weights.stat().st_mtime_ns != files[weights][0]
    assert [x.name for x in run.iterdir() if ".tmp" in x.name or ".old" in x.name] == []

    # --out elsewhere works too.
    p = vramfit("merge", run, "--out", tmp_path / "elsewhere", cwd=cwd)
    assert p.returncode == 0, show(p)
    assert (tmp_path / "elsewhere" / "config.json").is_file()


def _adapter_tensors(run: Path) -> dict:
    return tensors(run / "adapter" / "adapter_model.safetensors")


def test_same_seed_same_weights(tmp_path):
    runs = {}
    for name, seed in (("a", 42), ("b", 42), ("c", 7)):
        p = vramfit("train", "--set", "train.max_steps=5", "--set", f"train.seed={seed}", "--out", name, cwd=tmp_path)
        assert p.returncode == 0, show(p)
        runs[name] = _adapter_tensors(tmp_path / name)
    import torch

    a, b, c = runs["a"], runs["b"], runs["c"]
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert any(not torch.equal(a[k], c[k]) for k in a), "a different seed should train differently"


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory):
    """Train 10 steps (checkpoints at 5 and 10), drop everything after step 5, resume."""
    cwd = tmp_path_factory.mktemp("e2e_resume")
    run = cwd / "run"
    first = vramfit("train", "--set", "train.max_steps=10", "--set", "train.save_steps=5", "--out", run, cwd=cwd)
    assert first.returncode == 0, show(first)
    ckpts = sorted(x.name for x in (run / "checkpoints").iterdir())
    assert ckpts == ["checkpoint-10", "checkpoint-5"], ckpts
    assert json.loads((run / "metrics.json").read_text())["steps"] == 10
    # Simulate a run that stopped after step 5: resume must continue from there to 10.
    shutil.rmtree(run / "checkpoints" / "checkpoint-10")
    shutil.rmtree(run / "adapter")
    os.remove(run / "metrics.json")
    second = vramfit("train", "--resume", "--out", run, cwd=cwd)
    return cwd, run, second


def test_resume_from_checkpoint(resumed_run):
    cwd, run, p = resumed_run
    assert p.returncode == 0, show(p)
    assert f"resuming from {run / 'checkpoints' / 'checkpoint-5'}" in p.stdout
    assert "step 10/10" in p.stdout
    assert not re.search(r"^step [1-5]/10 ", p.stdout, re.M), p.stdout  # did not start over
    m = json.loads((run / "metrics.json").read_text())
    assert m["steps"] == 10
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert (run / "checkpoints" / "checkpoint-10").is_dir()
    assert "resuming from" in (run / "train.log").read_text()


def test_resume_of_finished_run_trains_nothing(resumed_run):
    cwd, run, _ = resumed_run
    p = vramfit("train", "--resume", "--out", run, cwd=cwd)
    assert p.returncode == 0, show(p)
    assert json.loads((run / "metrics.json").read_text())["steps"] == 10
    assert sorted(x.name for x in (run / "checkpoints").iterdir()) == ["checkpoint-10", "checkpoint-5"]


def test_train_with_user_data(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"say {i}"}, {"role": "assistant", "content": str(i)}]} for i in range(40)]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    p = vramfit("train", "--data", "chat.jsonl", "--set", "train.max_steps=3", "--out", "run", cwd=tmp_path)
    assert p.returncode == 0, show(p)
    assert "40 examples (messages)" in p.stdout
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["steps"] == 3


@pytest.mark.parametrize("ckpt", ["false", "true"])
def test_offloaded_activations_train_the_same_adapter(tmp_path, ckpt):
    """train.offload_activations copies what the decoder layers save for backward to host RAM
    and back. On CPU that saves nothing, but the code path is the GPU's: the run must train
    what the run without it trains, within fp32 tolerance."""
    import torch

    common = ("--preset", "cpu", "--set", "train.max_steps=3", "--set", "train.logging_steps=1", "--set", f"train.grad_ckpt={ckpt}")
    metrics = {}
    for name, offload in (("plain", "false"), ("offload", "true")):
        p = vramfit("train", *common, "--set", f"train.offload_activations={offload}", "--out", name, cwd=tmp_path)
        assert p.returncode == 0, show(p)
        metrics[name] = json.loads((tmp_path / name / "metrics.json").read_text())
    plain, off = metrics["plain"], metrics["offload"]
    assert "offloaded_activations" not in plain
    # The hooks ran, on every layer, and moved what the setting says.
    assert "activations: each of 4 decoder layers keeps its" in (tmp_path / "offload" / "train.log").read_text()
    moved = off["offloaded_activations"]
    layer_inputs = 4 * moved["tokens"] * 128 * 4  # 4 layers x tokens x hidden 128, fp32
    if ckpt == "true":
        # Only each layer's input: checkpointing recomputes the rest, nothing is copied twice.
        assert moved["tensors"] == 4 and moved["bytes"] == layer_inputs, moved
    else:
        assert moved["tensors"] > 4 * 10 and moved["bytes"] > 5 * layer_inputs, moved
    assert off["first_loss"] == pytest.approx(plain["first_loss"], abs=1e-4)
    assert off["final_loss"] == pytest.approx(plain["final_loss"], abs=1e-4)
    assert off["final_loss"] < off["first_loss"]  # it trained
    a, b = _adapter_tensors(tmp_path / "plain"), _adapter_tensors(tmp_path / "offload")
    assert a.keys() == b.keys() and any("lora_B" in k for k in a)
    assert all(float(v.abs().max()) > 0 for k, v in a.items() if "lora_B" in k)  # moved from the zero init
    for k in a:
        torch.testing.assert_close(b[k], a[k], msg=k)  # fp32 defaults: rtol 1.3e-6, atol 1e-5


def _trains_the_same(tmp_path, key: str, *extra: str, tol: float) -> tuple[str, str]:
    """Three CPU steps with ``key`` false and true (``extra``: more flags for both): both exit 0
    and train the same adapter within ``tol``. Returns the two runs' train.log."""
    import torch

    # One CPU thread: with two, the math library may use fewer threads when the machine is
    # busy (its dynamic threading), which reorders sums and moved a 3-step loss by 2e-4 once
    # in CI, more than the settings under test change it.
    common = ("--preset", "cpu", "--set", "train.max_steps=3", "--set", "train.logging_steps=1",
              "--set", "launch.env.OMP_NUM_THREADS=1", *extra)  # fmt: skip
    metrics = {}
    for value in ("false", "true"):
        p = vramfit("train", *common, "--set", f"{key}={value}", "--out", value, cwd=tmp_path)
        assert p.returncode == 0, show(p)
        metrics[value] = json.loads((tmp_path / value / "metrics.json").read_text())
    assert metrics["true"]["final_loss"] == pytest.approx(metrics["false"]["final_loss"], abs=tol)
    a, b = _adapter_tensors(tmp_path / "false"), _adapter_tensors(tmp_path / "true")
    assert a.keys() == b.keys() and any("lora_B" in k for k in a)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=tol, atol=tol / 10, msg=k)
    return (tmp_path / "false" / "train.log").read_text(), (tmp_path / "true" / "train.log").read_text()


def test_fused_lora_trains_the_same_adapter(tmp_path):
    """kernels.fused_lora through the CLI: train.py routes every adapted layer through the
    fused function (its log line says how many) and the run trains what PEFT's layers train,
    within fp32 tolerance (tests/test_fused_lora.py compares single steps in detail)."""
    off, on = _trains_the_same(tmp_path, "kernels.fused_lora", tol=1e-4)
    assert re.search(r"kernels: \d+ LoRA layers run as one function each", on), on
    assert "LoRA layers run as one function" not in off


def test_lean_recompute_through_the_cli_trains_the_same_adapter(tmp_path):
    """kernels.lean_recompute with checkpointing on: train.py flags each down_proj and runs the
    recomputations under its context (the log line says how many layers) and the adapter is
    the one trained without it (tests/test_fused_lora.py checks single steps exactly)."""
    off, on = _trains_the_same(tmp_path, "kernels.lean_recompute", "--set", "train.grad_ckpt=true", tol=1e-5)
    assert re.search(r"the recomputations of 4 checkpointed decoder layers leave out down_proj's base multiply", on), on
    assert "down_proj's base multiply" not in off
    # With only the first 2 layers checkpointed, the count is of those.
    p = vramfit("train", "--preset", "cpu", "--set", "train.max_steps=1", "--set", "train.grad_ckpt=true",
                "--set", "train.grad_ckpt_layers=2", "--out", "two", cwd=tmp_path)  # fmt: skip
    assert p.returncode == 0, show(p)
    assert "the recomputations of 2 checkpointed decoder layers" in (tmp_path / "two" / "train.log").read_text()


def test_a_diverged_run_says_so_and_writes_valid_json(tmp_path):
    """With the Trainer's NaN filter off (render.py) a diverged loss is logged as it is, not
    replaced by the average so far: train.log says when it diverged, `vramfit train` warns on
    its way out, and metrics.json stays strict JSON (null losses, and their count)."""
    p = vramfit("train", "--set", "train.lr=1e6", "--set", "train.max_steps=5", "--set", "train.logging_steps=1",
                "--out", "run", cwd=tmp_path)  # fmt: skip
    assert p.returncode == 0, show(p)
    assert "-> nan, " in p.stdout, show(p)
    warnings = [x for x in p.stderr.splitlines() if x.startswith("warning:")]
    assert len(warnings) == 1 and "the run diverged" in warnings[0] and "train.lr" in warnings[0], show(p)

    def strict(text):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"metrics.json holds {c}"))

    m = strict((tmp_path / "run" / "metrics.json").read_text())
    assert m["final_loss"] is None and m["nonfinite_losses"] >= 1 and m["first_loss"] > 0
    assert sum(line.startswith("diverged: loss nan at step") for line in (tmp_path / "run" / "train.log").read_text().splitlines()) == 1

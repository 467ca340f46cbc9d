"""scripts/fit_speed.py: it recovers known coefficients, and rebuilds a run's config as the CLI does."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import fit_speed  # noqa: E402

from vramfit import speed  # noqa: E402
from vramfit.config import RunConfig  # noqa: E402
from vramfit.model_shape import load_shape  # noqa: E402


def test_nnls_on_relative_error_recovers_known_coefficients():
    pytest.importorskip("scipy")  # the fit alone needs it; the other tests run without
    names = fit_speed.FORMS["module"]
    rng = np.random.default_rng(0)
    x = rng.uniform(0.0, 1.0, (40, len(names))) * rng.uniform(0, 1, len(names)) ** 4
    truth = rng.uniform(0.1, 2.0, len(names))
    truth[names.index("loss")] = 0.0  # a term that is not there comes out zero, not negative
    t = x @ truth
    got = fit_speed.fit(x, np.zeros((len(t), 2)), t, names, "module")
    assert got == pytest.approx(truth, rel=1e-6, abs=1e-9)


def test_features_times_coefficients_are_the_step_time():
    shape = load_shape(str(ROOT / "scripts/archs/qwen2.5-7b.json"))
    cfg = RunConfig.model_validate({"method": "qlora", "lora": {"target_modules": ["q_proj", "v_proj"]}})
    f, c = speed.step_features(shape, cfg, 512.0, 989.0), speed.coefficients()
    terms = {k: f[k] * c[k] for k in f}
    assert speed.combine(terms) == pytest.approx(speed.micro_step_seconds(shape, cfg, 512.0, 989.0))
    # GPU and CPU work overlap: the step is longer than either, shorter than their sum.
    gpu = sum(terms[k] for k in speed.GPU_TERMS)
    cpu = sum(terms[k] for k in speed.CPU_TERMS)
    assert max(gpu, cpu) < speed.combine(terms) < gpu + cpu
    assert f["module_pass"] == pytest.approx(3 * shape.layers * 2)  # q and v wrapped, 3 passes (checkpointing)


@pytest.mark.parametrize(
    "sets",
    [
        {"train": {"offload_embeddings": True}},  # the embedding rows' host gather: additive
        {"train": {"offload_activations": True, "grad_ckpt": True}},  # copies beside the compute
        {"train": {"offload_activations": True, "grad_ckpt": False}},  # copies that add
        {"deepspeed": {"stage": 3}, "launch": {"gpus": 2}},
    ],
)
def test_the_fit_predicts_what_speed_py_predicts(sets):
    """fit_speed fits through the formula speed.py predicts with: with speed.py's own
    coefficients its prediction of a row is speed.py's, the terms it does not fit included
    (until session 10 it left the embedding rows' term out)."""
    shape = load_shape(str(ROOT / "scripts/archs/qwen2.5-7b.json"))
    cfg = RunConfig.model_validate({"method": "qlora", **sets})
    row = fit_speed.Row("t", "qwen2.5-7b", cfg, None, 1000.0, "NVIDIA H200")
    names = fit_speed.FORMS[fit_speed.CHOSEN]
    x, fixed, _ = fit_speed.design([row], names)
    coef = speed.coefficients()
    c = np.array([coef[n] for n in names])
    got = fit_speed.predict_seconds(x, fixed, names, c, fit_speed.CHOSEN)[0]
    assert got == pytest.approx(speed.micro_step_seconds(shape, row.cfg, float(cfg.data.seq_len), 989.0), rel=1e-9)


def test_fitted_rows_are_taken_as_run_with_peft_s_layers_and_every_multiply_recomputed():
    # Every fitted run predates kernels.fused_lora and kernels.lean_recompute, whose defaults
    # are now on: a config rebuilt from an old record must not take them.
    cfg = RunConfig.model_validate({"method": "lora", "lora": {"r": 128, "target_modules": "all-linear"}})
    assert cfg.kernels.fused_lora and cfg.kernels.lean_recompute
    row = fit_speed.Row("t", "qwen2.5-7b", cfg, None, 1000.0, "NVIDIA H200")
    assert not row.cfg.kernels.fused_lora and not row.cfg.kernels.lean_recompute


def test_config_from_command_resolves_preset_gpus_and_sets():
    cfg = fit_speed.config_from_command(
        "vramfit train --preset multi-gpu --gpus 2 --model /m --data /d --set data.seq_len=1024 "
        "--set train.micro_batch=8 --set 'lora.target_modules=[q_proj,v_proj]'"
    )
    assert cfg.world_size == 2 and cfg.deepspeed.stage == 2 and cfg.data.seq_len == 1024
    assert cfg.train.micro_batch == 8 and cfg.lora.target_modules == ["q_proj", "v_proj"]


def test_rows_time_per_micro_batch_is_per_gpu():
    cfg = fit_speed.config_from_command("vramfit train --preset multi-gpu --gpus 2 --set data.seq_len=1024")
    row = fit_speed.Row("x", "qwen2.5-7b", cfg, None, measured=4000.0, gpu="NVIDIA H200")
    assert row.measured_seconds() == pytest.approx(1 * 1024 * 2 / 4000.0)


def test_gathers_every_recorded_run_it_was_fitted_on():
    """speed.py's constants say which runs they were fitted to: gather() must still find them
    where the repo keeps them (a moved results file once broke it unnoticed)."""
    rows = fit_speed.gather()
    assert len(rows) == 265 and sum(1 for r in rows if not r.excluded) == 149

"""The memory model: known answers measured on a GPU, monotonicity, ZeRO, fit verdicts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import QWEN7B_CONFIG
from vramfit.config import RunConfig
from vramfit.errors import FitError
from vramfit.hardware import fake_facts
from vramfit.memory import (
    CUDA_CONTEXT_GIB,
    GIB,
    NCCL_GIB,
    OTHER_SLACK,
    ZERO3_MAX_LIVE_ELEMENTS,
    MemoryBreakdown,
    estimate,
    fused_loss_bytes,
    fused_residual_bytes,
    layer_activation_bytes,
    layer_transient_bytes,
    offloaded_activation_gpu_bytes,
    offloaded_activation_host_bytes,
    offloaded_activation_transfer_bytes,
)
from vramfit import memory
from vramfit.model_shape import shape_from_config
from vramfit.plan import build_plan, require_fit, suggest_fit
from vramfit.presets import resolve_layers

ROOT = Path(__file__).resolve().parents[1]

Q7 = shape_from_config(QWEN7B_CONFIG)


def recorded(run_dir: Path) -> RunConfig:
    """A run directory's config as its run behaved (calibrate_memory.run_config): switches
    added since, with defaults its code did not have, are off."""
    import sys

    sys.path.insert(0, str(ROOT / "scripts"))
    from calibrate_memory import run_config

    return RunConfig.model_validate(run_config(run_dir))


def cfg(**sections) -> RunConfig:
    return RunConfig.model_validate(sections)


def allocated_gib(b: MemoryBreakdown) -> float:
    """Peak allocated as torch.cuda.max_memory_allocated measures it: no slack, no context."""
    return (b.peak - b.allocator_slack - b.cuda_context) / GIB


# ---------------------------------------------------------------- shapes


def test_qwen25_7b_parameter_count():
    assert Q7.total_params == 7_615_616_512
    assert Q7.head_dim == 128 and Q7.kv_heads == 4
    assert Q7.attention_bias  # qwen2's q/k/v biases
    assert Q7.head_params == Q7.embed_params == 152064 * 3584


def test_tied_embeddings_not_counted_twice():
    tied = shape_from_config({**QWEN7B_CONFIG, "tie_word_embeddings": True})
    assert Q7.total_params - tied.total_params == 152064 * 3584


def test_lora_param_count():
    # q_proj (3584->3584) + v_proj (3584->512), r=8, 28 layers
    assert Q7.lora_params(8, ["q_proj", "v_proj"]) == 28 * 8 * ((3584 + 3584) + (3584 + 512))
    all_linear = Q7.lora_params(1, "all-linear")
    assert all_linear == 28 * (
        (3584 + 3584) + 2 * (3584 + 512) + (3584 + 3584) + 2 * (3584 + 18944) + (18944 + 3584)
    )


# ---------------------------------------------------------------- known answers (H200)

# Measured process peaks (allocator reserved + outside-allocator, NVML) from
# scripts/calibrate_memory.py on an H200, 2026-11-22 (docs/benchmarks/calibration/).
# (method, lora_r, targets, micro_batch, seq_len, grad_ckpt, optimizer) -> GiB on Qwen2.5-7B
MEASURED_Q7 = [
    ("qlora", 16, ["q_proj", "k_proj", "v_proj", "o_proj"], 1, 512, True, "adamw_torch", 7.439),
    ("qlora", 8, ["q_proj", "v_proj"], 4, 512, False, "adamw_torch", 20.109),
    ("qlora", 16, "all-linear", 1, 8192, True, "adamw_torch", 24.723),
    ("lora", 16, "all-linear", 1, 2048, True, "adamw_torch", 20.457),
    ("lora", 128, "all-linear", 1, 1536, True, "adamw_torch", 23.156),
    ("lora", 16, "all-linear", 4, 1024, False, "adamw_torch", 54.836),
]


def calibration_config(method, r, targets, mb, seq, ckpt, optimizer) -> RunConfig:
    return cfg(
        method=method,
        quant={"bits": 4, "quant_type": "nf4", "double_quant": True, "upcast_embeddings": False},
        lora={"r": r, "alpha": 2 * r, "target_modules": targets},
        data={"seq_len": seq},
        # As scripts/calibrate_memory.py runs them: one micro-batch per step.
        train={"micro_batch": mb, "grad_accum": 1, "grad_ckpt": ckpt, "optimizer": optimizer},
    )


@pytest.mark.parametrize("method,r,targets,mb,seq,ckpt,optimizer,measured", MEASURED_Q7)
def test_known_answer_within_5_percent_of_measured(method, r, targets, mb, seq, ckpt, optimizer, measured):
    b = estimate(Q7, calibration_config(method, r, targets, mb, seq, ckpt, optimizer), "bfloat16", "cuda")
    assert b.peak_gib == pytest.approx(measured, rel=0.05)


def test_known_answer_breakdown_qlora_8gb():
    """The 8 GB preset's shape: what is live at the loss peak, part by part."""
    b = estimate(Q7, calibration_config("qlora", 16, ["q_proj", "k_proj", "v_proj", "o_proj"], 1, 512, True, "adamw_torch"))
    assert b.phase == "loss"
    # 4-bit linears (nf4 + double quant) + 16-bit embeddings, lm_head and norms
    assert b.weights / GIB == pytest.approx(5.17, abs=0.01)
    assert b.gradients == 0  # one micro-batch per step: none accumulated yet at the loss
    assert b.adapters == b.trainable_params * 4  # fp32 LoRA weights
    assert b.optimizer == b.trainable_params * 8  # two fp32 Adam moments
    assert b.logits == 512 * Q7.vocab * 12
    assert b.activations == Q7.layers * 512 * Q7.hidden * 2  # checkpointed block inputs
    assert b.cuda_context == CUDA_CONTEXT_GIB * GIB


def test_calibration_data_meets_the_error_targets():
    """Every GPU measurement in the repo, predicted again by this checkout's model:
    median |error| <= 5%, worst <= 10%, never more than 5% under the measured peak."""
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "scripts"))
    from calibration_report import rows, summary

    table = rows(root / "docs/benchmarks/calibration/calibration.jsonl")
    s = summary(table)
    assert s["runs"] >= 30 and s["archs"] >= 3
    assert s["median_abs_error_pct"] <= 5
    assert s["worst_abs_error_pct"] <= 10
    assert s["worst_under_prediction_pct"] <= 5, [r for r in table if r["error_pct"] < -5]


def test_fused_loss_calibration_meets_the_error_targets():
    """The fused-loss runs (docs/benchmarks/calibration/fused.jsonl), predicted again: in-sample
    (the residual was fitted on them), but a change to the fused terms that breaks them fails."""
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "scripts"))
    from calibration_report import rows, summary

    table = rows(root / "docs/benchmarks/calibration/fused.jsonl")
    s = summary(table)
    assert s["runs"] >= 10 and all(r["loss"] == "fused" for r in table)
    assert s["median_abs_error_pct"] <= 5 and s["worst_abs_error_pct"] <= 10
    assert s["worst_under_prediction_pct"] <= 5, [r for r in table if r["error_pct"] < -5]


def test_other_architectures_calibration_meets_the_error_targets():
    """Mistral, Gemma, Gemma2, Phi-3 and eager attention (docs/benchmarks/calibration/archs.jsonl),
    predicted again. Mistral QLoRA (-6.6%) and Gemma2 at 4096 tokens (-5.4%) were under until
    session 11's two slack terms (LOSS_SLACK_MIN_GIB, EAGER_SCORE_SLACK), fitted on these rows."""
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "scripts"))
    from calibration_report import rows, summary

    table = rows(root / "docs/benchmarks/calibration/archs.jsonl")
    s = summary(table)
    assert s["runs"] >= 10 and s["archs"] >= 5
    assert s["median_abs_error_pct"] <= 5 and s["worst_abs_error_pct"] <= 10
    assert s["worst_under_prediction_pct"] <= 5, [r for r in table if r["error_pct"] < -5]


def test_upcast_embeddings_costs_about_2_gib():
    base = dict(method="qlora", data={"seq_len": 512}, lora={"r": 8, "target_modules": ["q_proj", "v_proj"]})
    lo = estimate(Q7, cfg(**base, quant={"upcast_embeddings": False}))
    hi = estimate(Q7, cfg(**base, quant={"upcast_embeddings": True}))
    # fp32 instead of bf16 embeddings + lm_head: 2 extra bytes x 2 x 545M params = 2.03 GiB
    assert (hi.weights - lo.weights) / GIB == pytest.approx(2.03, abs=0.05)


@pytest.mark.parametrize("dropout, method, fused, copies", [
    (0.0, "lora", False, 1.0), (0.05, "lora", False, 1.0),  # PEFT's layers: as fitted
    (0.0, "lora", True, 0.0), (0.05, "lora", True, 0.5),  # one function; the mask's product with dropout
    (0.0, "qlora", True, 1.0), (0.05, "qlora", True, 1.0),  # bitsandbytes' own input gradient, added by autograd
])
def test_fused_lora_makes_fewer_down_proj_input_gradients(dropout, method, fused, copies):
    """speed/19-24gb-down-grad: the 24 GB guide's fused plans peaked 0.85-0.9 GiB under a
    model that counted PEFT's copies there, and speed-checks/16 measured 0.20 GiB less fused
    than PEFT with dropout, where half the term is 0.22."""
    base = dict(method=method, data={"seq_len": 1536}, kernels={"fused_loss": True, "fused_lora": fused},
                lora={"r": 128, "target_modules": "all-linear", "dropout": dropout},
                train={"micro_batch": 8, "grad_accum": 2, "grad_ckpt": True})
    c = cfg(**base)
    peft = cfg(**{**base, "kernels": {"fused_loss": True, "fused_lora": False}})
    tokens, term = 8 * 1536, memory.FUSED_RESIDUAL_PER_TOKEN_INTERMEDIATE_ADAPTED
    assert fused_residual_bytes(Q7, peft, 1536) - fused_residual_bytes(Q7, c, 1536) == pytest.approx(
        (1 - copies) * term * tokens * Q7.intermediate)
    assert estimate(Q7, c).peak <= estimate(Q7, peft).peak
    # Unadapted, there is nothing to count either way.
    q_only = {**base, "lora": {"r": 128, "target_modules": ["q_proj"], "dropout": dropout}}
    assert fused_residual_bytes(Q7, cfg(**q_only), 1536) == fused_residual_bytes(
        Q7, cfg(**{**q_only, "kernels": {"fused_loss": True, "fused_lora": False}}), 1536)


def test_breakdown_parts_sum_to_peak():
    b = estimate(Q7, cfg(), "bfloat16")
    assert b.peak == pytest.approx(sum(getattr(b, p) for p in MemoryBreakdown.PARTS))
    assert set(b.gib()) == set(MemoryBreakdown.PARTS)
    assert b.allocator_slack > 0
    assert estimate(Q7, cfg(), "float32", "cpu").cuda_context == 0


def test_full_finetune_trains_every_param():
    b = estimate(Q7, cfg(method="full"), "bfloat16")
    assert b.trainable_params == Q7.total_params
    assert b.adapters == 0
    # bf16 weights + bf16 grads + 2 x bf16 Adam moments
    assert b.weights == Q7.total_params * 2
    # The peak is the optimizer step: bf16 grads, two bf16 Adam moments and the
    # foreach step's one parameter-sized temporary (measured on 3B: -0.8% error).
    assert b.phase == "optimizer step"
    assert b.gradients == Q7.total_params * 2
    assert b.optimizer == Q7.total_params * (4 + 2)
    fused = estimate(Q7, cfg(method="full", train={"optimizer": "adamw_torch_fused"}), "bfloat16")
    assert fused.optimizer == Q7.total_params * 4
    b8 = estimate(Q7, cfg(method="full", train={"optimizer": "adamw_8bit"}), "bfloat16")
    # 8-bit moments, but the Trainer keeps nn.Embedding on 32-bit states (+ an fp32 grad copy)
    assert b8.optimizer == (Q7.total_params - Q7.embed_params) * 2 + Q7.embed_params * (8 + 4)


def test_float32_costs_more_than_bf16():
    c = cfg()
    assert estimate(Q7, c, "float32").peak > estimate(Q7, c, "bfloat16").peak


# ---------------------------------------------------------------- monotonicity


BASE = {
    "method": st.sampled_from(["full", "lora", "qlora"]),
    "ckpt": st.booleans(),
    "targets": st.sampled_from([["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj", "o_proj"], "all-linear"]),
    "dropout": st.sampled_from([0.0, 0.05]),
    "dtype": st.sampled_from(["bfloat16", "float16", "float32"]),
    "stage": st.sampled_from([0, 2, 3]),
    "gpus": st.integers(1, 8),
}


def build(method, ckpt, targets, dropout, stage, gpus, seq=512, mb=1, r=16):
    return cfg(
        method=method,
        lora={"r": r, "target_modules": targets, "dropout": dropout},
        data={"seq_len": seq},
        train={"micro_batch": mb, "grad_ckpt": ckpt},
        deepspeed={"stage": stage},
        launch={"gpus": gpus},
    )


@settings(max_examples=150, deadline=None, database=None)
@given(seq=st.integers(1, 32768), extra=st.integers(0, 32768), **BASE)
def test_longer_sequence_never_predicts_less(seq, extra, method, ckpt, targets, dropout, dtype, stage, gpus):
    a = estimate(Q7, build(method, ckpt, targets, dropout, stage, gpus, seq=seq), dtype)
    b = estimate(Q7, build(method, ckpt, targets, dropout, stage, gpus, seq=seq + extra), dtype)
    assert b.peak >= a.peak
    if a.phase == b.phase:  # the parts are what is live at the peak: comparable within one phase
        assert b.activations >= a.activations and b.logits >= a.logits


@settings(max_examples=150, deadline=None, database=None)
@given(mb=st.integers(1, 64), extra=st.integers(0, 64), **BASE)
def test_bigger_micro_batch_never_predicts_less(mb, extra, method, ckpt, targets, dropout, dtype, stage, gpus):
    a = estimate(Q7, build(method, ckpt, targets, dropout, stage, gpus, mb=mb), dtype)
    b = estimate(Q7, build(method, ckpt, targets, dropout, stage, gpus, mb=mb + extra), dtype)
    assert b.peak >= a.peak


@settings(max_examples=150, deadline=None, database=None)
@given(r=st.integers(1, 1024), extra=st.integers(0, 1024), **BASE)
def test_higher_lora_rank_never_predicts_less(r, extra, method, ckpt, targets, dropout, dtype, stage, gpus):
    a = estimate(Q7, build(method, ckpt, targets, dropout, stage, gpus, r=r), dtype)
    b = estimate(Q7, build(method, ckpt, targets, dropout, stage, gpus, r=r + extra), dtype)
    assert b.peak >= a.peak
    assert b.trainable_params >= a.trainable_params


@settings(max_examples=60, deadline=None, database=None)
@given(seq=st.integers(64, 8192), mb=st.integers(1, 8), method=st.sampled_from(["lora", "qlora", "full"]))
def test_checkpointing_never_costs_more(seq, mb, method):
    on = estimate(Q7, build(method, True, "all-linear", 0.05, 0, 1, seq=seq, mb=mb))
    off = estimate(Q7, build(method, False, "all-linear", 0.05, 0, 1, seq=seq, mb=mb))
    assert on.activations <= off.activations


# ---------------------------------------------------------------- ZeRO


@pytest.mark.parametrize("method", ["lora", "full"])
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_with_two_gpus_predicts_less_per_gpu(stage, method):
    one = estimate(Q7, cfg(method=method, deepspeed={"stage": stage}, launch={"gpus": 1}))
    two = estimate(Q7, cfg(method=method, deepspeed={"stage": stage}, launch={"gpus": 2}))
    # Less in the allocator; more outside it (NCCL's buffers, measured on 2 H200s).
    assert two.peak - two.cuda_context < one.peak - one.cuda_context
    assert two.cuda_context == pytest.approx(one.cuda_context + NCCL_GIB * GIB)
    assert two.gradients <= one.gradients and two.optimizer < one.optimizer
    assert two.world_size == 2
    if stage == 3:
        # Sharded, plus the parameters gathered whole while they compute (the same on any count).
        gathered = ZERO3_MAX_LIVE_ELEMENTS * 2
        assert two.weights - gathered == pytest.approx((one.weights - gathered) / 2)
    else:
        assert two.weights == one.weights  # ZeRO-2 keeps the whole model on every GPU


def test_plain_data_parallel_does_not_shard():
    one = estimate(Q7, cfg(launch={"gpus": 1}))
    two = estimate(Q7, cfg(launch={"gpus": 2}))
    assert two.peak - two.cuda_context == one.peak - one.cuda_context


def test_offload_moves_optimizer_and_params_off_gpu():
    z3 = estimate(Q7, cfg(deepspeed={"stage": 3}))
    off = estimate(Q7, cfg(deepspeed={"stage": 3, "offload_optimizer": True, "offload_params": True}))
    assert off.optimizer == 0
    assert off.weights < z3.weights
    assert off.peak < z3.peak


# ---------------------------------------------------------------- fit on a fake 8 GB card


def plan_for(preset, facts, shape=Q7, set_items=None, overrides=None):
    r = resolve_layers(preset, overrides=overrides, set_items=set_items)
    return build_plan(r.config, shape, facts, r.sources, preset)


def test_plan_says_when_its_steps_are_predicted_to_wait_on_the_cpu():
    # A 0.5B's launch work outweighs its GPU work (docs/benchmarks/speed-checks/13-...): its
    # speed follows the host CPU, and the plan says so; a 7B at micro-batch 16 does not wait.
    from conftest import QWEN05_CONFIG

    h200 = fake_facts(141, name="NVIDIA H200")
    lora16 = ["method=lora", "data.seq_len=512", "train.micro_batch=16", "train.grad_accum=1"]
    small = plan_for("80gb", h200, shape=shape_from_config(QWEN05_CONFIG), set_items=lora16)
    assert small.speed.cpu_bound
    assert any("predicted to wait on the CPU" in n for n in small.notes)
    big = plan_for("80gb", h200, set_items=lora16)
    assert not big.speed.cpu_bound
    assert not any("wait on the CPU" in n for n in big.notes)


def test_8gb_preset_fits_7b_on_8gb_card():
    p = plan_for("8gb", fake_facts(8), overrides={"budget_gib": 8})
    assert p.budget_gib == 8 and p.budget_source == "--budget"
    assert p.breakdown.peak_gib <= 8
    assert p.fits
    require_fit(p)  # no error
    # Without --budget the card itself is the budget.
    p = plan_for("8gb", fake_facts(8))
    assert p.budget_gib == pytest.approx(8) and p.fits and "Fake GPU" in p.budget_source


def test_24gb_preset_7b_on_8gb_raises_fit_error_with_hint():
    p = plan_for("24gb", fake_facts(8), overrides={"budget_gib": 8})
    assert not p.fits
    with pytest.raises(FitError, match=r"predicted peak \d+\.\d GiB exceeds the 8 GiB budget") as e:
        require_fit(p)
    assert e.value.exit_code == 3
    hint = e.value.hint
    assert "--set" in hint
    # The hint names a concrete change.
    assert any(s in hint for s in ("data.seq_len=", "method=qlora", "--preset", "budget of at least")), hint


def _apply_hint(preset, budget, hint, base_set=()):
    """Re-plan with the change a fit hint names: `--set k=v ...` or `--preset P`."""
    words = hint.split(" fits")[0].split()
    if words[0] == "--preset":
        return plan_for(words[1], fake_facts(budget), overrides={"budget_gib": budget})
    sets = [w for w in words if w != "--set"]
    return plan_for(preset, fake_facts(budget), overrides={"budget_gib": budget}, set_items=[*base_set, *sets])


def test_fit_hint_names_seq_len_when_shorter_sequence_fits():
    p = plan_for("24gb", fake_facts(18), overrides={"budget_gib": 18})
    assert not p.fits
    hint = suggest_fit(p)
    assert hint.startswith("--set data.seq_len="), hint
    seq = int(hint.split("=")[1].split()[0])
    assert seq < p.config.data.seq_len
    assert _apply_hint("24gb", 18, hint).fits  # ...and that change really fits


def test_fit_hint_names_qlora_when_only_quantization_fits():
    # bf16 LoRA at seq 512 on a 12 GiB budget: no sequence cut fits (weights alone are 14 GiB).
    p = plan_for("24gb", fake_facts(12), overrides={"budget_gib": 12}, set_items=["data.seq_len=512"])
    assert not p.fits
    hint = suggest_fit(p)
    assert hint.startswith("--set method=qlora fits"), hint
    assert _apply_hint("24gb", 12, hint, base_set=["data.seq_len=512"]).fits


@pytest.mark.parametrize("preset,budget", [("24gb", 8), ("80gb", 50), ("40gb", 16), ("16gb", 10)])
def test_fit_hint_suggestion_actually_fits(preset, budget):
    p = plan_for(preset, fake_facts(budget), overrides={"budget_gib": budget})
    assert not p.fits
    hint = suggest_fit(p)
    assert "fits" in hint, hint
    fixed = _apply_hint(preset, budget, hint)
    assert fixed.fits, f"{hint!r} predicts {fixed.breakdown.peak_gib:.1f} GiB > {budget}"


def test_fit_hint_never_turns_full_fine_tuning_into_an_adapter():
    # Full fine-tuning of a 7B cannot fit 24 GiB; QLoRA would, but that is a different run.
    p = plan_for("80gb", fake_facts(24), overrides={"budget_gib": 24})
    hint = suggest_fit(p)
    assert "qlora" not in hint and "lora" not in hint, hint
    assert hint.startswith("this model needs a budget of at least 5"), hint  # 51.4: full 7B, accumulated bf16 gradients at the loss


def test_fit_hint_says_needed_budget_when_nothing_fits():
    p = plan_for("8gb", fake_facts(4), overrides={"budget_gib": 4})
    assert suggest_fit(p).startswith("this model needs a budget of at least 7.")


def test_budget_is_smallest_card():
    from vramfit.hardware import GIB as HGIB
    from vramfit.hardware import GpuInfo, HardwareFacts

    big, small = fake_facts(80).gpus[0], fake_facts(24).gpus[0]
    small = GpuInfo(1, "Small", small.total_bytes, small.free_bytes, 0, (8, 9), True, ())
    facts = HardwareFacts((big, small), None, None, 64 * HGIB, 64 * HGIB, 8, None)
    p = plan_for("24gb", facts)
    assert p.budget_gib == pytest.approx(24)
    assert any("differ" in n for n in p.notes)


def test_cpu_plan_has_no_budget(no_gpu_facts):
    from vramfit.embedded import tiny_config

    p = plan_for("cpu", no_gpu_facts, shape=shape_from_config(tiny_config()))
    assert p.device == "cpu" and p.dtype == "float32"
    assert p.budget_gib is None and p.fits
    assert p.breakdown.cuda_context == 0


def test_qlora_refused_without_gpu(no_gpu_facts):
    with pytest.raises(FitError, match="qlora needs an NVIDIA GPU"):
        plan_for("8gb", no_gpu_facts)


def test_dtype_follows_card():
    assert plan_for("24gb", fake_facts(24, cc=(8, 0))).dtype == "bfloat16"
    assert plan_for("24gb", fake_facts(24, cc=(7, 5))).dtype == "float16"
    assert plan_for("24gb", fake_facts(24), set_items=["model.dtype=float32"]).dtype == "float32"


def test_multi_gpu_measurements_are_predicted():
    """The 2-GPU runs (docs/benchmarks/distributed/), largest per-rank peak, predicted again
    by this checkout's model: ZeRO-2 LoRA, ZeRO-3 full fine-tuning and QLoRA under ZeRO-3
    within 5%. QLoRA under ZeRO-3 was -33% until the 4-bit weights bitsandbytes keeps gathered
    were counted (session 9), -16% until the gather stream's cache was (session 10: taken from
    this run, so in-sample; the plan says so, see test_distributed)."""
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "scripts"))
    from calibration_report import distributed_rows

    table = distributed_rows(root / "docs/benchmarks/distributed/distributed.jsonl")
    assert {(r["zero_stage"], r["method"]) for r in table} >= {(2, "lora"), (3, "full"), (3, "qlora")}
    for r in table:
        assert abs(r["error_pct"]) <= 5, r


# ---------------------------------------------------------------- fused loss


@pytest.mark.parametrize("seq", [512, 4096, 16384])
def test_fused_loss_replaces_full_vocabulary_logits(seq):
    plain = estimate(Q7, cfg(method="qlora", data={"seq_len": seq}))
    fused = estimate(Q7, cfg(method="qlora", data={"seq_len": seq}, kernels={"fused_loss": True}))
    assert fused.peak < plain.peak
    # Without it the loss holds 12 bytes per token and vocabulary entry; with it, about
    # two chunks of logits the size of the hidden states, plus the input's gradient.
    assert fused_loss_bytes(Q7, seq, 2, False) < seq * Q7.vocab * 12 / 10
    assert fused_loss_bytes(Q7, seq, 2, False) >= seq * Q7.hidden * 2


def test_fused_loss_counts_a_trainable_head_gradient():
    assert fused_loss_bytes(Q7, 1024, 2, True) - fused_loss_bytes(Q7, 1024, 2, False) == Q7.vocab * Q7.hidden * 4


@settings(max_examples=60, deadline=None, database=None)
@given(seq=st.integers(64, 32768), mb=st.integers(1, 8))
def test_fused_loss_more_tokens_never_predicts_less(seq, mb):
    a = estimate(Q7, cfg(method="qlora", data={"seq_len": seq}, train={"micro_batch": mb}, kernels={"fused_loss": True}))
    b = estimate(Q7, cfg(method="qlora", data={"seq_len": seq + 64}, train={"micro_batch": mb}, kernels={"fused_loss": True}))
    assert b.peak >= a.peak


# ---------------------------------------------------------------- activations in host RAM


def readme_qlora(seq, offload):
    """shared/gpu/README.md's H200 runs: Qwen2.5-7B QLoRA r8 q/v, micro-batch 1, checkpointing,
    16-bit embeddings, liger-kernel, under a 7.5 GiB cap."""
    return cfg(
        method="qlora",
        lora={"r": 8, "target_modules": ["q_proj", "v_proj"]},
        data={"seq_len": seq},
        train={"micro_batch": 1, "grad_ckpt": True, "offload_activations": offload},
        kernels={"fused_loss": True},
    )


def test_known_answer_breakdown_offloaded_activations():
    """With checkpointing every layer's input is in host RAM; the GPU keeps the layer being
    recomputed, its input copied back and the next one's transfer."""
    b = estimate(Q7, readme_qlora(8192, True))
    block_input = 8192 * Q7.hidden * 2
    layer = layer_activation_bytes(Q7, readme_qlora(8192, True), 2)
    assert b.phase == "backward"
    # The recomputation's transient, or the backward's residual where larger, counts either way (memory.py).
    c = readme_qlora(8192, True)
    residual = max(fused_residual_bytes(Q7, c, 8192), layer_transient_bytes(Q7, c, 2))
    assert b.activations == pytest.approx(layer + 2 * block_input + residual)
    plain = estimate(Q7, readme_qlora(8192, False))
    assert plain.activations == pytest.approx(Q7.layers * block_input + layer + residual)
    assert (plain.peak - b.peak) / GIB == pytest.approx((Q7.layers - 2) * block_input * (1 + OTHER_SLACK) / GIB)
    # Host RAM: each input pinned, the pinned allocator rounding 56 MiB up to 64 MiB.
    assert offloaded_activation_host_bytes(Q7, readme_qlora(8192, True)) == Q7.layers * 64 * 2**20
    assert offloaded_activation_transfer_bytes(Q7, readme_qlora(8192, True)) == Q7.layers * block_input
    assert offloaded_activation_host_bytes(Q7, readme_qlora(8192, False)) == 0


def test_offloaded_activations_against_the_readme_runs():
    """The README's runs (shared/gpu/README.md) are not calibration data: they also had liger's
    norm, SwiGLU and rope kernels, which save less than transformers' own, and save_on_cpu
    around the whole forward. Seq 8192 OOMed under the 7.5 GiB cap and trained with
    activations saved on CPU at 7.91 GiB for the process; seq 16384 OOMed again. vramfit's
    own stack on the same shape measured 8.80 GiB (docs/benchmarks/savers/runs/run-qwen-8k-offload)."""
    assert estimate(Q7, readme_qlora(8192, False)).peak_gib > 7.5
    b = estimate(Q7, readme_qlora(8192, True))
    assert b.peak_gib > 7.91
    assert b.peak_gib == pytest.approx(8.80, rel=0.05)
    assert estimate(Q7, readme_qlora(16384, True)).peak_gib > 7.5


@settings(max_examples=150, deadline=None, database=None)
@given(seq=st.integers(1, 32768), mb=st.integers(1, 16), **BASE)
def test_offloaded_activations_never_predict_more_gpu_memory(seq, mb, method, ckpt, targets, dropout, dtype, stage, gpus):
    plain = build(method, ckpt, targets, dropout, stage, gpus, seq=seq, mb=mb)
    off = plain.model_copy(update={"train": plain.train.model_copy(update={"offload_activations": True})})
    a, b = estimate(Q7, plain, dtype), estimate(Q7, off, dtype)
    assert b.peak <= a.peak
    if a.phase == b.phase:
        assert b.activations <= a.activations
    assert offloaded_activation_host_bytes(Q7, off, dtype) > 0
    assert offloaded_activation_host_bytes(Q7, plain, dtype) == 0
    # On a CPU run host RAM is where the activations already are: nothing changes.
    assert estimate(Q7, off, dtype, "cpu") == estimate(Q7, plain, dtype, "cpu")


@settings(max_examples=100, deadline=None, database=None)
@given(seq=st.integers(1, 32768), extra=st.integers(0, 32768), mb=st.integers(1, 8), ckpt=st.booleans())
def test_offloaded_activations_grow_with_the_micro_batch(seq, extra, mb, ckpt):
    def at(s, m):
        return cfg(method="qlora", data={"seq_len": s}, train={"micro_batch": m, "grad_ckpt": ckpt, "offload_activations": True})

    a, b, c = at(seq, mb), at(seq + extra, mb), at(seq, mb + 1)
    assert estimate(Q7, b).peak >= estimate(Q7, a).peak
    assert offloaded_activation_host_bytes(Q7, b) >= offloaded_activation_host_bytes(Q7, a)
    assert offloaded_activation_host_bytes(Q7, c) >= offloaded_activation_host_bytes(Q7, a)
    assert offloaded_activation_transfer_bytes(Q7, b) >= offloaded_activation_transfer_bytes(Q7, a)


def test_offloaded_activation_gpu_bytes_keep_only_what_is_in_flight():
    # 28 layers, 1 unit per layer input, 10 per layer's saved activations.
    assert offloaded_activation_gpu_bytes(28, 1.0, 10.0, ckpt=True) == (1.0, 12.0)  # was (28, 38)
    assert offloaded_activation_gpu_bytes(28, 1.0, 10.0, ckpt=False) == (10.0, 10.0)  # was (280, 10)
    assert offloaded_activation_gpu_bytes(1, 1.0, 10.0, ckpt=True) == (1.0, 11.0)  # one layer: nothing to gain


def test_offloaded_activations_on_several_gpus_and_longest_example():
    two = cfg(method="qlora", data={"seq_len": 4096}, train={"offload_activations": True}, launch={"gpus": 2})
    one = cfg(method="qlora", data={"seq_len": 4096}, train={"offload_activations": True})
    # Each GPU process offloads its own micro-batch into the node's RAM.
    assert offloaded_activation_host_bytes(Q7, two) == 2 * offloaded_activation_host_bytes(Q7, one)
    # A dataset whose longest example is 1000 tokens never fills 4096.
    assert offloaded_activation_host_bytes(Q7, one, longest=1000) < offloaded_activation_host_bytes(Q7, one)


# ---------------------------------------------------------------- PEFT's fp32 upcast under autocast


def test_an_fp32_head_under_autocast_keeps_a_16_bit_copy_for_backward():
    """Why quant.upcast_embeddings costs one more head at the loss: autocast runs the fp32
    head's matmul on a 16-bit copy of its weight, and autograd saves that copy (for the
    hidden states' gradient) even though the head itself is frozen."""
    import torch
    from torch import nn

    head = nn.Linear(64, 1000, bias=False).float().requires_grad_(False)
    hidden = torch.randn(2, 8, 64, dtype=torch.bfloat16, requires_grad=True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            head(hidden)
    assert [(t.numel(), t.dtype) for t in saved] == [(64 * 1000, torch.bfloat16)]


def seed_8gb(upcast: bool) -> RunConfig:
    """The 8 GB seed guide's config: Qwen2.5-7B QLoRA nf4 + double quant, r8 q/v, dropout
    0.05, micro-batch 1, seq 512, checkpointing (shared/gpu/README.md's first rows)."""
    return cfg(
        method="qlora",
        lora={"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"]},
        quant={"upcast_embeddings": upcast},
        data={"seq_len": 512},
        train={"micro_batch": 1, "grad_accum": 32, "grad_ckpt": True},
    )


def test_fp32_upcast_against_the_measured_runs():
    up, plain = estimate(Q7, seed_8gb(True)), estimate(Q7, seed_8gb(False))
    # Plain HF on an H200 (shared/gpu/README.md): 10.48 GiB process with the upcast, 7.40
    # without: 3.08 GiB for fp32 embedding and head tables and the head's 16-bit copy.
    assert (up.peak - plain.peak) / GIB == pytest.approx(3.08, rel=0.03)
    # vramfit's own run of it (docs/benchmarks/speed/4-8gb-qlora/, uncapped): 10.31 GiB.
    assert up.peak_gib == pytest.approx(10.31, rel=0.02) and up.phase == "loss"


def test_accumulated_gradients_are_live_at_the_loss():
    """With grad_accum > 1 every micro-batch after the first reaches its loss holding the
    earlier ones' gradients. The 24 GB seed guide's config (bf16 LoRA r128 all-linear, 323M
    fp32 adapter parameters, accumulation 16) measured 23.99 GiB on an H200
    (docs/benchmarks/speed/3-24gb-lora/); without this term it was predicted 7% under."""
    seed = cfg(
        method="lora",
        model={"dtype": "bfloat16"},
        lora={"r": 128, "alpha": 32, "target_modules": "all-linear"},
        data={"seq_len": 1536},
        train={"micro_batch": 1, "grad_accum": 16, "grad_ckpt": True},
    )
    b = estimate(Q7, seed)
    assert b.phase == "loss" and b.gradients == b.trainable_params * 4
    assert b.peak_gib == pytest.approx(23.99, rel=0.03)
    one = estimate(Q7, seed.model_copy(update={"train": seed.train.model_copy(update={"grad_accum": 1})}))
    assert b.peak - one.peak == b.trainable_params * 4


def test_liger_ops_keep_one_intermediate_less_and_16bit_norm_inputs_and_yield_to_the_tiled_mlp():
    from vramfit.memory import ACT_OTHER

    plain = cfg(method="qlora", data={"seq_len": 4096})
    ops = cfg(method="qlora", data={"seq_len": 4096}, kernels={"liger_ops": True})
    saved = layer_activation_bytes(Q7, plain, 2) - layer_activation_bytes(Q7, ops, 2)
    # SwiGLU: the activation's output is never kept (the gate's and up's are); RMSNorm: its
    # 16-bit input instead of an fp32 copy, in both of the layer's norms.
    per_token = 2 * Q7.intermediate + Q7.layer_norms * Q7.hidden * (4 - 2)
    assert saved == pytest.approx(4096 * per_token * (1 + ACT_OTHER))
    tiled = cfg(method="qlora", data={"seq_len": 4096}, kernels={"tiled_mlp": True})
    both = cfg(method="qlora", data={"seq_len": 4096}, kernels={"tiled_mlp": True, "liger_ops": True})
    # Under the tiled MLP liger's SwiGLU stays off (render.py): only the norms differ.
    norms = 4096 * Q7.layer_norms * Q7.hidden * (4 - 2) * (1 + ACT_OTHER)
    assert layer_activation_bytes(Q7, tiled, 2) - layer_activation_bytes(Q7, both, 2) == pytest.approx(norms)


# ---------------------------------------------------------------- what is alive at the peak (session 8)


def _snapshot_run(name):
    run = ROOT / "docs/benchmarks/calibration/snapshots" / name
    if not run.is_dir():
        pytest.skip("no docs/ in this install")
    from vramfit.model_shape import load_shape

    shape = load_shape(str(run.parents[4] / "scripts/archs/qwen2.5-7b.json"))  # the model the run trained
    return shape, recorded(run), json.loads((run / "metrics.json").read_text())


def test_adapter_gradients_are_not_held_at_the_start_of_a_one_micro_batch_backward():
    # The allocator snapshot of the 7B QLoRA r128 all-linear plan at micro-batch 16 x 1
    # (docs/benchmarks/calibration/snapshots/q24): at its peak 27 of 28 layer inputs and no
    # adapter gradients. Measured 22.15 GiB. The backward's residual still over-predicts this
    # plan (docs/memory-model.md): by under 10%, never under.
    s7, c, m = _snapshot_run("q24")
    b = estimate(s7, c, shortest=c.data.seq_len)
    assert b.phase == "backward" and b.gradients == 0
    assert 0 < b.peak_gib / m["peak_process_gib"] - 1 < 0.10
    # With accumulation the earlier micro-batches' gradients are there all along.
    acc = c.model_copy(update={"train": c.train.model_copy(update={"micro_batch": 8, "grad_accum": 2})})
    assert estimate(s7, acc, shortest=c.data.seq_len).gradients == pytest.approx(b.trainable_params * 4)
    # Full fine-tuning makes the head's gradient as its backward starts: held throughout.
    full = cfg(method="full", data={"seq_len": 1024}, kernels={"fused_loss": True})
    assert estimate(Q7, full, shortest=1024).gradients > 0


def test_a_layers_transient_is_the_mlp_product_until_down_proj_has_run():
    c = cfg(method="qlora", data={"seq_len": 1024}, train={"micro_batch": 2}, lora={"target_modules": "all-linear"})
    tokens = 2 * 1024
    assert layer_transient_bytes(Q7, c, 2) == tokens * Q7.intermediate * 2
    # 16-bit LoRA: the same, since train.py keeps adapted inputs in 16 bits (no fp32 casts).
    assert layer_transient_bytes(Q7, c.model_copy(update={"method": "lora"}), 2) == tokens * Q7.intermediate * 2
    # Kept anyway where down_proj's adapter reads it without dropout, and under full fine-tuning.
    nodrop = c.model_copy(update={"lora": c.lora.model_copy(update={"dropout": 0.0})})
    assert layer_transient_bytes(Q7, nodrop, 2) == 0
    assert layer_transient_bytes(Q7, cfg(method="full", data={"seq_len": 1024}), 2) == 0
    # The tiled MLP makes it one chunk at a time.
    tiled = cfg(method="qlora", data={"seq_len": 16384}, kernels={"tiled_mlp": True})
    assert layer_transient_bytes(Q7, tiled, 2) == pytest.approx(16384 * Q7.intermediate * 2 / -(-16384 // Q7.hidden))


def test_the_16bit_lora_snapshot_run_held_fp32_casts_the_model_no_longer_counts():
    # docs/benchmarks/calibration/snapshots/lora24: 16-bit LoRA r128 all-linear, micro-batch 8 x 2,
    # 8-bit AdamW, 24 GiB: 23.82 GiB measured, 1.7 GiB of it PEFT's fp32 copies of down_proj's
    # input, which train.py now avoids. The model without them is under that run by about that.
    s7, c, m = _snapshot_run("lora24")
    b = estimate(s7, c, shortest=c.data.seq_len)
    casts = c.train.micro_batch * c.data.seq_len * s7.intermediate * 8 / GIB
    assert b.peak_gib < m["peak_process_gib"] < b.peak_gib + casts * 1.1


def test_async_copies_reserve_is_counted_for_the_plan_it_was_measured_on():
    # The 8 GB plan with train.offload_async pinned (two H100 runs, 7.45 and 7.46 GiB) and the
    # same plan with its copies in order (6.99, predicted 0.7% under before this term): each
    # within 2% under and 5% over its measured peak, and only the async one carries the reserve.
    runs = ROOT / "docs/benchmarks/speed-checks/16-fused-lora-and-async/ab8/runs"
    if not runs.is_dir():
        pytest.skip("no docs/ in this install")
    for name, is_async in (("run-8gb-qlora-vramfit-auto-offload-async", True), ("run-8gb-qlora-vramfit-auto", False)):
        cfg = recorded(runs / name)
        assert cfg.train.offload_async is is_async and cfg.train.offload_activations and cfg.train.grad_ckpt
        measured = json.loads((runs / name / "metrics.json").read_text())["peak_process_gib"]
        peak = estimate(Q7, cfg, "bfloat16", "cuda", shortest=cfg.data.seq_len).peak_gib
        assert measured * 0.98 <= peak <= measured * 1.05, (name, peak, measured)
        on_cpu = estimate(Q7, cfg, "bfloat16", "cpu", shortest=cfg.data.seq_len)
        assert on_cpu.allocator_slack == estimate(
            Q7, cfg.model_copy(update={"train": cfg.train.model_copy(update={"offload_async": False})}), "bfloat16", "cpu",
            shortest=cfg.data.seq_len).allocator_slack  # fmt: skip


@pytest.mark.parametrize(
    "run",
    [
        # The 8 GB plan again, on another H100 (7.465 GiB): in-sample for the term's size.
        "speed/14-dropout0-async-mb8/runs/run-8gb-qlora-vramfit-auto-offload-async",
        # Out of sample: 16-bit LoRA r128 all-linear, dropout 0, micro-batch 8 x 2 at 24 GiB,
        # embeddings and layer inputs in host RAM (20.90 GiB). Its reserve beyond the allocated
        # was 1.30 GiB (about 16 layer inputs, not 10), but the allocated it over-predicts by
        # more, so the whole is on the safe side (by 7% until session 16, 2.9% since it counts
        # fused LoRA's down_proj gradient as made once).
        "speed/14-dropout0-async-mb8/runs/run-24gb-lora-method-kept-dropout0-vramfit-auto-offload-async",
    ],
)
def test_async_copies_plans_measured_since_are_predicted_on_the_safe_side(run):
    path = ROOT / "docs/benchmarks" / run
    if not path.is_dir():
        pytest.skip("no docs/ in this install")
    cfg = recorded(path)
    assert cfg.train.offload_async and cfg.train.offload_activations and cfg.train.grad_ckpt
    measured = json.loads((path / "metrics.json").read_text())["peak_process_gib"]
    peak = estimate(Q7, cfg, "bfloat16", "cuda", shortest=cfg.data.seq_len).peak_gib
    assert measured <= peak <= measured * 1.08, (peak, measured)


def test_fused_16bit_lora_runs_are_predicted_within_a_few_percent_over():
    """Every 16-bit LoRA run with kernels.fused_lora kept in docs/benchmarks (the 24 GB guide's
    r128 all-linear plans, H100, dropout 0 and 0.05, micro-batch 4 and 8, with and without
    the layer inputs in host RAM): the model (memory.down_input_grad_copies) puts each at or
    up to 6% over its measured process peak, where it was up to 9% over."""
    import yaml

    runs = sorted((ROOT / "docs/benchmarks").rglob("metrics.json"))
    if not runs:
        pytest.skip("no docs/ in this install")
    seen = []
    for m in runs:
        if not (m.parent / "plan.yaml").is_file():
            continue
        plan = yaml.safe_load((m.parent / "plan.yaml").read_text())
        raw = plan["config"]
        if raw.get("method") != "lora" or not raw.get("kernels", {}).get("fused_lora") or plan.get("device") != "cuda":
            continue
        cfg = recorded(m.parent)
        assert (plan["shape"]["model_type"], plan["shape"]["hidden"]) == ("qwen2", Q7.hidden)
        measured = json.loads(m.read_text())["peak_process_gib"]
        peak = estimate(Q7, cfg, "bfloat16", "cuda", shortest=cfg.data.seq_len).peak_gib
        seen.append((str(m.parent.relative_to(ROOT)), cfg.lora.dropout, round(peak / measured - 1, 3)))
        assert measured <= peak <= measured * 1.06, seen[-1]
    assert len(seen) >= 8 and {d for _, d, _ in seen} == {0.0, 0.05}, seen


def test_lean_mlp_leaves_the_swiglu_product_out_of_the_backward_where_it_installs():
    """kernels.lean_mlp (lean_mlp.py): the recomputations never make liger's SwiGLU product,
    only where down_proj is an unadapted 4-bit layer and liger's SwiGLU runs."""
    from vramfit.memory import lean_mlp_skips_product

    qv = cfg(method="qlora", budget_gib=8, data={"seq_len": 512},
             lora={"r": 8, "target_modules": ["q_proj", "v_proj"]},
             train={"micro_batch": 16, "grad_accum": 2, "grad_ckpt": True, "offload_embeddings": True},
             kernels={"fused_loss": True, "liger_ops": True})  # fmt: skip
    product = 16 * 512 * Q7.intermediate * 2
    off = qv.model_copy(update={"kernels": qv.kernels.model_copy(update={"lean_mlp": False})})
    assert lean_mlp_skips_product(Q7, qv) and not lean_mlp_skips_product(Q7, off)
    on_b, off_b = estimate(Q7, qv, shortest=512), estimate(Q7, off, shortest=512)
    assert on_b.phase == off_b.phase == "backward"
    assert off_b.peak - on_b.peak == pytest.approx(product * (1 + memory.OTHER_SLACK), rel=1e-6)

    def changed(**update) -> RunConfig:
        return qv.model_copy(update={k: getattr(qv, k).model_copy(update=v) for k, v in update.items()})

    for other in (changed(lora={"target_modules": "all-linear"}),  # an adapter on down_proj reads the product
                  changed(kernels={"liger_ops": False}), changed(kernels={"tiled_mlp": True}),
                  changed(train={"grad_ckpt": False}), qv.model_copy(update={"method": "lora"})):  # fmt: skip
        assert not lean_mlp_skips_product(Q7, other)
    gemma = shape_from_config({**QWEN7B_CONFIG, "model_type": "gemma"})  # liger's GeGLU, left alone
    assert not lean_mlp_skips_product(gemma, qv)


def test_the_8gb_plan_with_and_without_the_lean_mlp_is_predicted_within_a_few_percent():
    """The same plan measured on H100s: without the skip (session 17's code, 7.465 GiB) and
    with it (session 19: 7.172, and 7.191 with the overlapped lookup). The model counts the
    product as not made where kernels.lean_mlp is on; the runs before it have no such key."""
    runs = {"speed/20-8gb-syncs/runs/run-8gb-qlora-vramfit-auto": False,
            "speed/23-8gb-ab/runs/run-8gb-qlora-vramfit-auto": True,
            "speed/23-8gb-ab/runs/run-8gb-qlora-vramfit-auto-embed-async": True}
    if not (ROOT / "docs/benchmarks/speed/23-8gb-ab").is_dir():
        pytest.skip("no docs/ in this install")
    for run, lean in runs.items():
        path = ROOT / "docs/benchmarks" / run
        c = recorded(path)
        assert c.kernels.lean_mlp is lean
        measured = json.loads((path / "metrics.json").read_text())["peak_process_gib"]
        peak = estimate(Q7, c, "bfloat16", "cuda", shortest=c.data.seq_len).peak_gib
        assert measured * 0.98 <= peak <= measured * 1.03, (run, peak, measured)

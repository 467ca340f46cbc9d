"""Auto-fit and the speed model: pure functions, fake cards (8 GB, 24 GB, 2x80 GB)."""

from __future__ import annotations

import random

import pytest

from conftest import QWEN7B_CONFIG
from vramfit.config import RunConfig
from vramfit.distributed import HOST_RAM_USABLE, offloaded_host_bytes
from vramfit.errors import FitError
from vramfit.fit import OFFLOAD_MIN_GAIN, SAFETY_MARGIN, auto_fit
from vramfit.memory import estimate
from vramfit.model_shape import shape_from_config
from vramfit.speed import OFFLOAD_PCIE_GB_S, LengthStats, estimate_speed, micro_step_seconds, micro_step_terms

Q7 = shape_from_config(QWEN7B_CONFIG)
rng = random.Random(0)
SHORT = LengthStats(tuple(rng.randint(150, 600) for _ in range(500)))
LONG = LengthStats(tuple(rng.randint(3000, 6000) for _ in range(500)))


def base(**sections) -> RunConfig:
    return RunConfig.model_validate(sections)


def fitted(budget, lengths=SHORT, pinned=(), gpus=1, **sections):
    cfg = base(launch={"gpus": gpus}, **sections)
    c, why = auto_fit(cfg, set(pinned), Q7, budget, "NVIDIA H200", lengths)
    return c, why, estimate(Q7, c, "bfloat16", "cuda", lengths.longest).peak_gib


@pytest.mark.parametrize("budget", [8, 24])
def test_plan_is_predicted_under_budget_less_margin(budget):
    c, why, peak = fitted(budget)
    assert peak <= budget * (1 - SAFETY_MARGIN)
    assert any(line.startswith("method ") for line in why)
    assert why[-1].startswith(f"predicted peak {peak:.2f} GiB of {budget} GiB")


def test_8gb_card_gets_qlora_with_checkpointing():
    c, _, _ = fitted(8)
    assert c.method == "qlora" and c.train.grad_ckpt


def test_bigger_card_trains_faster_with_a_bigger_micro_batch():
    small, _, _ = fitted(8)
    big, _, _ = fitted(24)
    assert big.train.micro_batch > small.train.micro_batch
    assert estimate_speed(Q7, big, SHORT, "H200").tokens_per_s > estimate_speed(Q7, small, SHORT, "H200").tokens_per_s


def test_effective_batch_is_kept():
    for budget in (8, 24, 80):
        c, _, _ = fitted(budget, train={"micro_batch": 1, "grad_accum": 16})
        assert c.train.micro_batch * c.train.grad_accum == 16


def test_two_80gb_gpus_keep_the_global_batch():
    c, why, peak = fitted(80, gpus=2, train={"micro_batch": 1, "grad_accum": 16})
    assert c.train.micro_batch * c.train.grad_accum * 2 == 1 * 16 * 2  # the global batch of the base
    assert c.method == "lora"  # 16-bit weights fit an 80 GB card
    assert "x 2 GPUs" in " ".join(why)


def test_pinned_keys_are_never_changed():
    c, why, _ = fitted(24, pinned={"method", "data.seq_len", "train.grad_ckpt"}, method="lora", data={"seq_len": 512},
                       train={"grad_ckpt": True})  # fmt: skip
    assert (c.method, c.data.seq_len, c.train.grad_ckpt) == ("lora", 512, True)
    assert "method lora: pinned" in why


def test_sequence_holds_the_longest_example_and_reports_truncation():
    c, why, _ = fitted(24)
    assert c.data.seq_len >= SHORT.longest
    assert "0.0% of examples truncated" in why[0]
    # Long examples on an 8 GB card: the longest length that fits, and the truncated share said.
    c, why, _ = fitted(8, lengths=LONG)
    assert c.data.seq_len < LONG.longest
    share = LONG.truncated_share(c.data.seq_len)
    assert share > 0 and f"{share:.1%} of examples truncated" in why[0]


def test_nothing_fits_names_the_smallest_budget():
    with pytest.raises(FitError, match=r"nothing fits 3 GiB.*the smallest plan needs (\d+\.\d) GiB") as e:
        fitted(3)
    need = float(e.value.args[0].split("needs ")[1].split(" GiB")[0])
    c, _, peak = fitted(need + 0.05)  # and that budget does fit
    assert peak <= (need + 0.05) * (1 - SAFETY_MARGIN)
    with pytest.raises(FitError):  # and it is the smallest: a little less fits nothing
        fitted(need / (1 + SAFETY_MARGIN) - 0.2)


# ---------------------------------------------------------------- DeepSpeed


def test_one_gpu_falls_back_to_zero3_offload_only_when_nothing_else_fits():
    c, why, _ = fitted(8)
    assert c.deepspeed.stage == 0  # QLoRA fits 8 GB: no offload
    c, why, peak = fitted(4.5)
    assert c.method == "lora" and c.deepspeed.stage == 3 and c.deepspeed.offload_params and c.deepspeed.offload_optimizer
    assert c.kernels.fused_loss  # without it the logits alone would not fit
    assert c.train.optimizer == "adamw_torch"  # what offload's CPU Adam replaces without changing
    assert any("host RAM" in line for line in why)


def test_offload_is_not_chosen_when_the_host_is_too_small():
    cfg = base(launch={"gpus": 1})
    with pytest.raises(FitError, match="nothing fits"):
        auto_fit(cfg, set(), Q7, 4.5, "NVIDIA H200", SHORT, host_ram_bytes=4 << 30)


@pytest.mark.parametrize("gpus,card,stage", [(2, 80, 0), (8, 40, 2), (8, 32, 3)])
def test_full_fine_tuning_shards_with_zero_only_as_far_as_needed(gpus, card, stage):
    # 7.6B in bf16 with torch AdamW: ~61 GB per GPU unsharded (fits 80 GB); under ZeRO,
    # DeepSpeed's fp32 master weights and moments (12 bytes each) are split 8 ways,
    # ZeRO-3 splits the weights too.
    c, why, peak = fitted(card, gpus=gpus, pinned={"method", "train.optimizer"}, method="full")
    assert c.deepspeed.stage == stage
    assert peak <= card * (1 - SAFETY_MARGIN)
    assert any(line.startswith(f"deepspeed.stage {stage}") for line in why)


def test_two_gpus_lora_prefers_the_measured_zero2_path_at_equal_speed():
    c, why, _ = fitted(80, gpus=2)
    assert c.deepspeed.stage == 2
    assert any(line.startswith("deepspeed.stage 2") for line in why)


def test_pinned_deepspeed_is_kept():
    c, why, _ = fitted(80, gpus=2, pinned={"deepspeed.stage"}, deepspeed={"stage": 0})
    assert c.deepspeed.stage == 0 and "deepspeed.stage 0: pinned" in why


def test_speed_counts_padding():
    c = base(data={"seq_len": 1024}, train={"micro_batch": 8})
    uniform = LengthStats((500,) * 100)
    spread = LengthStats(tuple([100] * 70 + [1000] * 30))
    # Same mean-ish tokens, but a spread pads most micro-batches to 1000.
    assert spread.padded(1024, 8) > 900 and uniform.padded(1024, 8) == pytest.approx(500)
    assert estimate_speed(Q7, c, spread, "H200").padded_share > 0.5


def test_unknown_gpu_is_flagged():
    assert not estimate_speed(Q7, base(), SHORT, "Mystery Accelerator").gpu_known
    assert estimate_speed(Q7, base(), SHORT, "NVIDIA H100 80GB HBM3").gpu_known


def test_offloaded_activations_cost_their_pcie_copies():
    """Each layer's input goes to host RAM in the forward and back in the backward, at
    speed.OFFLOAD_PCIE_GB_S (an effective rate from H200 runs). With checkpointing the copies
    run beside the compute (speed.combine): they cost something, less than their own time."""
    plain = base(method="qlora", data={"seq_len": 8192}, train={"grad_ckpt": True})
    off = base(method="qlora", data={"seq_len": 8192}, train={"grad_ckpt": True, "offload_activations": True})
    copies = 2 * Q7.layers * 8192 * Q7.hidden * 2 / (OFFLOAD_PCIE_GB_S * 1e9)
    assert micro_step_terms(Q7, off, 8192, 989.0)["offload_checkpointed"] == pytest.approx(copies)
    added = micro_step_seconds(Q7, off, 8192, 989.0) - micro_step_seconds(Q7, plain, 8192, 989.0)
    assert 0 < added < copies
    assert estimate_speed(Q7, off, LONG, "H200").tokens_per_s < estimate_speed(Q7, plain, LONG, "H200").tokens_per_s
    # Copies at the padded length, not seq_len: short examples move less.
    assert micro_step_terms(Q7, off, 1024, 989.0)["offload_checkpointed"] == pytest.approx(copies / 8)


def test_without_checkpointing_the_offloaded_copies_add():
    """Every saved tensor goes to host RAM and the backward waits for each to come back."""
    plain = base(method="qlora", data={"seq_len": 2048}, train={"grad_ckpt": False})
    off = base(method="qlora", data={"seq_len": 2048}, train={"grad_ckpt": False, "offload_activations": True})
    copies = micro_step_terms(Q7, off, 2048, 989.0)["offload_activations"]
    assert copies > 0 and micro_step_terms(Q7, off, 2048, 989.0)["offload_checkpointed"] == 0
    added = micro_step_seconds(Q7, off, 2048, 989.0) - micro_step_seconds(Q7, plain, 2048, 989.0)
    assert added == pytest.approx(copies)


# ---------------------------------------------------------------- activations in host RAM

FUSED = {"pinned": {"kernels.fused_loss"}, "kernels": {"fused_loss": True}}
# The fused loss pinned on and the other savers pinned off: what activation offload alone buys
# (with the embedding table in host RAM and the tiled MLP the longest example fits without it).
FUSED_ONLY = {
    "pinned": {"kernels.fused_loss", "kernels.tiled_mlp", "train.offload_embeddings"},
    "kernels": {"fused_loss": True, "tiled_mlp": False},
    "train": {"offload_embeddings": False},
}


def test_8gb_card_keeps_activations_in_host_ram_to_reach_a_longer_sequence():
    # With the fused loss the logits are small, so the layers' inputs weigh on the length:
    # 28 x 3072 tokens x 3584 x 2 bytes = 0.6 GiB that an 8 GB card cannot also hold.
    # Since the two H200 runs without checkpointing (docs/benchmarks/speed/2-max-context/), every
    # saved tensor in host RAM reaches the longest example here (6016), where checkpointed
    # layer inputs alone reached 3072.
    c, why, peak = fitted(8, lengths=LONG, **FUSED_ONLY)
    assert c.train.offload_activations
    assert c.data.seq_len == 6016 and "0.0% of examples truncated" in why[0]
    assert peak <= 8 * (1 - SAFETY_MARGIN)
    line = next(x for x in why if x.startswith("train.offload_activations"))
    assert line.startswith("train.offload_activations true: saved activations in host RAM")
    assert "without it the longest that fits is seq 1536" in line and "of the speed" in line
    plain = c.model_copy(update={"train": c.train.model_copy(update={"offload_activations": False})})
    assert estimate(Q7, plain, "bfloat16", "cuda", LONG.longest).peak_gib > 8 * (1 - SAFETY_MARGIN)
    assert estimate_speed(Q7, c, LONG, "H200").tokens_per_s < estimate_speed(Q7, plain, LONG, "H200").tokens_per_s


def test_activations_stay_on_the_gpu_when_the_longest_sequence_fits():
    # They cost PCIe copies: where the longest sequence fits without them and they buy no
    # clearly faster plan, they stay on the GPU. (On 8 GB with short examples they buy
    # micro-batch 8 instead of 4: the next test's case.)
    for budget, lengths in ((24, LONG), (24, SHORT)):
        c, why, _ = fitted(budget, lengths=lengths, **FUSED)
        assert not c.train.offload_activations
        assert f"train.offload_activations false: not needed: seq {c.data.seq_len} fits without it, and it buys no plan 5% faster" in why


def test_activations_in_host_ram_for_a_bigger_micro_batch_when_it_clearly_pays():
    # The 8 GB speed benchmark: every example 512 tokens, effective batch 32, the fused loss
    # and liger's ops (where liger-kernel is installed auto-fit turns them on). Checkpointed
    # layer inputs in host RAM free enough for micro-batch 16, predicted far faster than the
    # 8 the GPU holds with them on it; the copies cost a few percent.
    full = LengthStats((512,) * 64)
    qv = {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]}  # the 8 GB guide's adapter
    liger = {"pinned": {"kernels.fused_loss", "kernels.liger_ops"}, "kernels": {"fused_loss": True, "liger_ops": True}}
    c, why, peak = fitted(8, lengths=full, train={"micro_batch": 1, "grad_accum": 32}, lora=qv, **liger)
    assert c.train.offload_activations and c.train.grad_ckpt and peak <= 8 * (1 - SAFETY_MARGIN)
    line = next(x for x in why if x.startswith("train.offload_activations"))
    assert "so a faster plan fits" in line and "with them on the GPU" in line
    on_gpu, _, _ = fitted(8, lengths=full, pinned=liger["pinned"] | {"train.offload_activations"},
                          train={"micro_batch": 1, "grad_accum": 32}, lora=qv, kernels=liger["kernels"])  # fmt: skip
    assert on_gpu.train.micro_batch < c.train.micro_batch
    fast, slow = (estimate_speed(Q7, x, full, "H200").tokens_per_s for x in (c, on_gpu))
    assert fast > slow * (1 + OFFLOAD_MIN_GAIN)


def test_activations_stay_on_the_gpu_for_a_gain_within_the_speed_models_error():
    # 8 GB, plain loss: without checkpointing, every saved tensor in host RAM is predicted
    # no faster than checkpointing them on the GPU (the copies cost what recomputation
    # does): below the gain that would be worth the RAM.
    c, why, _ = fitted(8)
    assert c.train.grad_ckpt and not c.train.offload_activations
    moved = c.model_copy(update={"train": c.train.model_copy(update={"grad_ckpt": False, "offload_activations": True})})
    assert estimate(Q7, moved, "bfloat16", "cuda", SHORT.longest).peak_gib <= 8 * (1 - SAFETY_MARGIN)
    gain = estimate_speed(Q7, moved, SHORT, "H200").tokens_per_s / estimate_speed(Q7, c, SHORT, "H200").tokens_per_s - 1
    assert gain < OFFLOAD_MIN_GAIN


def test_activations_in_host_ram_only_where_they_reach_further():
    # Without the fused loss the logits decide the length on 8 GB: offload gains nothing.
    c, why, _ = fitted(8, lengths=LONG)
    assert not c.train.offload_activations
    assert "train.offload_activations false: it fits no longer sequence" in why


def test_activations_pinned_off_are_never_offloaded():
    c, why, _ = fitted(8, lengths=LONG, pinned={*FUSED_ONLY["pinned"], "train.offload_activations"},
                       kernels=FUSED_ONLY["kernels"], train={"offload_embeddings": False, "offload_activations": False})  # fmt: skip
    assert not c.train.offload_activations and c.data.seq_len == 1536
    assert "train.offload_activations false: pinned" in why


def test_activations_are_not_offloaded_into_too_little_host_ram():
    cfg = base(kernels={"fused_loss": True})
    c, _ = auto_fit(cfg, {"kernels.fused_loss"}, Q7, 8, "NVIDIA H200", LONG, host_ram_bytes=1 << 30)
    # Whatever it keeps in host RAM fits the host; the longest example does not get there.
    assert offloaded_host_bytes(Q7, c, "bfloat16", LONG.longest) <= (1 << 30) * HOST_RAM_USABLE
    assert c.data.seq_len < LONG.longest


# ---------------------------------------------------------------- the fused loss


def test_fused_loss_is_chosen_only_where_it_buys_a_faster_plan():
    # 24 GiB: the 7B's full-vocabulary logits cap the micro-batch; without them a bigger
    # one fits, so the fused loss is on and says why.
    cfg = base(launch={"gpus": 1})
    c, why = auto_fit(cfg, set(), Q7, 24, "NVIDIA H200", SHORT, fused_available=True)
    plain, _ = auto_fit(cfg, set(), Q7, 24, "NVIDIA H200", SHORT)
    assert c.kernels.fused_loss and not plain.kernels.fused_loss
    fast = estimate_speed(Q7, c, SHORT, "NVIDIA H200").tokens_per_s
    assert fast > estimate_speed(Q7, plain, SHORT, "NVIDIA H200").tokens_per_s
    assert any(x.startswith("kernels.fused_loss true: no full-vocabulary logits") for x in why)
    # Where it buys nothing (a huge card: everything fits either way) it stays off.
    c, why = auto_fit(cfg, set(), Q7, 400, "NVIDIA H200", SHORT, fused_available=True)
    assert not c.kernels.fused_loss and "kernels.fused_loss false: it would fit nothing faster here" in why


def test_fused_loss_is_not_chosen_for_an_architecture_liger_lacks_or_when_pinned():
    cfg = base(launch={"gpus": 1})
    other = shape_from_config({**QWEN7B_CONFIG, "model_type": "gpt_neox_like"})
    c, _ = auto_fit(cfg, set(), other, 24, "NVIDIA H200", SHORT, fused_available=True)
    assert not c.kernels.fused_loss
    c, why = auto_fit(cfg, {"kernels.fused_loss"}, Q7, 24, "NVIDIA H200", SHORT, fused_available=True)
    assert not c.kernels.fused_loss and "kernels.fused_loss false: pinned" in why


def test_liger_ops_are_on_where_liger_knows_the_architecture_unless_pinned():
    cfg = base(launch={"gpus": 1})
    on, why = auto_fit(cfg, set(), Q7, 8, "NVIDIA H200", SHORT, fused_available=True)
    assert on.kernels.liger_ops
    assert any(x.startswith("kernels.liger_ops true: liger's fused RMSNorm, SwiGLU and RoPE") for x in why)
    off, why = auto_fit(cfg, {"kernels.liger_ops"}, Q7, 8, "NVIDIA H200", SHORT, fused_available=True)
    assert not off.kernels.liger_ops and "kernels.liger_ops false: pinned" in why
    # Without liger-kernel where the plan is made (fused_available False) it stays off.
    assert not auto_fit(cfg, set(), Q7, 8, "NVIDIA H200", SHORT)[0].kernels.liger_ops
    # Less memory and less time like for like: never a worse plan.
    plain = on.model_copy(update={"kernels": on.kernels.model_copy(update={"liger_ops": False})})
    assert estimate(Q7, on, "bfloat16", "cuda").peak < estimate(Q7, plain, "bfloat16", "cuda").peak
    assert estimate_speed(Q7, on, SHORT, "H200").tokens_per_s > estimate_speed(Q7, plain, SHORT, "H200").tokens_per_s


def test_adapters_get_8bit_optimizer_states_only_where_they_buy_a_faster_plan():
    # The 24 GB guide's adapter (r128 all-linear: 323M parameters) on 16-bit weights at
    # 24 GiB: torch AdamW's fp32 moments (2.4 GiB) push the plan to host copies (embeddings,
    # activations) or a smaller micro-batch; 8-bit ones (0.6 GiB) fit a faster plan without
    # them, so the planner takes them and says why.
    full = LengthStats((1 << 20,))
    cfg = base(method="lora", lora={"r": 128, "target_modules": "all-linear"}, data={"seq_len": 1536}, launch={"gpus": 1})
    pinned = {"method", "lora.r", "lora.target_modules", "data.seq_len"}
    c, why = auto_fit(cfg, pinned, Q7, 24, "NVIDIA H200", full, fused_available=True)
    assert c.train.optimizer == "adamw_8bit"
    torch_adam, _ = auto_fit(cfg, pinned | {"train.optimizer"}, Q7, 24, "NVIDIA H200", full, fused_available=True)
    assert torch_adam.train.optimizer == "adamw_torch"
    assert estimate_speed(Q7, c, full, "H200").tokens_per_s > estimate_speed(Q7, torch_adam, full, "H200").tokens_per_s
    assert estimate(Q7, c, "bfloat16", "cuda").peak <= 24 * 0.95 * 2**30
    assert any(x.startswith("train.optimizer adamw_8bit: 8-bit optimizer states, so a faster plan fits") for x in why)
    # A small adapter's states weigh nothing: at equal speed torch AdamW, the calibrated one.
    small, why = auto_fit(base(launch={"gpus": 1}), set(), Q7, 24, "NVIDIA H200", SHORT, fused_available=True)
    assert small.train.optimizer == "adamw_torch" and "train.optimizer adamw_torch" in why


def test_fused_lora_is_on_by_default_kept_by_auto_fit_and_explained():
    # On by default (config.py): auto-fit keeps it and says what the speed model makes of it;
    # a user's pin off is kept too, and then there is nothing to explain.
    cfg = base(method="lora", launch={"gpus": 1})
    assert cfg.kernels.fused_lora
    c, why = auto_fit(cfg, {"method"}, Q7, 24, "NVIDIA H200", SHORT, fused_available=True)
    line = next(x for x in why if x.startswith("kernels.fused_lora true: the default"))
    assert c.kernels.fused_lora and "with PEFT's layers as they are" in line
    off = cfg.model_copy(update={"kernels": cfg.kernels.model_copy(update={"fused_lora": False})})
    c, why = auto_fit(off, {"method", "kernels.fused_lora"}, Q7, 24, "NVIDIA H200", SHORT, fused_available=True)
    assert not c.kernels.fused_lora and not any("fused_lora" in x for x in why)
    c, why = auto_fit(cfg, {"method", "kernels.fused_lora"}, Q7, 24, "NVIDIA H200", SHORT, fused_available=True)
    assert any(x.startswith("kernels.fused_lora true: pinned") for x in why)
    # Under ZeRO-3 PEFT's layers run: no such line.
    z3 = cfg.model_copy(update={"deepspeed": cfg.deepspeed.model_copy(update={"stage": 3}),
                                "launch": cfg.launch.model_copy(update={"gpus": 2})})  # fmt: skip
    _, why = auto_fit(z3, {"method", "deepspeed.stage"}, Q7, 24, "NVIDIA H200", SHORT, fused_available=True)
    assert not any("fused_lora" in x for x in why)


def test_no_line_quotes_a_faster_plan_than_the_one_chosen():
    # The 24 GB guide's method kept with dropout 0 (session 14): a plan with the layer inputs
    # in host RAM is predicted under 5% faster, so the on-GPU plan is chosen. The other lines
    # quoted that passed-over plan's 11,913 tokens/s as "with every layer checkpointed" and
    # "without" the host-RAM embeddings, beside a chosen plan of 11,347.
    import re

    # (Session 14's planner: without lean recomputation, copies on the compute stream. Since
    # session 15 the host-RAM plan with async copies is predicted 9% faster and is chosen.)
    kept = {"method": "lora", "data": {"seq_len": 1536}, "lora": {"r": 128, "dropout": 0.0, "target_modules": "all-linear"},
            "kernels": {"lean_recompute": False}}  # fmt: skip
    cfg = base(**kept)
    pinned = {"method", "data.seq_len", "lora.r", "lora.dropout", "lora.target_modules", "kernels.lean_recompute", "train.offload_async"}
    c, why = auto_fit(cfg, pinned, Q7, 24, "NVIDIA H100 80GB HBM3", LengthStats((1 << 20,)), fused_available=True)
    chosen = estimate_speed(Q7, c, LengthStats((1 << 20,)), "NVIDIA H100 80GB HBM3").tokens_per_s
    assert not c.train.offload_activations
    # A faster plan with the inputs in host RAM existed, and was passed over.
    host, _ = auto_fit(base(**kept, train={"offload_activations": True}),
                       pinned | {"train.offload_activations"}, Q7, 24, "NVIDIA H100 80GB HBM3", LengthStats((1 << 20,)),
                       fused_available=True)  # fmt: skip
    faster = estimate_speed(Q7, host, LengthStats((1 << 20,)), "NVIDIA H100 80GB HBM3").tokens_per_s
    assert chosen < faster < chosen * (1 + OFFLOAD_MIN_GAIN)
    quoted = [int(x.replace(",", "")) for line in why for x in re.findall(r"\d{1,3}(?:,\d{3})+", line)]
    assert quoted and max(quoted) <= round(chosen)


H100_RUNS = [  # H100 SXM runs (path, file prefix); none among the pairs GPU_MEASURED_RELATIVE comes from
    # session 14
    "speed/13-dropout0-and-async/runs/run-8gb-qlora-vramfit-auto/",
    "speed/13-dropout0-and-async/runs/run-24gb-lora-method-kept-dropout0-vramfit-auto/",
    "speed/14-dropout0-async-mb8/runs/run-8gb-qlora-vramfit-auto/",
    "speed/14-dropout0-async-mb8/runs/run-24gb-lora-method-kept-dropout0-vramfit-auto/",
    "speed/14-dropout0-async-mb8/runs/run-24gb-lora-method-kept-dropout0-vramfit-auto-offload-async/",
    # session 15: lean recomputation, async copies chosen by auto-fit. Not the 4-step async run
    # at seq 8192 (16-8gb-async-auto/long/async-true-): its second step, a third of its window,
    # ran 26% slower than the two after it.
    "speed-checks/18-lean-recompute/direct/mb4-lean-off-",
    "speed-checks/18-lean-recompute/direct/mb4-lean-on-",
    "speed-checks/18-lean-recompute/direct/mb8-async-lean-on-",
    "speed-checks/18-lean-recompute/runs/run-24gb-lora-method-kept-dropout0-vramfit-auto/",
    "speed/16-8gb-async-auto/runs/run-8gb-qlora-vramfit-auto/",
    "speed/16-8gb-async-auto/long/async-false-",
    # session 19: the 8 GB plan with the lookup in line and overlapped (the speed model leaves
    # the overlapped one out of the step), 4.9% and 5.8% under.
    "speed/23-8gb-ab/runs/run-8gb-qlora-vramfit-auto/",
    "speed/23-8gb-ab/runs/run-8gb-qlora-vramfit-auto-embed-async/",
]


@pytest.mark.parametrize("run", H100_RUNS)
def test_h100_plans_are_predicted_within_6_percent(run):
    # The H200-fitted speed model over-predicted session 14's runs by 3-8% on an H100 before
    # its measured relative speed (0.94) was applied. Session 15's: the worst are the 24 GB
    # r128 plans, micro-batch 4 x 4 with lean recomputation 5.7% under (the skipped multiply
    # saved more than its modelled time), 8 x 2 with the inputs in host RAM 5.2% over.
    import json
    import sys
    from pathlib import Path

    import yaml

    from vramfit.speed import measured_relative

    path = f"{Path(__file__).resolve().parents[1] / 'docs/benchmarks'}/{run}"  # a folder/ or a file prefix
    if not Path(path).parent.is_dir():
        pytest.skip("no docs/ in this install")
    plan = yaml.safe_load(Path(f"{path}plan.yaml").read_text())
    # As the run behaved: runs from before kernels.lean_recompute existed recomputed every
    # multiply, and before session 19 the embedding lookup ran in line (calibrate_memory.as_recorded).
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from calibrate_memory import as_recorded

    cfg = RunConfig.model_validate(as_recorded(plan["config"]))
    measured = json.loads(Path(f"{path}metrics.json").read_text())
    assert measured["device"] == "NVIDIA H100 80GB HBM3" and measured_relative(measured["device"]) < 1
    predicted = estimate_speed(Q7, cfg, LengthStats((1 << 20,)), measured["device"]).tokens_per_s
    assert abs(predicted / measured["steady_tokens_per_s"] - 1) < 0.06, (predicted, measured["steady_tokens_per_s"])


def test_auto_fit_takes_async_copies_where_they_pay_and_fit_and_keeps_a_pin():
    # The 8 GB plan (the 8 GB guide's adapter and batch): the inputs in host RAM, async copies
    # chosen for their credited gain, with the allocator's reserve inside the budget.
    full = LengthStats((1 << 20,))
    guide = {"method": "qlora", "data": {"seq_len": 512}, "train": {"micro_batch": 1, "grad_accum": 32},
             "lora": {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]}}  # fmt: skip
    pinned = {"method", "data.seq_len", "lora.r", "lora.alpha", "lora.target_modules"}
    c, why = auto_fit(base(**guide), pinned, Q7, 8, "NVIDIA H100 80GB HBM3", full, fused_available=True)
    assert c.train.offload_activations and c.train.offload_async and c.train.grad_ckpt
    assert estimate(Q7, c, "bfloat16", "cuda", 512, 512).peak_gib <= 8 * (1 - SAFETY_MARGIN)
    line = next(x for x in why if x.startswith("train.offload_async true: chosen"))
    sync = estimate_speed(Q7, c.model_copy(update={"train": c.train.model_copy(update={"offload_async": False})}), full,
                          "NVIDIA H100 80GB HBM3").tokens_per_s  # fmt: skip
    assert f"{sync:,.0f} on the compute stream" in line
    # Pinned off, it stays off; at the longest sequence the 8 GiB card trains, the reserve (ten
    # layer inputs) does not fit beside it, and the copies stay in order.
    off = base(**{**guide, "train": {"micro_batch": 1, "grad_accum": 32, "offload_async": False}})
    c, why = auto_fit(off, pinned | {"train.offload_async"}, Q7, 8, "NVIDIA H100 80GB HBM3", full, fused_available=True)
    assert c.train.offload_activations and not c.train.offload_async and not any("offload_async" in x for x in why)
    long = {**guide, "data": {"seq_len": 16384}, "train": {"micro_batch": 1, "grad_accum": 1}}
    c, _ = auto_fit(base(**long), pinned, Q7, 8, "NVIDIA H100 80GB HBM3", full, fused_available=True)
    assert c.train.offload_activations and not c.train.offload_async


def test_lean_recompute_is_explained_where_it_applies():
    full = LengthStats((1 << 20,))
    kept = {"method": "lora", "data": {"seq_len": 1536}, "lora": {"r": 128, "dropout": 0.0, "target_modules": "all-linear"}}
    pinned = {"method", "data.seq_len", "lora.r", "lora.dropout", "lora.target_modules"}
    c, why = auto_fit(base(**kept), pinned, Q7, 24, "NVIDIA H100 80GB HBM3", full, fused_available=True)
    line = next(x for x in why if x.startswith("kernels.lean_recompute true: the default"))
    off = estimate_speed(Q7, c.model_copy(update={"kernels": c.kernels.model_copy(update={"lean_recompute": False})}), full,
                         "NVIDIA H100 80GB HBM3").tokens_per_s  # fmt: skip
    assert c.train.grad_ckpt and f"{off:,.0f} without" in line
    # q/v adapters leave down_proj unadapted: nothing to skip, no line.
    qv = {**kept, "lora": {"r": 8, "target_modules": ["q_proj", "v_proj"]}}
    _, why = auto_fit(base(**qv), pinned, Q7, 24, "NVIDIA H100 80GB HBM3", full, fused_available=True)
    assert not any("lean_recompute" in x for x in why)
    # The offload line never quotes a negative PCIe cost (the async credit against the copies' own)
    c, why = auto_fit(base(**kept), pinned, Q7, 24, "NVIDIA H100 80GB HBM3", full, fused_available=True)
    line = next(x for x in why if x.startswith("train.offload_activations true"))
    assert c.train.offload_async and "~-" not in line and "its copies run beside the compute" in line

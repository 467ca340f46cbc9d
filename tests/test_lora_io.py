"""The speed model's LoRA term (speed.lora_io_gb): the bytes LoRA's memory-bound kernels move,
PEFT's and kernels.fused_lora's, and where the fused count applies."""

from __future__ import annotations


def _cfg(**over):
    from vramfit.config import RunConfig

    base = {"method": "lora", "lora": {"r": 128, "target_modules": "all-linear", "dropout": 0.05},
            "data": {"seq_len": 1536}, "train": {"micro_batch": 8, "grad_accum": 2, "grad_ckpt": True}}  # fmt: skip
    for key, value in over.items():
        if "__" in key:
            section, name = key.split("__")
            base.setdefault(section, {})[name] = value
        else:
            base[key] = value
    return RunConfig.model_validate(base)


def test_the_speed_model_counts_less_lora_traffic_fused_and_without_dropout():
    from vramfit.speed import lora_io_bytes

    for drop in (False, True):
        fused, peft = lora_io_bytes(3584, 18944, drop, "fused"), lora_io_bytes(3584, 18944, drop, "peft")
        branch, peft4 = lora_io_bytes(3584, 18944, drop, "branch"), lora_io_bytes(3584, 18944, drop, "peft4bit")
        assert fused[0] < peft[0] and fused[1] < peft[1]
        assert branch[0] < peft4[0] and branch[1] < peft4[1]
        assert sum(fused) < sum(branch)  # the 16-bit function also joins the input gradients
    assert sum(lora_io_bytes(3584, 512, True, "peft")) > sum(lora_io_bytes(3584, 512, False, "peft"))
    # PEFT's output-wide mul and add are what fusing removes: 12 output-wide bytes per token
    # forward, 4 fused; PEFT's 4-bit layer clones the base output too (4 more).
    assert lora_io_bytes(1, 1000, False, "peft")[0] - lora_io_bytes(1, 1000, False, "fused")[0] == 8000
    assert lora_io_bytes(1, 1000, False, "peft4bit")[0] - lora_io_bytes(1, 1000, False, "peft")[0] == 4000


def test_fused_lora_is_predicted_faster_only_where_train_py_applies_it():
    from conftest import QWEN7B_CONFIG
    from vramfit.model_shape import shape_from_config
    from vramfit.speed import estimate_speed, step_features

    shape = shape_from_config(QWEN7B_CONFIG)

    def rate(**over):
        return estimate_speed(shape, _cfg(kernels__fused_loss=True, **over), None, "NVIDIA H200").tokens_per_s

    assert rate(kernels__fused_lora=True) > rate(kernels__fused_lora=False) * 1.05
    assert rate(method="qlora", kernels__fused_lora=True) > rate(method="qlora", kernels__fused_lora=False)
    # ZeRO-3 keeps PEFT's layers: nothing changes.
    assert rate(deepspeed__stage=3, kernels__fused_lora=True) == rate(deepspeed__stage=3, kernels__fused_lora=False)
    # Recomputation repeats the forward's traffic; full fine-tuning has none.
    f = lambda **o: step_features(shape, _cfg(**o), 1536, 989.0)["lora_io"]  # noqa: E731
    assert f(train__grad_ckpt=True) > f(train__grad_ckpt=False) > 0
    assert f(method="full") == 0


def test_lean_recompute_is_predicted_only_where_train_py_applies_it():
    from conftest import QWEN7B_CONFIG
    from vramfit.model_shape import shape_from_config
    from vramfit.speed import estimate_speed, lean_recompute_params

    shape = shape_from_config(QWEN7B_CONFIG)
    down = shape.intermediate * shape.hidden

    def rate(**over):
        return estimate_speed(shape, _cfg(kernels__fused_loss=True, **over), None, "NVIDIA H200").tokens_per_s

    assert lean_recompute_params(shape, _cfg()) == down
    assert rate() > rate(kernels__lean_recompute=False) * 1.03  # r128 all-linear, every layer recomputed
    assert rate(method="qlora") > rate(method="qlora", kernels__lean_recompute=False)
    # Where train.py leaves it out, nothing changes: no recomputation, PEFT's layers, down_proj
    # not adapted, the tiled MLP, or a layer that reads down_proj's output (gemma2).
    for over in ({"train__grad_ckpt": False}, {"kernels__fused_lora": False}, {"kernels__tiled_mlp": True},
                 {"lora__target_modules": ["q_proj", "v_proj"]}, {"deepspeed__stage": 3}):  # fmt: skip
        assert lean_recompute_params(shape, _cfg(**over)) == 0, over
        assert rate(**over) == rate(**over, kernels__lean_recompute=False), over
    gemma2 = shape_from_config({**QWEN7B_CONFIG, "model_type": "gemma2"})
    assert lean_recompute_params(gemma2, _cfg()) == 0

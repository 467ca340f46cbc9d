"""Architectures beyond qwen2/llama: parameter counts read from config.json, LoRA target
names on fused layers (phi3), and the attention implementation's memory (eager, gemma2)."""

from __future__ import annotations

import json

import pytest

from conftest import QWEN05_CONFIG, REPO
from vramfit.config import RunConfig
from vramfit.errors import ConfigError, FitError, ModelError
from vramfit.hardware import fake_facts
from vramfit.kernels import NO_SDPA_MODEL_TYPES
from vramfit.memory import ACT_OTHER, LOSS_BYTES, eager_attention_bytes, estimate, layer_activation_bytes
from vramfit.model_shape import shape_from_config
from vramfit.plan import build_plan
from vramfit.render import write_run_dir

ARCHS = sorted(p.stem for p in (REPO / "scripts/archs").glob("*.json"))
QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]


def arch(name: str) -> dict:
    return json.loads((REPO / f"scripts/archs/{name}.json").read_text())


def published(name: str) -> dict:
    """The hub's config.json: Gemma's says nothing of tie_word_embeddings (tied by default)."""
    cfg = arch(name)
    if name.startswith("gemma"):
        del cfg["tie_word_embeddings"]
    return cfg


def cfg(**sections) -> RunConfig:
    return RunConfig.model_validate(sections)


# ---------------------------------------------------------------- parameter counts

# sum(p.numel()) of transformers' model built from the published config.json (meta device).
TOTAL_PARAMS = {
    "mistral-7b": 7_248_023_552,
    "gemma-2b": 2_506_172_416,  # tied 256k x 2048 embedding, head_dim 256 != 2048 / 8
    "gemma2-2b": 2_614_341_888,  # four norms per block
    "phi3-mini": 3_821_079_552,  # fused qkv_proj and gate_up_proj
}


@pytest.mark.parametrize("name", sorted(TOTAL_PARAMS))
def test_total_params_of_published_configs(name):
    shape = shape_from_config(published(name))
    assert shape.total_params == TOTAL_PARAMS[name]
    assert shape == shape_from_config(arch(name))  # scripts/archs says the same explicitly


def test_gemma_shapes():
    g, g2 = shape_from_config(published("gemma-2b")), shape_from_config(published("gemma2-2b"))
    assert g.tied and g.head_params == 0 and g.head_dim == 256 and g.kv_heads == 1
    assert g2.tied and g2.layer_norms == 4 and g2.attn_softcap and g2.final_softcap
    assert not g.attn_softcap and not g.final_softcap and g.layer_norms == 2


@pytest.mark.parametrize("name", ARCHS)
def test_shape_matches_transformers_model(name):
    """Every scripts/archs config against the model transformers builds from it."""
    torch = pytest.importorskip("torch")
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = arch(name)
    kw = {k: v for k, v in raw.items() if k not in ("architectures", "torch_dtype", "model_type")}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(raw["model_type"], **kw))
    shape = shape_from_config(raw)
    assert shape.total_params == sum(p.numel() for p in model.parameters())
    linears = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert linears - {"lm_head"} == set(shape.layer_linears())


# PEFT's trainable parameters for r=16 on the meta-device model.
LORA_R16 = [
    ("phi3-mini", QKVO, 9_437_184),
    ("phi3-mini", "all-linear", 25_165_824),
    ("gemma2-2b", "all-linear", 20_766_720),
    ("gemma-2b", ["q_proj", "v_proj"], 1_843_200),
    ("mistral-7b", "all-linear", 41_943_040),
]


@pytest.mark.parametrize("name,targets,expected", LORA_R16)
def test_lora_params_match_peft(name, targets, expected):
    assert shape_from_config(arch(name)).lora_params(16, targets) == expected


# ---------------------------------------------------------------- fused targets (phi3)

PHI3 = shape_from_config(arch("phi3-mini"))


def test_phi3_resolves_separate_projection_names_to_its_fused_layers():
    assert PHI3.resolve_targets(QKVO) == ["qkv_proj", "o_proj"]
    assert PHI3.resolve_targets(["gate_proj", "up_proj", "down_proj"]) == ["gate_up_proj", "down_proj"]
    assert PHI3.resolve_targets(["qkv_proj", "q_proj", "k_proj", "v_proj"]) == ["qkv_proj"]
    assert PHI3.resolve_targets("all-linear") == "all-linear"
    assert PHI3.unknown_targets(QKVO) == [] and PHI3.split_fused_targets(QKVO) == []
    llama = shape_from_config(arch("llama-3.1-8b"))
    assert llama.resolve_targets(QKVO) == QKVO and llama.split_fused_targets(["q_proj"]) == []


def phi3_plan(targets, facts=None):
    c = cfg(lora={"target_modules": targets})
    return build_plan(c, PHI3, facts or fake_facts(24))


def test_phi3_plan_with_qkvo_adapts_qkv_proj(tmp_path):
    plan = phi3_plan(QKVO)
    assert any("qkv_proj, o_proj" in n for n in plan.notes)
    assert plan.breakdown.trainable_params == PHI3.lora_params(16, ["qkv_proj", "o_proj"])
    run_dir = write_run_dir(plan, tmp_path / "run")
    assert json.loads((run_dir / "lora_config.json").read_text())["target_modules"] == ["qkv_proj", "o_proj"]


def test_phi3_plan_refuses_part_of_a_fused_layer():
    with pytest.raises(ModelError, match=r"only part of this phi3 model's fused qkv_proj") as e:
        phi3_plan(["q_proj", "v_proj"])
    assert "qkv_proj" in e.value.hint and "all-linear" in e.value.hint


def test_phi3_rendered_targets_load_in_peft(tmp_path):
    """The rendered lora_config.json adapts a (small) phi3 model without error."""
    torch = pytest.importorskip("torch")
    import peft
    from transformers import AutoConfig, AutoModelForCausalLM

    run_dir = write_run_dir(phi3_plan(QKVO), tmp_path / "run")
    small = {**arch("phi3-mini"), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
             "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 262, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    kw = {k: v for k, v in small.items() if k not in ("architectures", "torch_dtype", "model_type")}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model("phi3", **kw))
    lc = peft.LoraConfig(**json.loads((run_dir / "lora_config.json").read_text()))
    peft_model = peft.get_peft_model(model, lc)
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in peft_model.named_parameters() if "lora_A" in n}
    assert adapted == {"qkv_proj", "o_proj"}


# ---------------------------------------------------------------- attention implementation

Q05 = shape_from_config(QWEN05_CONFIG)
GEMMA2 = shape_from_config(arch("gemma2-2b"))


def eager(**train):
    return cfg(model={"attn_implementation": "eager"}, data={"seq_len": 1024}, train=train)


def test_eager_attention_known_answers():
    # fp32 softmax output (4 bytes) + its 16-bit copy (2) per score, heads x seq x seq.
    assert eager_attention_bytes(Q05, eager(), 2) == 14 * 1024 * 1024 * 6
    assert eager_attention_bytes(Q05, eager(micro_batch=3), 2, seq=512) == 3 * 14 * 512 * 512 * 6
    assert eager_attention_bytes(Q05, eager(), 4) == 14 * 1024 * 1024 * 4  # fp32: one tensor
    assert eager_attention_bytes(GEMMA2, eager(), 2) == 8 * 1024 * 1024 * 8  # + tanh of softcapping
    dropout = shape_from_config({**QWEN05_CONFIG, "attention_dropout": 0.1})
    assert eager_attention_bytes(dropout, eager(), 2) == 14 * 1024 * 1024 * 7  # + bool mask


@pytest.mark.parametrize("attn", ["sdpa", "flash_attention_2"])
def test_no_score_memory_without_eager(attn):
    c = cfg(model={"attn_implementation": attn}, data={"seq_len": 4096})
    assert eager_attention_bytes(Q05, c, 2) == 0
    assert layer_activation_bytes(Q05, c, 2) == layer_activation_bytes(Q05, cfg(data={"seq_len": 4096}), 2)


def test_eager_grows_with_the_square_of_the_sequence():
    last = 0.0
    for seq in (128, 256, 512, 1024, 2048, 4096):
        b = eager_attention_bytes(Q05, cfg(model={"attn_implementation": "eager"}, data={"seq_len": seq}), 2)
        assert b > last and (last == 0 or b == 4 * last)
        last = b


@pytest.mark.parametrize("seq", [256, 1024, 4096])
@pytest.mark.parametrize("ckpt", [True, False])
def test_eager_predicts_more_than_sdpa_by_its_saved_scores(seq, ckpt):
    sdpa = cfg(data={"seq_len": seq}, train={"grad_ckpt": ckpt})
    eag = cfg(model={"attn_implementation": "eager"}, data={"seq_len": seq}, train={"grad_ckpt": ckpt})
    a, b = estimate(Q05, sdpa), estimate(Q05, eag)
    per_layer, mask = eager_attention_bytes(Q05, eag, 2), seq * seq * 2
    assert b.peak > a.peak
    # Besides its scores, eager attention keeps key and value repeated to every query head
    # (repeat_kv) where sdpa without a mask keeps them per key/value head, and no output of its own.
    q, kv = Q05.heads * Q05.head_dim, Q05.kv_heads * Q05.head_dim
    tensors = seq * 2 * (2 * (q - kv) - q) * (1 + ACT_OTHER)
    if not ckpt:  # every layer's scores are alive at the loss
        assert b.activations - a.activations == pytest.approx(Q05.layers * (per_layer + tensors) + mask)
    else:  # one layer's, recomputed in the backward
        assert b.peak - a.peak <= per_layer + tensors + mask + 1


def test_eager_scores_follow_the_longest_example_quadratically():
    c = cfg(model={"attn_implementation": "eager"}, data={"seq_len": 4096}, train={"grad_ckpt": False})
    short = estimate(Q05, c, longest=1024).activations - estimate(Q05, cfg(data={"seq_len": 4096}, train={"grad_ckpt": False}), longest=1024).activations
    q, kv = Q05.heads * Q05.head_dim, Q05.kv_heads * Q05.head_dim
    tensors = 1024 * 2 * (2 * (q - kv) - q) * (1 + ACT_OTHER)  # repeated key/value, no sdpa output
    assert short == pytest.approx(Q05.layers * (eager_attention_bytes(Q05, c, 2, seq=1024) + tensors) + 1024 * 1024 * 2)


def test_final_logit_softcapping_keeps_a_16bit_copy_of_the_logits():
    c = cfg(model={"attn_implementation": "eager"}, data={"seq_len": 2048})
    plain = shape_from_config({**arch("gemma2-2b"), "final_logit_softcapping": None})
    assert estimate(GEMMA2, c).logits - estimate(plain, c).logits == 2048 * GEMMA2.vocab * 2
    assert estimate(plain, c).logits == 2048 * GEMMA2.vocab * LOSS_BYTES


def test_gemma2_refuses_sdpa_and_plans_eager():
    with pytest.raises(ConfigError, match="no sdpa attention for gemma2") as e:
        build_plan(cfg(), GEMMA2, fake_facts(24))
    assert "attn_implementation=eager" in e.value.hint
    assert build_plan(cfg(model={"attn_implementation": "eager"}), GEMMA2, fake_facts(24)).fits


def test_no_sdpa_list_agrees_with_transformers():
    pytest.importorskip("torch")
    from transformers import AutoConfig, AutoModelForCausalLM

    for model_type in ("gemma2", "gpt_oss", "vaultgemma"):
        cls = AutoModelForCausalLM._model_mapping[type(AutoConfig.for_model(model_type))]
        assert cls._supports_sdpa is False and model_type in NO_SDPA_MODEL_TYPES
    for model_type in ("llama", "qwen2", "mistral", "gemma", "phi3"):
        cls = AutoModelForCausalLM._model_mapping[type(AutoConfig.for_model(model_type))]
        assert cls._supports_sdpa is True and model_type not in NO_SDPA_MODEL_TYPES


def test_flash_attention_needs_a_gpu_and_flash_attn(monkeypatch, no_gpu_facts):
    import vramfit.plan as plan_mod

    c = cfg(model={"attn_implementation": "flash_attention_2"})
    with pytest.raises(FitError, match="flash_attention_2 needs an NVIDIA GPU"):
        build_plan(c, Q05, no_gpu_facts)
    monkeypatch.setattr(plan_mod, "flash_attn_installed", lambda: False)
    with pytest.raises(ConfigError, match="needs the flash_attn package") as e:
        build_plan(c, Q05, fake_facts(24))
    assert "attn_implementation=sdpa" in e.value.hint
    monkeypatch.setattr(plan_mod, "flash_attn_installed", lambda: True)
    p = build_plan(c, Q05, fake_facts(24))
    assert p.breakdown.peak == estimate(Q05, cfg()).peak  # no scores materialized, as sdpa


# ---------------------------------------------------------------- what autograd really keeps (CPU)


def saved_bytes(raw: dict, attn: str, mb: int = 2, seq: int = 256) -> int:
    """Bytes of the distinct tensors one decoder layer's forward saves for backward, as with
    LoRA (frozen weights, activations requiring grad), in bf16 on CPU."""
    torch = pytest.importorskip("torch")
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = {k: v for k, v in raw.items() if k not in ("architectures", "torch_dtype", "model_type")}
    hf = AutoConfig.for_model(raw["model_type"], **kw)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf, dtype=torch.bfloat16, attn_implementation=attn).train()
    model.requires_grad_(False)
    storages: dict[int, int] = {}

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):  # weights exist anyway
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    h = model.get_input_embeddings()(torch.randint(3, 262, (mb, seq))).requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.model(inputs_embeds=h, position_ids=torch.arange(seq).expand(mb, -1))
    return sum(storages.values())


SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4,
         "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 262, "pad_token_id": 0,
         "bos_token_id": 1, "eos_token_id": 2}


@pytest.mark.parametrize("name", ["qwen2.5-0.5b", "phi3-mini", "mistral-7b"])
def test_eager_saves_what_the_model_counts(name):
    """transformers' eager attention keeps 6 bytes per bf16 score beyond what sdpa keeps
    (within the few head_dim-sized tensors the two differ by otherwise)."""
    raw = {**arch(name), **SMALL, "sliding_window": None}
    extra = saved_bytes(raw, "eager") - saved_bytes(raw, "sdpa")
    c = cfg(model={"attn_implementation": "eager"}, data={"seq_len": 256}, train={"micro_batch": 2})
    assert extra == pytest.approx(eager_attention_bytes(shape_from_config(raw), c, 2), rel=0.02)


def test_gemma2_softcapping_saves_one_more_16bit_score():
    raw = {**arch("gemma2-2b"), **SMALL}
    extra = saved_bytes(raw, "eager") - saved_bytes({**raw, "attn_logit_softcapping": None}, "eager")
    assert extra == 2 * 4 * 256 * 256 * 2

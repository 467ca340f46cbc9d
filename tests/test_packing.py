"""data.packing: rows of whole examples whose attention stays inside each example.

The proof is numerical: the tiny model's logits for an example packed in a row with
others equal its logits alone. The same check with the packing signal broken (no
position_ids restart, an attention_mask, a KV cache) shows the logits then differ, so
the check can fail. Then the collator, the memory and speed models, and a CPU run.
"""

from __future__ import annotations

import json
import math
import random
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import QWEN7B_CONFIG, subprocess_env, vramfit_exe
from vramfit import data as D
from vramfit.config import RunConfig
from vramfit.embedded import byte_tokenizer, tiny_config
from vramfit.errors import ConfigError
from vramfit.hardware import fake_facts
from vramfit.memory import estimate
from vramfit.model_shape import shape_from_config
from vramfit.plan import build_plan, sequences
from vramfit.speed import LengthStats, estimate_speed

IGN = -100
Q7 = shape_from_config(QWEN7B_CONFIG)
TEXTS = ["The cat sat on the mat.", "Hi!", "Packing keeps attention inside each example, or it is wrong.", "ok"]


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def examples(tok):
    return D.tokenize_records([{"text": t} for t in TEXTS], tok, 256)[0]


def cfg(**sections) -> RunConfig:
    return RunConfig.model_validate(sections)


# ---------------------------------------------------------------- rows


@settings(max_examples=200, deadline=None, database=None)
@given(lengths=st.lists(st.integers(1, 512), min_size=1, max_size=300), cap=st.integers(512, 2048))
def test_pack_rows_places_every_example_once_within_capacity(lengths, cap):
    rows = D.pack_rows(lengths, cap)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    sums = [sum(lengths[i] for i in r) for r in rows]
    assert max(sums) <= cap
    assert math.ceil(sum(lengths) / cap) <= len(rows) <= len(lengths)
    # Best fit leaves at most one row half empty: a second one's first example would
    # have fitted into the first.
    assert sum(1 for s in sums if 2 * s <= cap) <= 1
    assert D.pack_rows(lengths, cap) == rows  # deterministic: plan and train pack alike


def test_pack_rows_refuses_an_example_longer_than_a_row():
    with pytest.raises(ValueError, match="more than a row"):
        D.pack_rows([10, 300], 256)


def test_packed_rows_restart_positions_and_ignore_each_first_label(examples):
    rows = D.pack_examples(examples, 256)
    assert len(rows) == 1  # all four fit one row of 256
    row = rows[0]
    order = D.pack_rows([len(e["input_ids"]) for e in examples], 256)[0]
    start = 0
    for i in order:
        e, n = examples[i], len(examples[i]["input_ids"])
        assert row["input_ids"][start:start + n] == e["input_ids"]
        assert row["position_ids"][start:start + n] == list(range(n))
        # The first token is not a target from the example before it; the rest are unchanged.
        assert row["labels"][start:start + n] == [IGN] + e["labels"][1:]
        start += n
    assert start == len(row["input_ids"]) == len(row["labels"]) == len(row["position_ids"])
    assert "attention_mask" not in row


def test_collator_pads_packed_rows_without_an_attention_mask(tok):
    rows = [{"input_ids": [5, 6, 7, 8], "labels": [IGN, 6, IGN, 8], "position_ids": [0, 1, 0, 1]},
            {"input_ids": [9, 10], "labels": [IGN, 10], "position_ids": [0, 1]}]
    b = D.Collator(tok)(rows)
    assert set(b) == {"input_ids", "labels", "position_ids", D.TOKENS_KEY}
    assert b["input_ids"].tolist() == [[5, 6, 7, 8], [9, 10, tok.pad_token_id, tok.pad_token_id]]
    assert b["labels"].tolist() == [[IGN, 6, IGN, 8], [IGN, 10, IGN, IGN]]
    # Padding is one more sequence (positions restart), after every real token.
    assert b["position_ids"].tolist() == [[0, 1, 0, 1], [0, 1, 0, 1]]
    assert int(b[D.TOKENS_KEY]) == 6  # real tokens only, as attention_mask.sum() counts them unpacked


def test_build_datasets_packs_train_and_validation_apart(tmp_path, tok):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": f"example number {i} " * (1 + i % 5)}) + "\n" for i in range(40)))
    dc = D.DataConfig(path=str(path), seq_len=128, val_fraction=0.25, packing=True)
    train, val, stats, _ = D.build_datasets(dc, tok, seed=1)
    plain, plain_val, _, _ = D.build_datasets(dc.model_copy(update={"packing": False}), tok, seed=1)
    assert set(train.column_names) == {"input_ids", "labels", "position_ids"}
    assert len(train) < len(plain) and len(val) < len(plain_val)
    for ds, ref in ((train, plain), (val, plain_val)):
        # Every token is kept, in rows of at most seq_len; one position 0 per example.
        assert sum(map(len, ds["input_ids"])) == sum(map(len, ref["input_ids"]))
        assert max(map(len, ds["input_ids"])) <= 128
        assert sum(p.count(0) for p in ds["position_ids"]) == len(ref)


# ---------------------------------------------------------------- attention stays inside


def tiny_model(attn: str, lora: bool):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**tiny_config()), attn_implementation=attn)
    model.config.use_cache = False  # as train.load_model sets it
    if lora:
        from peft import LoraConfig, get_peft_model

        # Random B (not PEFT's zero init), so the adapter changes the logits.
        model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    return model.eval()


def packed_batch(examples, tok):
    """Two packed rows of different lengths (so the collator pads one), and which example sits where."""
    seq = 70  # lengths 25, 5, 62, 4 -> rows [62 + 5, 25 + 4]
    rows = D.pack_examples(examples, seq)
    order = D.pack_rows([len(e["input_ids"]) for e in examples], seq)
    assert len(rows) == 2 and len(rows[0]["input_ids"]) != len(rows[1]["input_ids"])
    assert max(len(r) for r in order) >= 2  # some row really holds several examples
    return D.Collator(tok)(rows), order


def spans(order, examples):
    for r, idx in enumerate(order):
        start = 0
        for i in idx:
            n = len(examples[i]["input_ids"])
            yield r, i, start, n
            start += n


def logits_alone(model, examples):
    import torch

    with torch.no_grad():
        return [model(input_ids=torch.tensor([e["input_ids"]])).logits[0] for e in examples]


@pytest.mark.parametrize("lora", [False, True], ids=["base", "lora"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logits_and_loss_equal_each_example_alone(examples, tok, attn, lora):
    import torch

    model = tiny_model(attn, lora)
    batch, order = packed_batch(examples, tok)
    inputs = {k: v for k, v in batch.items() if k != D.TOKENS_KEY}
    with torch.no_grad():
        out = model(**inputs)
    alone = logits_alone(model, examples)
    for r, i, start, n in spans(order, examples):
        torch.testing.assert_close(out.logits[r, start:start + n], alone[i], atol=1e-4, rtol=1e-4)
    # The packed loss is the token-weighted mean of the examples' own losses.
    total = count = 0.0
    with torch.no_grad():
        for e in examples:
            k = sum(1 for x in e["labels"][1:] if x != IGN)
            total += float(model(input_ids=torch.tensor([e["input_ids"]]), labels=torch.tensor([e["labels"]])).loss) * k
            count += k
    assert float(out.loss) == pytest.approx(total / count, rel=1e-5)


@pytest.mark.parametrize("broken", ["no position restart", "attention_mask given", "kv cache on"])
def test_the_check_fails_when_the_packing_signal_is_lost(examples, tok, broken):
    """Each way transformers would stop seeing separate sequences makes the logits differ."""
    import torch

    model = tiny_model("sdpa", lora=False)
    batch, order = packed_batch(examples, tok)
    inputs = {k: v for k, v in batch.items() if k not in (D.TOKENS_KEY, "labels")}
    if broken == "no position restart":
        inputs["position_ids"] = torch.arange(inputs["input_ids"].shape[1]).expand_as(inputs["input_ids"])
    elif broken == "attention_mask given":
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    else:
        inputs["use_cache"] = True
    with torch.no_grad():
        logits = model(**inputs).logits
    alone = logits_alone(model, examples)
    later = [(r, i, s, n) for r, i, s, n in spans(order, examples) if s > 0]  # not first in its row
    worst = max(float((logits[r, s:s + n] - alone[i]).abs().max()) for r, i, s, n in later)
    assert worst > 0.1, f"{broken}: logits still match ({worst:.2e}); the check could not fail"


# ---------------------------------------------------------------- memory, speed, steps


_rng = random.Random(0)
SHORT = LengthStats(tuple(_rng.randint(150, 600) for _ in range(500)))  # as tests/test_fit.py
MIXED = LengthStats(tuple(_rng.choice([40, 90, 700]) for _ in range(2000)))


def packing_cfg(packing: bool, seq=4096, mb=1, **train):
    return cfg(data={"seq_len": seq, "packing": packing}, train={"micro_batch": mb, **train})


def test_packed_memory_is_counted_at_the_full_seq_len():
    # Unpacked, short examples never reach seq_len; packed rows do.
    short = estimate(Q7, packing_cfg(False), longest=600)
    packed = estimate(Q7, packing_cfg(True), longest=600)
    assert packed == estimate(Q7, packing_cfg(True)) == estimate(Q7, packing_cfg(False))
    assert packed.peak > short.peak


@settings(max_examples=150, deadline=None, database=None)
@given(seq=st.integers(64, 16384), extra=st.integers(0, 16384), mb=st.integers(1, 16),
       longest=st.integers(1, 32768), ckpt=st.booleans(), method=st.sampled_from(["lora", "qlora", "full"]))
def test_packing_never_predicts_less_memory_and_longer_rows_never_less(seq, extra, mb, longest, ckpt, method):
    def peak(packing, s):
        c = cfg(method=method, data={"seq_len": s, "packing": packing}, train={"micro_batch": mb, "grad_ckpt": ckpt})
        return estimate(Q7, c, longest=longest).peak

    assert peak(True, seq) >= peak(False, seq)
    assert peak(True, seq + extra) >= peak(True, seq)


@pytest.mark.parametrize("mb", [1, 2, 4, 8])
@pytest.mark.parametrize(("lengths", "seq"), [
    (SHORT, 4096),
    (SHORT, 1024),
    (MIXED, 2048),
], ids=["short@4096", "short@1024", "mixed@2048"])
def test_packing_short_examples_pads_less_and_trains_faster(lengths, seq, mb):
    plain = estimate_speed(Q7, packing_cfg(False, seq, mb), lengths, "H200")
    packed = estimate_speed(Q7, packing_cfg(True, seq, mb), lengths, "H200")
    # Rows of many short examples come out nearly equal: a fraction of the padding that
    # examples of spread lengths need (none for either at micro-batch 1).
    assert packed.padded_share <= plain.padded_share / 3 + 1e-12
    assert packed.tokens_per_s > plain.tokens_per_s


def test_rows_that_fill_exactly_have_no_padding():
    rows = LengthStats((64,) * 256).packed(256)
    assert rows.lengths == (256,) * 64
    assert estimate_speed(Q7, packing_cfg(True, 256, 8), LengthStats((64,) * 256), "H200").padded_share == 0


@settings(max_examples=100, deadline=None, database=None)
@given(lengths=st.lists(st.integers(1, 3000), min_size=1, max_size=200), seq=st.integers(128, 4096))
def test_packing_keeps_every_real_token(lengths, seq):
    s = LengthStats(tuple(lengths))
    rows = s.packed(seq)
    assert sum(rows.lengths) == sum(min(n, seq) for n in lengths)
    assert max(rows.lengths) <= seq


def test_steps_count_rows_not_examples():
    c = packing_cfg(True, 1024, 4, grad_accum=4)
    n_rows, per_row = sequences(c, SHORT, len(SHORT.lengths))
    total = sum(SHORT.lengths)
    assert n_rows == len(SHORT.packed(1024).lengths)
    assert math.ceil(total / 1024) <= n_rows <= math.ceil(total / 1024) * 1.02
    assert n_rows * per_row == pytest.approx(total)
    # A 10x bigger dataset with the same lengths: 10x the rows.
    assert sequences(c, SHORT, 10 * len(SHORT.lengths))[0] == pytest.approx(10 * n_rows, abs=1)
    facts = fake_facts(80)
    packed = build_plan(c, Q7, facts, lengths=SHORT, n_examples=len(SHORT.lengths))
    plain = build_plan(packing_cfg(False, 1024, 4, grad_accum=4), Q7, facts, lengths=SHORT, n_examples=len(SHORT.lengths))
    assert packed.steps == n_rows // 16 < plain.steps == len(SHORT.lengths) // 16
    assert packed.wall_s < plain.wall_s


def test_flash_attention_packing_needs_one_row_per_micro_batch(monkeypatch):
    monkeypatch.setattr("vramfit.plan.flash_attn_installed", lambda: True)  # planned where flash_attn is installed
    facts = fake_facts(80)
    c = cfg(model={"attn_implementation": "flash_attention_2"}, data={"packing": True}, train={"micro_batch": 2})
    with pytest.raises(ConfigError, match="micro_batch 1"):
        build_plan(c, Q7, facts)
    build_plan(c.model_copy(update={"train": c.train.model_copy(update={"micro_batch": 1})}), Q7, facts)


def test_auto_fit_keeps_packing_as_given():
    from vramfit.fit import auto_fit

    for packing in (False, True):
        base = cfg(data={"packing": packing})
        fitted, _ = auto_fit(base, set(), Q7, 24, "NVIDIA H200", SHORT)
        assert fitted.data.packing is packing


# ---------------------------------------------------------------- a CPU run


@pytest.mark.slow
def test_cpu_train_with_packing_counts_every_token(tmp_path, tok):
    run = tmp_path / "run"
    proc = subprocess.run(
        [vramfit_exe(), "train", "--preset", "cpu", "--out", str(run), "--set", "data.packing=true",
         "--set", "train.max_steps=-1", "--set", "train.epochs=1", "--set", "data.val_fraction=0.1",
         "--set", "train.eval_steps=5", "--set", "train.logging_steps=1"],
        cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, f"rc={proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "packed rows/step" in proc.stdout
    m = json.loads((run / "metrics.json").read_text())
    # One epoch of packed rows touches every training token once: the count is the same
    # tokens an unpacked epoch counts through attention_mask.
    train, _, _, _ = D.build_datasets(D.DataConfig(seq_len=256, val_fraction=0.1), tok, seed=42)
    assert m["tokens"] == sum(map(len, train["input_ids"]))
    rows = m["data"]["packed_rows"]
    assert rows == len(D.pack_examples([{"input_ids": x, "labels": y} for x, y in zip(train["input_ids"], train["labels"])], 256))
    assert m["steps"] == math.ceil(rows / 8)
    assert m["final_loss"] < m["first_loss"]
    assert f"packed into {rows} rows of up to 256 tokens" in (run / "train.log").read_text()
    assert m["tokens_per_s"] > 0
    # Evaluation on packed validation rows went through the same trainer (the count key stripped).
    state = json.loads(next((run / "checkpoints").glob("checkpoint-*/trainer_state.json")).read_text())
    assert [h["step"] for h in state["log_history"] if "eval_loss" in h] == [5, 10]

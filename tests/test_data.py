"""vramfit.data: loading, format detection, loss masking, splits, batching. Offline."""

from __future__ import annotations

import json

import pytest

from vramfit import data as D
from vramfit.config import DataConfig
from vramfit.embedded import byte_tokenizer
from vramfit.errors import DataError

IGN = -100
CHAT = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def enc(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def trained(labels):
    return [x for x in labels if x != IGN]


# ---------------------------------------------------------------- formats


@pytest.mark.parametrize(
    ("row", "fmt", "expected"),
    [
        ({"messages": CHAT}, "messages", {"messages": CHAT}),
        (
            {"conversations": [{"from": "system", "value": "be brief"}, {"from": "human", "value": "hi"},
                               {"from": "gpt", "value": "yo"}]},
            "sharegpt",
            {"messages": [{"role": "system", "content": "be brief"}, *CHAT]},
        ),
        ({"conversations": CHAT}, "sharegpt", {"messages": CHAT}),  # role/content spelling too
        (
            {"instruction": "Add.", "input": "1 + 2", "output": "3"},
            "alpaca",
            {"messages": [{"role": "user", "content": "Add.\n\n1 + 2"}, {"role": "assistant", "content": "3"}]},
        ),
        (
            {"instruction": "Greet.", "input": "", "output": "hello"},
            "alpaca",
            {"messages": [{"role": "user", "content": "Greet."}, {"role": "assistant", "content": "hello"}]},
        ),
        ({"prompt": "hi", "completion": "yo"}, "prompt_completion", {"messages": CHAT}),
        ({"text": "plain words"}, "text", {"text": "plain words"}),
    ],
)
def test_formats_detected_and_normalized(tmp_path, row, fmt, expected):
    f = write_jsonl(tmp_path / "d.jsonl", [row, row])
    records, detected = D.load_records(f)
    assert detected == fmt
    assert records == [expected, expected]
    # naming the format explicitly gives the same result
    assert D.load_records(f, fmt=fmt) == (records, fmt)


def test_alpaca_without_input_column(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "Greet.", "output": "hello"}])
    assert D.load_records(f)[0][0]["messages"][0] == {"role": "user", "content": "Greet."}


def test_shipped_dataset_loads():
    records, fmt = D.load_records(None)
    assert fmt == "alpaca" and len(records) == 320
    assert all([m["role"] for m in r["messages"]] == ["user", "assistant"] for r in records)
    assert records[0]["messages"][0]["content"] == "Add the two numbers.\n\n38 + 61"


def test_max_examples_keeps_first(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"text": str(i)} for i in range(10)])
    records, _ = D.load_records(f, max_examples=3)
    assert records == [{"text": "0"}, {"text": "1"}, {"text": "2"}]


def test_blank_lines_skipped_and_bom_tolerated(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_bytes(b'\xef\xbb\xbf{"text": "a"}\n\n   \n{"text": "b"}\n')
    assert D.load_records(f)[0] == [{"text": "a"}, {"text": "b"}]


def test_json_list_and_json_lines_body(tmp_path):
    a = tmp_path / "a.json"
    a.write_text(json.dumps([{"text": "x"}, {"text": "y"}]))
    b = tmp_path / "b.json"
    b.write_text('{"text": "x"}\n{"text": "y"}\n')
    assert D.load_records(a)[0] == D.load_records(b)[0] == [{"text": "x"}, {"text": "y"}]


def test_jsonl_gz(tmp_path):
    import gzip

    f = tmp_path / "d.jsonl.gz"
    f.write_bytes(gzip.compress(b'{"prompt": "hi", "completion": "yo"}\n'))
    assert D.load_records(f) == ([{"messages": CHAT}], "prompt_completion")


def test_csv_reads_every_cell_as_text(tmp_path):
    f = tmp_path / "d.csv"
    # all-digit outputs and an empty input cell: must stay strings, not int / None
    f.write_text('instruction,input,output\nAdd.,1 + 2,3\nSay one.,,1\n', encoding="utf-8")
    records, fmt = D.load_records(f)
    assert fmt == "alpaca"
    assert records[0]["messages"] == [{"role": "user", "content": "Add.\n\n1 + 2"},
                                      {"role": "assistant", "content": "3"}]
    assert records[1]["messages"][0]["content"] == "Say one."


def test_parquet_with_nested_messages(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([{"messages": CHAT}, {"messages": CHAT}]), f)
    assert D.load_records(f) == ([{"messages": CHAT}] * 2, "messages")


# ---------------------------------------------------------------- bad input


def test_malformed_jsonl_names_file_and_line(tmp_path):
    f = tmp_path / "data.jsonl"
    f.write_text('{"text": "a"}\n{"text": "b"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"data\.jsonl line 3: invalid JSON") as ei:
        D.load_records(f)
    assert ei.value.hint


def test_line_number_counts_blank_lines(tmp_path):
    f = tmp_path / "data.jsonl"
    f.write_text('{"text": "a"}\n\n{"text": "b"\n')
    with pytest.raises(DataError, match="line 3"):
        D.load_records(f)


def test_non_object_line(tmp_path):
    f = tmp_path / "data.jsonl"
    f.write_text('{"text": "a"}\n["text", "b"]\n')
    with pytest.raises(DataError, match="data.jsonl line 2: expected a JSON object, got list"):
        D.load_records(f)


def test_json_list_with_non_object(tmp_path):
    f = tmp_path / "d.json"
    f.write_text('[{"text": "a"}, 5]')
    with pytest.raises(DataError, match="item 2: expected a JSON object, got int"):
        D.load_records(f)


@pytest.mark.parametrize("body", [b"", b"\n\n  \n"])
def test_empty_file(tmp_path, body):
    f = tmp_path / "d.jsonl"
    f.write_bytes(body)
    with pytest.raises(DataError, match="d.jsonl is empty"):
        D.load_records(f)


@pytest.mark.parametrize(("name", "body"), [("d.csv", b"text\n"), ("d.json", b"[]")])
def test_zero_rows_is_empty(tmp_path, name, body):
    f = tmp_path / name
    f.write_bytes(body)
    with pytest.raises(DataError, match=f"{name} is empty"):
        D.load_records(f)


def test_parquet_with_zero_rows_is_empty(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "d.parquet")
    with pytest.raises(DataError, match="d.parquet is empty"):
        D.load_records(tmp_path / "d.parquet")


def test_bad_line_after_max_examples_still_reported(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "a"}\n{"text": "b"}\n{oops\n')
    with pytest.raises(DataError, match="d.jsonl line 3"):
        D.load_records(f, max_examples=1)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="dataset not found: .*nope.jsonl") as ei:
        D.load_records(tmp_path / "nope.jsonl")
    assert "data.path" in ei.value.hint
    # a relative owner/file.jsonl is a missing file, not a hub id
    with pytest.raises(DataError, match="dataset not found: data/train.jsonl"):
        D.load_records("data/train.jsonl")


def test_hub_id_failure_becomes_data_error(monkeypatch):
    import datasets

    def boom(*a, **k):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", boom)
    with pytest.raises(DataError, match="cannot load dataset 'someone/thing'.*no network") as ei:
        D.load_records("someone/thing")
    assert "network" in ei.value.hint


def test_directory(tmp_path):
    with pytest.raises(DataError, match="is a directory"):
        D.load_records(tmp_path)


def test_unsupported_extension(tmp_path):
    f = tmp_path / "d.txt"
    f.write_text("hello")
    with pytest.raises(DataError, match="unsupported dataset file type '.txt'"):
        D.load_records(f)


@pytest.mark.parametrize("name", ["d.jsonl", "d.csv"])
def test_non_utf8(tmp_path, name):
    f = tmp_path / name
    body = b'{"text": "ok"}\n{"text": "caf\xe9"}\n' if name.endswith("jsonl") else b"text\ncaf\xe9\nok\n"
    f.write_bytes(body)
    with pytest.raises(DataError, match=f"{name} line 2: not valid UTF-8") as ei:
        D.load_records(f)
    assert "UTF-8" in ei.value.hint


def test_corrupt_parquet(tmp_path):
    f = tmp_path / "d.parquet"
    f.write_bytes(b"definitely not parquet")
    with pytest.raises(DataError, match="cannot read d.parquet as parquet"):
        D.load_records(f)


def test_unknown_columns_lists_them(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match=r"columns \['answer', 'question'\]") as ei:
        D.load_records(f)
    assert "instruction+output" in ei.value.hint and "messages" in ei.value.hint


def test_explicit_format_missing_column(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "q", "answer": "a"}])
    with pytest.raises(DataError, match="format 'alpaca' needs column\\(s\\) output"):
        D.load_records(f, fmt="alpaca")
    with pytest.raises(DataError, match="needs column\\(s\\) prompt, completion"):
        D.load_records(f, fmt="prompt_completion")


@pytest.mark.parametrize(
    ("rows", "match"),
    [
        ([{"text": "a"}, {"text": 5}], r"row 2: 'text' must be a string, got int"),
        ([{"instruction": "a", "output": "b"}, {"instruction": "c"}], r"row 2: 'output' is missing"),
        ([{"messages": CHAT}, {"messages": "hi"}], r"row 2: 'messages' must be a list"),
        ([{"messages": [{"role": "user", "content": "hi"}]}], r"row 1: no assistant turn"),
        ([{"messages": []}], r"row 1: no assistant turn"),
        ([{"messages": [CHAT[0], {"role": "assistant", "content": ["x"]}]}],
         r"row 1: turn 2 content must be a string, got list"),
        ([{"messages": [{"role": "tool", "content": "x"}, CHAT[1]]}], r"row 1: turn 1 has role 'tool'"),
        ([{"conversations": ["hi"]}], r"row 1: turn 1 must be an object"),
    ],
)
def test_wrong_types_name_the_row(tmp_path, rows, match):
    f = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError, match=match):
        D.load_records(f)


def test_unknown_format_name():
    with pytest.raises(DataError, match="unknown data format 'chatml'"):
        D.load_records(None, fmt="chatml")


# ---------------------------------------------------------------- masking


def test_template_masks_prompt_and_labels_reply(tok):
    ex, stats = D.tokenize_records([{"messages": CHAT}], tok, seq_len=512)
    e = ex[0]
    prompt = enc(tok, "<|user|>hi<|eos|><|assistant|>")
    reply = enc(tok, "yo") + [tok.eos_token_id]
    assert e["input_ids"] == prompt + reply
    assert e["labels"] == [IGN] * len(prompt) + reply
    assert e["attention_mask"] == [1] * len(e["input_ids"])
    assert (stats.n_records, stats.n_examples, stats.n_truncated, stats.n_dropped) == (1, 1, 0, 0)


def test_template_multi_turn_labels_every_reply(tok):
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "u1"},
            {"role": "assistant", "content": "a1"}, {"role": "user", "content": "u2"},
            {"role": "assistant", "content": "a2"}, {"role": "user", "content": "trailing"}]
    e = D.tokenize_records([{"messages": msgs}], tok, seq_len=512)[0][0]
    text = tok.decode(e["input_ids"])
    assert text == "<|system|>S<|eos|><|user|>u1<|eos|><|assistant|>a1<|eos|><|user|>u2<|eos|><|assistant|>a2<|eos|>"
    assert trained(e["labels"]) == enc(tok, "a1<|eos|>a2<|eos|>")
    # labels equal input_ids wherever they are set
    assert all(lab in (IGN, i) for lab, i in zip(e["labels"], e["input_ids"]))
    assert "u2" not in tok.decode(trained(e["labels"]))


def test_fallback_without_template(tok):
    ex, _ = D.tokenize_records([{"messages": [{"role": "system", "content": "S"}, *CHAT]}], tok, 512,
                               use_chat_template=False)
    e = ex[0]
    prompt = [tok.bos_token_id] + enc(tok, "S\n\n### Instruction:\nhi\n\n### Response:\n")
    reply = enc(tok, "yo") + [tok.eos_token_id]
    assert e["input_ids"] == prompt + reply
    assert e["labels"] == [IGN] * len(prompt) + reply


def test_fallback_multi_turn(tok):
    msgs = [*CHAT, {"role": "user", "content": "again"}, {"role": "assistant", "content": "ok"}]
    tk = byte_tokenizer()
    tk.chat_template = None  # a tokenizer with no template falls back even when asked for one
    e = D.tokenize_records([{"messages": msgs}], tk, 512, use_chat_template=True)[0][0]
    assert tk.decode(e["input_ids"]) == ("<|bos|>### Instruction:\nhi\n\n### Response:\nyo<|eos|>"
                                         "### Instruction:\nagain\n\n### Response:\nok<|eos|>")
    assert trained(e["labels"]) == enc(tok, "yo<|eos|>ok<|eos|>")


def test_text_records_fully_labelled(tok):
    e = D.tokenize_records([{"text": "abc"}], tok, 512)[0][0]
    assert e["input_ids"] == [tok.bos_token_id] + enc(tok, "abc") + [tok.eos_token_id]
    assert e["labels"] == e["input_ids"]


def test_truncation_and_drops_counted(tok):
    long_prompt = {"messages": [{"role": "user", "content": "x" * 100}, {"role": "assistant", "content": "y"}]}
    long_reply = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "z" * 100}]}
    short = {"messages": CHAT}
    ex, stats = D.tokenize_records([long_prompt, long_reply, short], tok, seq_len=20)
    assert (stats.n_records, stats.n_examples, stats.n_truncated, stats.n_dropped) == (3, 2, 2, 1)
    assert all(len(e["input_ids"]) <= 20 for e in ex)
    assert len(ex[0]["input_ids"]) == 20 and trained(ex[0]["labels"])  # the long reply, cut
    assert stats.max_tokens == 1 + 100 + 2 + 1 + 1  # <|user|> x*100 <|eos|><|assistant|> y <|eos|>
    assert stats.truncated_share == pytest.approx(2 / 3)
    d = stats.to_dict()
    assert d["n_dropped"] == 1 and d["truncated_share"] == pytest.approx(0.6667)
    assert d["p50_tokens"] <= d["p95_tokens"] <= d["max_tokens"]


def test_everything_dropped_is_an_error(tok):
    rec = {"messages": [{"role": "user", "content": "x" * 50}, {"role": "assistant", "content": "y"}]}
    with pytest.raises(DataError, match="seq_len 10") as ei:
        D.tokenize_records([rec, rec], tok, seq_len=10)
    assert "raise data.seq_len" in ei.value.hint


def test_template_error_becomes_data_error(tok):
    tk = byte_tokenizer()
    tk.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(DataError, match="record 1: the chat template rejected it.*roles must alternate"):
        D.tokenize_records([{"messages": CHAT}], tk, 64)


# ---------------------------------------------------------------- splits and batches


def _cfg(path, **kw):
    return DataConfig(path=str(path), seq_len=64, **kw)


def test_val_split_sizes_and_determinism(tmp_path, tok):
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(20)])
    train, val, stats, fmt = D.build_datasets(_cfg(f, val_fraction=0.2), tok, seed=1)
    assert (len(train), len(val), stats.n_examples, fmt) == (16, 4, 20, "prompt_completion")
    assert set(train.column_names) == {"input_ids", "labels", "attention_mask"}
    again = D.build_datasets(_cfg(f, val_fraction=0.2), tok, seed=1)[1]
    assert list(again["input_ids"]) == list(val["input_ids"])
    other = D.build_datasets(_cfg(f, val_fraction=0.2), tok, seed=2)[1]
    assert list(other["input_ids"]) != list(val["input_ids"])
    all_ids = [tuple(x) for x in list(train["input_ids"]) + list(val["input_ids"])]
    assert len(set(all_ids)) == 20  # a partition: nothing lost, nothing duplicated


def test_val_split_at_least_one_and_none_when_off(tmp_path, tok):
    f = write_jsonl(tmp_path / "d.jsonl", [{"text": f"t{i}"} for i in range(5)])
    train, val, _, _ = D.build_datasets(_cfg(f, val_fraction=0.01), tok, seed=0)
    assert (len(train), len(val)) == (4, 1)
    train, val, _, _ = D.build_datasets(_cfg(f), tok, seed=0)
    assert (len(train), val) == (5, None)


def test_val_split_leaving_no_train_is_an_error(tmp_path, tok):
    f = write_jsonl(tmp_path / "d.jsonl", [{"text": "only"}])
    with pytest.raises(DataError, match="leaves no training examples"):
        D.build_datasets(_cfg(f, val_fraction=0.5), tok, seed=0)


def test_collator_pads_right(tok):
    import torch

    feats = [{"input_ids": [5, 6, 7], "labels": [IGN, 6, 7], "attention_mask": [1, 1, 1]},
             {"input_ids": [8], "labels": [8], "attention_mask": [1]}]
    b = D.Collator(tok)(feats)
    # the real tokens' count, a Python int (reading it waits for no GPU: data.TOKENS_KEY)
    assert b.pop(D.TOKENS_KEY) == 4
    assert all(v.dtype == torch.long and v.shape == (2, 3) for v in b.values())
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, tok.pad_token_id, tok.pad_token_id]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"].tolist() == [[IGN, 6, 7], [8, IGN, IGN]]
    assert D.Collator(tok, pad_to_multiple_of=8)(feats)["input_ids"].shape == (2, 8)


def test_collator_gives_no_mask_where_nothing_is_padded_and_the_model_computes_the_same(tok):
    """An all-ones mask is left out: transformers would read it back from the GPU to decide
    to ignore it (a wait at every forward). Without it the model computes the same logits."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from vramfit.embedded import tiny_config

    feats = [{"input_ids": [5, 6, 7], "labels": [5, 6, 7], "attention_mask": [1, 1, 1]},
             {"input_ids": [8, 9, 10], "labels": [IGN, 9, 10], "attention_mask": [1, 1, 1]}]  # fmt: skip
    b = D.Collator(tok)(feats)
    assert "attention_mask" not in b and b[D.TOKENS_KEY] == 6
    assert "attention_mask" in D.Collator(tok, pad_to_multiple_of=4, max_len=8)(feats)  # padded to 4: masked
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**tiny_config())).eval()
    with torch.no_grad():
        plain = model(input_ids=b["input_ids"]).logits
        masked = model(input_ids=b["input_ids"], attention_mask=torch.ones_like(b["input_ids"])).logits
    torch.testing.assert_close(plain, masked, rtol=0, atol=0)


def test_collator_falls_back_to_eos_without_pad():
    class NoPad:
        pad_token_id = None
        eos_token_id = 2

    b = D.Collator(NoPad())([{"input_ids": [5, 6], "labels": [5, 6], "attention_mask": [1, 1]},
                             {"input_ids": [7], "labels": [7], "attention_mask": [1]}])
    assert b["input_ids"].tolist() == [[5, 6], [7, 2]]


def test_template_that_rewrites_history_labels_what_lines_up():
    # Like Qwen3: the last assistant turn renders differently ("!") from earlier ones,
    # so an earlier reply cannot be located by prefix and stays unlabelled context.
    tk = byte_tokenizer()
    tk.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
        "{% if loop.last and m['role'] == 'assistant' %}!{% endif %}<|eos|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    msgs = [*CHAT, {"role": "user", "content": "u2"}, {"role": "assistant", "content": "a2"}]
    e = D.tokenize_records([{"messages": msgs}], tk, 512)[0][0]
    assert tk.decode(e["input_ids"]) == "<|user|>hi<|eos|><|assistant|>yo<|eos|><|user|>u2<|eos|><|assistant|>a2!<|eos|>"
    assert tk.decode(trained(e["labels"])) == "a2!<|eos|>"


def test_template_whose_generation_prompt_does_not_match():
    tk = byte_tokenizer()
    tk.chat_template = tk.chat_template.replace("{% if add_generation_prompt %}<|assistant|>",
                                                "{% if add_generation_prompt %}<|assistant|>\n")
    with pytest.raises(DataError, match="generation prompt") as ei:
        D.tokenize_records([{"messages": CHAT}], tk, 64)
    assert "chat_template: false" in ei.value.hint


def test_json_single_pretty_object_and_bad_json(tmp_path):
    f = tmp_path / "one.json"
    f.write_text('{\n  "text": "a"\n}\n')
    assert D.load_records(f)[0] == [{"text": "a"}]
    f.write_text('[\n  {"text": "a"},\n  {"text": }\n]\n')
    with pytest.raises(DataError, match="one.json line 3: invalid JSON"):
        D.load_records(f)


def test_jsonl_keeps_unicode_line_separator_inside_strings(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "a\u2028b"}\n', encoding="utf-8")
    assert D.load_records(f)[0] == [{"text": "a\u2028b"}]

"""Property tests (hypothesis): the config loader and the dataset pipeline fail only
with their own error types, and tokenized examples keep their invariants."""

from __future__ import annotations

import json
import math
import tempfile
import typing
from pathlib import Path

import annotated_types as at
import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from vramfit.config import RunConfig
from vramfit.data import IGNORE, load_records, tokenize_records
from vramfit.embedded import byte_tokenizer
from vramfit.errors import ConfigError, DataError
from vramfit.presets import _unflatten, parse_set, resolve, valid_keys

FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

KEYS = valid_keys()
LEAVES = sorted(k for k, section in KEYS.items() if not section)
IDENT = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,11}", fullmatch=True)


# ---------------------------------------------------------------- strategies from the schema


def _field_infos(model: type[BaseModel] = RunConfig, prefix: str = "") -> dict[str, typing.Any]:
    out = {}
    for name, f in model.model_fields.items():
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out.update(_field_infos(ann, f"{prefix}{name}."))
        else:
            out[prefix + name] = f
    return out


def _bounded(kind: type, metadata: list) -> st.SearchStrategy:
    lo = hi = None
    lo_open = hi_open = False
    for m in metadata:
        if isinstance(m, at.Gt):
            lo, lo_open = m.gt, True
        elif isinstance(m, at.Ge):
            lo = m.ge
        elif isinstance(m, at.Lt):
            hi, hi_open = m.lt, True
        elif isinstance(m, at.Le):
            hi = m.le
    if kind is int:
        lo = None if lo is None else lo + (1 if lo_open else 0)
        hi = None if hi is None else hi - (1 if hi_open else 0)
        return st.integers(min_value=lo if lo is not None else -(2**40), max_value=hi if hi is not None else 2**40)
    return st.floats(min_value=lo, max_value=hi, exclude_min=lo_open, exclude_max=hi_open,
                     allow_nan=False, allow_infinity=False)


def strategy_for(ann: typing.Any, metadata: list | None = None) -> st.SearchStrategy:
    """Values of one annotation that the field's own constraints accept."""
    metadata = list(metadata or [])
    origin = typing.get_origin(ann)
    if origin is typing.Annotated:
        base, *meta = typing.get_args(ann)
        return strategy_for(base, metadata + list(meta))
    if origin is typing.Literal:
        return st.sampled_from(typing.get_args(ann))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return st.one_of([strategy_for(a, metadata) for a in typing.get_args(ann)])
    if origin is list:
        (item,) = typing.get_args(ann) or (str,)
        return st.lists(IDENT if item is str else strategy_for(item), max_size=4)
    if origin is dict:
        return st.dictionaries(IDENT, st.text(max_size=8), max_size=3)
    if ann is type(None):
        return st.none()
    if ann is bool:
        return st.booleans()
    if ann in (int, float):
        return _bounded(ann, metadata)
    if ann is str:
        return st.text(max_size=12)
    return st.none() | st.integers() | st.text(max_size=8)  # a type this file does not know yet


FIELDS = _field_infos()
VALID_VALUE = {k: strategy_for(f.annotation, f.metadata) for k, f in FIELDS.items()}
ANY_VALUE = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


@st.composite
def valid_key_dicts(draw, value_for=None) -> dict:
    keys = draw(st.lists(st.sampled_from(LEAVES), unique=True, max_size=8))
    flat = {k: draw(value_for if value_for is not None else VALID_VALUE[k]) for k in keys}
    return _unflatten(flat)


def _assert_resolves_or_config_error(values: dict) -> None:
    try:
        r = resolve([("test", values)])
    except ConfigError as e:
        assert e.hint, e.message
        return
    assert isinstance(r.config, RunConfig)


# ---------------------------------------------------------------- (a) config loader


@FAST
@given(valid_key_dicts())
def test_resolve_valid_keys_valid_values(values):
    try:
        r = resolve([("test", values)])
    except ConfigError as e:
        # Only cross-field rules can refuse values that each field accepts on its own.
        event("ConfigError")
        assert e.hint
        return
    event("resolved")
    dumped = r.config.model_dump(mode="python")
    for k, v in _flat_items(values):
        got = dumped
        for part in k.split("."):
            got = got[part]
        if k == "launch.env":
            assert {x: str(y) for x, y in v.items()}.items() <= got.items()
        else:
            assert got == v, k
        assert r.sources[k] == "test"


def _flat_items(d: dict, prefix: str = ""):
    for k, v in d.items():
        key = prefix + k
        if KEYS.get(key) and isinstance(v, dict):
            yield from _flat_items(v, key + ".")
        else:
            yield key, v


@FAST
@given(valid_key_dicts(value_for=ANY_VALUE))
def test_resolve_valid_keys_any_values(values):
    _assert_resolves_or_config_error(values)


@FAST
@given(st.data())
def test_unknown_key_is_config_error_with_useful_hint(data):
    section = data.draw(st.sampled_from([""] + [k + "." for k, s in KEYS.items() if s]), label="section")
    name = data.draw(st.from_regex(r"[A-Za-z_][A-Za-z0-9_-]{0,15}", fullmatch=True).filter(
        lambda n: section + n not in KEYS), label="name")
    value = data.draw(ANY_VALUE, label="value")
    dotted = section + name
    with pytest.raises(ConfigError) as ei:
        resolve([("test", _unflatten({dotted: value}))])
    e = ei.value
    assert repr(dotted) in e.message, e.message
    if e.hint.startswith("did you mean "):
        suggested = e.hint[len("did you mean "):].rstrip("?")
        assert yaml.safe_load(suggested) in KEYS, e.hint
    else:
        assert "vramfit presets show" in e.hint, e.hint


def yaml_dump(v) -> str:
    text = yaml.safe_dump(v, default_flow_style=True, width=math.inf)
    return text.removesuffix("\n...\n").strip()


SET_VALUES = st.one_of(
    st.integers(),
    st.floats(allow_nan=False),
    st.booleans(),
    st.lists(IDENT, max_size=5),
)


@FAST
@given(st.sampled_from(LEAVES), SET_VALUES)
def test_set_round_trip(key, v):
    got = parse_set([f"{key}={yaml_dump(v)}"])
    for part in key.split("."):
        got = got[part]
    assert got == v and type(got) is type(v), (key, yaml_dump(v), got)


# ---------------------------------------------------------------- (b) dataset formats

SPECIALS = ["\n", "\r\n", "\u2028", "\u2029", "\x85", "\t", "\x00", "\ufeff", "\U0001F600",
            "\U0001F469\u200d\U0001F469\u200d\U0001F467", "\u00e9", "\u4e2d", '"', "\\", "<|eos|>", "<|user|>"]
TEXT = st.lists(st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=12) | st.sampled_from(SPECIALS),
                max_size=6).map("".join)


@st.composite
def alpaca_record(draw):
    rec = {"instruction": draw(TEXT), "output": draw(TEXT)}
    if draw(st.booleans()):
        rec["input"] = draw(TEXT)
    return rec


@st.composite
def messages_record(draw, key="messages", role="role", content="content", names=("user", "assistant")):
    n = draw(st.integers(1, 4))
    turns = [{role: names[i % 2], content: draw(TEXT)} for i in range(n)]
    if draw(st.booleans()):
        turns.insert(0, {role: "system", content: draw(TEXT)})
    return {key: turns}


RECORD_FILES = st.one_of(
    st.lists(st.builds(lambda t: {"text": t}, TEXT), min_size=1, max_size=4),
    st.lists(alpaca_record(), min_size=1, max_size=4),
    st.lists(messages_record(), min_size=1, max_size=4),
    st.lists(messages_record("conversations", "from", "value", ("human", "gpt")), min_size=1, max_size=4),
)

_TOKENIZER = None


def tokenizer():
    global _TOKENIZER
    if _TOKENIZER is None:
        _TOKENIZER = byte_tokenizer()
    return _TOKENIZER


def _write(tmp: str, name: str, content: bytes) -> Path:
    p = Path(tmp) / name
    p.write_bytes(content)
    return p


@SLOW
@given(RECORD_FILES, st.integers(1, 24) | st.integers(25, 1024), st.booleans())
def test_records_load_and_tokenize(rows, seq_len, chat_template):
    body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
    with tempfile.TemporaryDirectory() as tmp:
        path = _write(tmp, "data.jsonl", body)
        try:
            records, fmt = load_records(str(path))
            examples, stats = tokenize_records(records, tokenizer(), seq_len, chat_template)
        except DataError as e:
            event(f"DataError: {e.message.split(':')[-1][:40]}")
            return
    event(f"tokenized ({fmt})")
    assert len(records) == len(rows)
    assert stats.n_examples + stats.n_dropped == stats.n_records == len(rows)
    for ex in examples:
        ids, labels = ex["input_ids"], ex["labels"]
        assert len(labels) == len(ids) == len(ex["attention_mask"])
        assert 0 < len(ids) <= seq_len
        assert all(lab == IGNORE or lab == i for lab, i in zip(labels, ids))
        assert any(lab != IGNORE for lab in labels[1:])


GARBAGE = st.one_of(
    st.binary(max_size=300),
    st.lists(st.sampled_from([b"{", b"}", b"[", b"]", b":", b",", b'"', b"\n", b"\r\n", b" ", b"\xff", b"\xef\xbb\xbf",
                              b'"text"', b'"messages"', b'"instruction"', b'"output"', b'"role"', b'"content"',
                              b'"user"', b'"assistant"', b"1", b"-0.5e3", b"null", b"true", b'"x"', b"\\u2028",
                              b"\x00", b"\xe2\x80\xa8"]), max_size=40).map(b"".join),
)


@SLOW
@given(GARBAGE, st.sampled_from(["data.jsonl", "data.json", "data.csv"]))
def test_garbage_bytes_only_data_error(raw, name):
    with tempfile.TemporaryDirectory() as tmp:
        path = _write(tmp, name, raw)
        try:
            records, fmt = load_records(str(path))
        except DataError as e:
            event("DataError")
            assert e.hint
            return
    event(f"loaded ({fmt})")
    assert records and fmt in ("alpaca", "messages", "sharegpt", "text", "prompt_completion")

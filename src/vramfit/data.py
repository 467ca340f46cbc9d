"""Datasets: load a user's file (or the shipped one), normalize it, tokenize it with
loss only on assistant tokens, and split off a validation set.

Every failure caused by the user's data is a DataError naming the file and the
line or row, so the CLI prints one actionable line instead of a traceback from
json, pyarrow or datasets.
"""

from __future__ import annotations

import bisect
import json
import random
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from vramfit import embedded
from vramfit.config import DataConfig
from vramfit.errors import DataError

IGNORE = -100  # the label value HF losses skip
# The collator's count of real (non-padding) tokens in a batch, a Python int: the trainer
# reads it and drops it before the model's forward. An int, not a tensor, because the batch
# is on the GPU by then and reading a count from it (int(mask.sum())) waits for the GPU to
# finish all it was given: the previous micro-batch's backward, at every micro-batch. (Packed
# rows have no attention_mask to count from either.)
TOKENS_KEY = "vramfit_tokens"
# train.offload_embeddings_async: the batch's input_ids as the collator made them, left on the
# CPU (OnHost), so the embedding lookup in host RAM never reads them back from the GPU
# (offload.embeddings_on_host). The trainer drops it before the model's forward too.
HOST_IDS_KEY = "vramfit_host_ids"
FORMATS = ("alpaca", "messages", "sharegpt", "text", "prompt_completion")
# Columns each format needs, in detection order (first match wins).
REQUIRED = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}
_SUFFIXES = {".jsonl": "json", ".jsonl.gz": "json", ".json": "json", ".json.gz": "json",
             ".csv": "csv", ".parquet": "parquet"}
_ROLES = {"system": "system", "user": "user", "human": "user",
          "assistant": "assistant", "gpt": "assistant", "model": "assistant", "bot": "assistant"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# ---------------------------------------------------------------- loading


def load_records(path: str | Path | None, fmt: str = "auto",
                 max_examples: int | None = None) -> tuple[list[dict], str]:
    """Rows of a dataset normalized to {"messages": [...]} or {"text": ...}; and the format."""
    if fmt != "auto" and fmt not in FORMATS:
        raise DataError(f"unknown data format '{fmt}'", f"use one of: auto, {', '.join(FORMATS)}")
    if path is None:
        path = embedded.dataset_path()
    p = Path(path).expanduser()
    if p.exists():
        rows, columns, name = _load_local(p, max_examples)
    elif isinstance(path, str) and _HUB_ID.match(path) and _suffix(p) not in _SUFFIXES:
        # owner/name with no such local path; "data/train.jsonl" is a missing file, not a hub id.
        rows, columns, name = _load_hub(path, max_examples), None, path
    else:
        raise DataError(f"dataset not found: {path}",
                        "check data.path; use a .jsonl/.json/.csv/.parquet file or a hub id owner/name")
    if not rows:
        raise _empty(name)
    if max_examples is not None:
        rows = rows[:max_examples]
    if columns is None:  # union over rows: JSON rows need not share keys
        columns = list(dict.fromkeys(k for r in rows for k in r))
    fmt = _resolve_format(fmt, columns, name)
    records = [_normalize(fmt, row, f"{name} row {i}") for i, row in enumerate(rows, 1)]
    return records, fmt


def _empty(name: str) -> DataError:
    return DataError(f"dataset {name} is empty (no rows)", "add at least one example to the file")


def _suffix(p: Path) -> str:
    name = p.name.lower()
    for suf in sorted(_SUFFIXES, key=len, reverse=True):  # .jsonl.gz before .gz-less
        if name.endswith(suf):
            return suf
    return p.suffix.lower()


def _load_local(p: Path, max_examples: int | None) -> tuple[list[dict], list[str], str]:
    name = p.name
    if p.is_dir():
        raise DataError(f"dataset path is a directory: {p}",
                        "point data.path at one .jsonl/.json/.csv/.parquet file")
    suf = _suffix(p)
    if suf not in _SUFFIXES:
        raise DataError(f"unsupported dataset file type '{suf or p.name}': {p}",
                        "use .jsonl, .json, .csv or .parquet")
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read dataset {p}: {e.strerror or e}",
                        "check the file permissions") from None
    if not raw.strip():
        raise _empty(name)
    if suf.endswith(".gz"):
        import gzip

        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise DataError(f"{name}: not a valid gzip file ({e})", "re-compress it or use plain .jsonl") from None
    # Our own pass first: json and pyarrow report bad input without a line number,
    # and datasets fails on zero rows with "Instruction 'train' corresponds to no data".
    header: list[str] = []
    if suf.startswith(".json"):
        n = _validate_json(raw, name, array_ok=not suf.startswith(".jsonl"))
    elif suf == ".csv":
        import csv
        import io

        # Long cells are legitimate (whole documents): lift csv's 128 KiB default.
        csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
        try:
            reader = csv.reader(io.StringIO(_check_utf8(raw, name)))
            header = next(reader, [])
            n = sum(1 for r in reader if r)
        except csv.Error as e:
            raise DataError(f"cannot read {name} as csv: {e}", "check quoting: every opened quote must close") from None
    else:
        import pyarrow.parquet as pq

        try:
            n = pq.read_metadata(p).num_rows
        except Exception:  # noqa: BLE001 - not parquet: the datasets reader words the error
            n = -1
    if n == 0:
        raise _empty(name)
    return _via_datasets(p, _SUFFIXES[suf], header, name, max_examples)


def _validate_json(raw: bytes, name: str, array_ok: bool) -> int:
    """Rows in a .jsonl (one object per line) or a .json (a list of objects, one
    object, or a JSON-lines body, as the datasets json reader accepts)."""
    text = _check_utf8(raw, name)
    if array_ok:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            if e.msg != "Extra data":  # "Extra data" = a second value follows: JSON lines
                raise DataError(f"{name} line {e.lineno}: invalid JSON ({e.msg})",
                                "fix the file: a JSON list of objects, or one object per line") from None
        else:
            data = data if isinstance(data, list) else [data]
            for i, item in enumerate(data, 1):
                if not isinstance(item, dict):
                    raise DataError(f"{name} item {i}: expected a JSON object, got {type(item).__name__}",
                                    'every example must be an object such as {"text": ...}')
            return len(data)
    n = 0
    # split("\n"), not splitlines(): U+2028 may sit unescaped inside a JSON string.
    for ln, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{name} line {ln}: invalid JSON ({e.msg} at column {e.colno})",
                            "each line must hold exactly one JSON object; fix or delete that line") from None
        if not isinstance(obj, dict):
            raise DataError(f"{name} line {ln}: expected a JSON object, got {type(obj).__name__}",
                            'each line must hold one object such as {"text": ...}')
        n += 1  # no early stop at max_examples: datasets parses the whole file anyway
    return n


def _check_utf8(raw: bytes, name: str) -> str:
    try:
        return raw.decode("utf-8-sig")  # tolerate a BOM, as editors on Windows write one
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{name} line {line}: not valid UTF-8 (byte 0x{raw[e.start]:02x})",
                        "re-save the file as UTF-8") from None


def _via_datasets(p: Path, builder: str, header: list[str], name: str,
                  max_examples: int | None) -> tuple[list[dict], list[str], str]:
    import datasets

    kwargs: dict[str, Any] = {}
    if builder == "csv":
        # CSV has no types: pandas would turn an "output" column of digits into
        # int64 and empty cells into None; read every column as text instead.
        kwargs = {"features": datasets.Features({c: datasets.Value("string") for c in header}),
                  "keep_default_na": False}
    try:
        ds = datasets.load_dataset(builder, data_files=str(p), split="train", **kwargs)
    except Exception as e:  # noqa: BLE001 - any reader failure is a data problem here
        raise DataError(f"cannot read {name} as {builder}: {_root_cause(e)}",
                        f"check that the file is valid {builder}") from None
    if max_examples is not None and len(ds) > max_examples:
        ds = ds.select(range(max_examples))
    return ds.to_list(), list(ds.column_names), name


def _load_hub(path: str, max_examples: int | None) -> list[dict]:
    import datasets

    try:
        ds = datasets.load_dataset(path, split="train")
        if max_examples is not None and len(ds) > max_examples:
            ds = ds.select(range(max_examples))
        return ds.to_list()
    except Exception as e:  # noqa: BLE001
        raise DataError(f"cannot load dataset '{path}' (no such local file; tried the hub): {_root_cause(e)}",
                        "check data.path, or the network and hub login if it is a hub dataset") from None


def _root_cause(e: BaseException) -> str:
    # datasets wraps the real reason (UnicodeDecodeError, ArrowInvalid...) in a generic error.
    while e.__cause__ is not None:
        e = e.__cause__
    return " ".join(f"{type(e).__name__}: {e}".split())[:300]


# ---------------------------------------------------------------- normalizing


def _resolve_format(fmt: str, columns: list[str], name: str) -> str:
    cols = set(columns)
    if fmt == "auto":
        for cand, req in REQUIRED.items():
            if cols.issuperset(req):
                return cand
        raise DataError(f"{name}: cannot detect the format from columns {sorted(cols)}",
                        "use columns messages, conversations, instruction+output, prompt+completion or "
                        f"text, or set data.format to one of {', '.join(FORMATS)}")
    missing = [c for c in REQUIRED[fmt] if c not in cols]
    if missing:
        raise DataError(f"{name}: format '{fmt}' needs column(s) {', '.join(missing)}; found {sorted(cols)}",
                        "rename the columns or set data.format: auto")
    return fmt


def _field(row: dict, key: str, where: str, required: bool = True) -> str:
    v = row.get(key)
    if v is None:  # datasets fills a key missing from some rows with None
        if required:
            raise DataError(f"{where}: '{key}' is missing", f"every row needs a string '{key}'")
        return ""
    if not isinstance(v, str):
        raise DataError(f"{where}: '{key}' must be a string, got {type(v).__name__}",
                        f"make '{key}' a string in every row")
    return v


def _normalize(fmt: str, row: dict, where: str) -> dict:
    if fmt == "text":
        return {"text": _field(row, "text", where)}
    if fmt == "alpaca":
        user = _field(row, "instruction", where)
        extra = _field(row, "input", where, required=False)
        if extra.strip():
            user = f"{user}\n\n{extra}"
        msgs = [{"role": "user", "content": user},
                {"role": "assistant", "content": _field(row, "output", where)}]
        system = _field(row, "system", where, required=False)
        return {"messages": ([{"role": "system", "content": system}] if system else []) + msgs}
    if fmt == "prompt_completion":
        return {"messages": [{"role": "user", "content": _field(row, "prompt", where)},
                             {"role": "assistant", "content": _field(row, "completion", where)}]}
    key = "messages" if fmt == "messages" else "conversations"
    turns = row.get(key)
    if not isinstance(turns, list):
        raise DataError(f"{where}: '{key}' must be a list of turns, got {type(turns).__name__}",
                        "each row needs a list like [{\"role\": \"user\", \"content\": \"...\"}, ...]")
    msgs = []
    for j, t in enumerate(turns, 1):
        if not isinstance(t, dict):
            raise DataError(f"{where}: turn {j} must be an object, got {type(t).__name__}",
                            "write turns as {\"role\": ..., \"content\": ...}")
        # Accept both spellings in both formats: sharegpt files often use role/content.
        role = t.get("role") if t.get("role") is not None else t.get("from")
        content = t.get("content") if t.get("content") is not None else t.get("value")
        if role not in _ROLES:
            raise DataError(f"{where}: turn {j} has role {role!r}",
                            "roles must be system, user/human or assistant/gpt")
        if not isinstance(content, str):
            raise DataError(f"{where}: turn {j} content must be a string, got {type(content).__name__}",
                            "make every turn's content (or value) a string")
        msgs.append({"role": _ROLES[role], "content": content})
    if not any(m["role"] == "assistant" for m in msgs):
        raise DataError(f"{where}: no assistant turn", "every conversation needs at least one assistant reply")
    return {"messages": msgs}


# ---------------------------------------------------------------- tokenizing


@dataclass
class DataStats:
    n_records: int
    n_examples: int
    n_truncated: int
    n_dropped: int
    mean_tokens: float
    p50_tokens: int
    p95_tokens: int
    max_tokens: int

    @property
    def truncated_share(self) -> float:
        return self.n_truncated / self.n_records if self.n_records else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "truncated_share": round(self.truncated_share, 4)}


def _percentile(sorted_vals: list[int], q: float) -> int:
    # Nearest rank: always a length that occurred, no interpolation.
    idx = max(0, min(len(sorted_vals) - 1, -(-len(sorted_vals) * q // 100) - 1))
    return sorted_vals[int(idx)]


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _render(tokenizer, messages: list[dict], gen: bool) -> str:
    out = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    if not isinstance(out, str):  # some versions hand back a list for batched input
        out = out[0]
    return out


def _chat_with_template(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Labels = the text a template adds between the generation prompt and the end of a turn.

    Reply i spans render(messages[:i], generation prompt) .. render(messages[:i+1]) of
    the whole rendered conversation. The text is cut at those spans and each piece is
    encoded on its own, so a label span never straddles a token merge.
    """
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    messages = messages[: last + 1]  # turns after the last reply teach nothing
    final = _render(tokenizer, messages, gen=False)
    ids: list[int] = []
    labels: list[int] = []
    pos = 0  # characters of `final` already encoded
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = _render(tokenizer, messages[:i], gen=True)
        full = _render(tokenizer, messages[: i + 1], gen=False)
        # Templates that rewrite earlier turns (Qwen3 drops their <think> block) render
        # this reply differently inside the whole conversation: it stays unlabelled
        # context. The last reply always lines up, since then full == final.
        if not (full.startswith(prefix) and final.startswith(full)) or len(prefix) < pos:
            continue
        ctx = _encode(tokenizer, final[pos:len(prefix)])
        reply = _encode(tokenizer, final[len(prefix):len(full)])
        ids += ctx + reply
        labels += [IGNORE] * len(ctx) + reply
        pos = len(full)
    if pos == 0:
        raise DataError("the chat template's generation prompt does not start the assistant turn it renders",
                        "set data.chat_template: false to use the plain instruction format")
    return ids, labels


def _chat_plain(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """No template: '### Instruction/### Response' blocks, eos closes each reply."""
    eos = tokenizer.eos_token_id
    ids: list[int] = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    labels: list[int] = [IGNORE] * len(ids)
    pending: list[str] = []  # system/user text waiting for the next reply
    for m in messages:
        if m["role"] == "system":
            ctx = _encode(tokenizer, m["content"] + "\n\n")
            ids += ctx
            labels += [IGNORE] * len(ctx)
        elif m["role"] == "user":
            pending.append(m["content"])
        else:
            head = f"### Instruction:\n{chr(10).join(pending)}\n\n" if pending else ""
            ctx = _encode(tokenizer, head + "### Response:\n")
            reply = _encode(tokenizer, m["content"]) + ([eos] if eos is not None else [])
            ids += ctx + reply
            labels += [IGNORE] * len(ctx) + reply
            pending = []
    return ids, labels


def tokenize_records(records: list[dict], tokenizer, seq_len: int,
                     use_chat_template: bool = True) -> tuple[list[dict], DataStats]:
    """Token ids, labels (-100 outside assistant replies) and masks, cut to seq_len."""
    if not records:
        raise DataError("the dataset has no records", "add examples to the dataset")
    templated = use_chat_template and bool(getattr(tokenizer, "chat_template", None))
    examples: list[dict] = []
    lengths: list[int] = []
    n_trunc = n_drop = 0
    for n, rec in enumerate(records, 1):
        if "text" in rec:
            ids = _encode(tokenizer, rec["text"])
            if tokenizer.bos_token_id is not None:
                ids = [tokenizer.bos_token_id] + ids
            if tokenizer.eos_token_id is not None:
                ids.append(tokenizer.eos_token_id)
            labels = list(ids)
        elif templated:
            try:
                ids, labels = _chat_with_template(tokenizer, rec["messages"])
            except DataError:
                raise
            except Exception as e:  # noqa: BLE001 - templates raise on data they reject
                # e.g. "roles must alternate user/assistant" from Mistral/Gemma templates
                raise DataError(f"record {n}: the chat template rejected it: {_root_cause(e)}",
                                "fix the conversation or set data.chat_template: false") from None
        else:
            ids, labels = _chat_plain(tokenizer, rec["messages"])
        lengths.append(len(ids))
        if len(ids) > seq_len:
            n_trunc += 1
            ids, labels = ids[:seq_len], labels[:seq_len]
        # Causal LMs shift labels by one, so labels[0] is never a target: an example
        # with nothing labelled after position 0 would only add a zero loss.
        if all(v == IGNORE for v in labels[1:]):
            n_drop += 1
            continue
        examples.append({"input_ids": ids, "labels": labels, "attention_mask": [1] * len(ids)})
    if not examples:
        raise DataError(f"all {len(records)} examples lost every trained token when cut to seq_len {seq_len}",
                        f"raise data.seq_len (the longest example has {max(lengths)} tokens)")
    s = sorted(lengths)
    stats = DataStats(n_records=len(records), n_examples=len(examples), n_truncated=n_trunc,
                      n_dropped=n_drop, mean_tokens=round(sum(s) / len(s), 2),
                      p50_tokens=_percentile(s, 50), p95_tokens=_percentile(s, 95), max_tokens=s[-1])
    return examples, stats


# ---------------------------------------------------------------- datasets and batches


def build_datasets(cfg: DataConfig, tokenizer, seed: int) -> tuple[Any, Any | None, DataStats, str]:
    """(train, val or None, stats, format): datasets.Dataset objects for Trainer."""
    import datasets

    records, fmt = load_records(cfg.path, cfg.format, cfg.max_examples)
    examples, stats = tokenize_records(records, tokenizer, cfg.seq_len, cfg.chat_template)
    val_idx: set[int] = set()
    if cfg.val_fraction > 0:
        n_val = max(1, round(len(examples) * cfg.val_fraction))
        if n_val >= len(examples):
            raise DataError(f"val_fraction {cfg.val_fraction} leaves no training examples "
                            f"out of {len(examples)}", "lower data.val_fraction or add examples")
        # Own RNG: the split depends on the seed only, not on global random state.
        val_idx = set(random.Random(seed).sample(range(len(examples)), n_val))

    def to_ds(rows: list[dict]):
        # Packed after the split, so no row mixes training and validation examples.
        if cfg.packing:
            rows = pack_examples(rows, cfg.seq_len)
        return datasets.Dataset.from_dict({k: [r[k] for r in rows] for k in rows[0]})

    train = to_ds([e for i, e in enumerate(examples) if i not in val_idx])
    val = to_ds([e for i, e in enumerate(examples) if i in val_idx]) if val_idx else None
    return train, val, stats, fmt


# ---------------------------------------------------------------- packing


def pack_rows(lengths: list[int] | tuple[int, ...], capacity: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into rows of at most ``capacity`` tokens.

    Best-fit decreasing: longest first, each into the fullest row it still fits. Examples
    are never split: a continuation in another row would train without its prompt.
    Deterministic (ties by index), so planning and training pack alike.
    """
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (tokens left, row), sorted: bisect finds the best fit
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"example {i} has {n} tokens, more than a row's {capacity}")
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            left, r = free.pop(k)
        else:
            left, r = capacity, len(rows)
            rows.append([])
        rows[r].append(i)
        if left - n > 0:
            bisect.insort(free, (left - n, r))
    return rows


def pack_examples(examples: list[dict], seq_len: int) -> list[dict]:
    """Tokenized examples (already cut to seq_len) -> rows of whole examples.

    position_ids restart at 0 for each example: with no attention_mask, transformers
    (masking_utils.find_packed_sequence_indices) reads a restart as a new sequence and
    masks attention to stay inside it. Each example's first label is IGNORE so its first
    token is not predicted from the example before it (the label sat at position 0,
    which a causal LM never predicts anyway: the loss is unchanged). The convention of
    transformers' DataCollatorWithFlattening, which flattens a whole micro-batch into
    one row instead of rows of seq_len.
    """
    rows = []
    for idx in pack_rows([len(e["input_ids"]) for e in examples], seq_len):
        row: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
        for i in idx:
            ids, labels = examples[i]["input_ids"], examples[i]["labels"]
            row["input_ids"] += ids
            row["labels"] += [IGNORE] + list(labels[1:])
            row["position_ids"] += list(range(len(ids)))
        rows.append(row)
    return rows


class OnHost:
    """A tensor that stays on the CPU when the batch goes to the GPU: Accelerate's
    send_to_device and the DataLoader's pinning pass an object that has neither ``to`` nor
    ``pin_memory`` through as it is."""

    __slots__ = ("tensor",)

    def __init__(self, tensor) -> None:
        self.tensor = tensor


@dataclass
class Collator:
    """Right-pads a batch to its longest example: pad id / mask 0 / label -100.

    Packed rows (they carry position_ids) get no attention_mask: transformers ignores
    position_ids for masking when a mask is given, and attention would cross examples.
    Their padding continues as one more sequence (positions from 0), which no real token
    attends to (it comes after them) and no label reads.
    """

    tokenizer: Any
    pad_to_multiple_of: int | None = None
    max_len: int | None = None  # the rounding never pads past this (seq_len)
    host_ids: bool = False  # also hand the trainer the CPU ids (HOST_IDS_KEY)

    def __post_init__(self) -> None:
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id
        # Any id works when masked out and unlabelled; 0 is valid in every vocab.
        self.pad_id = 0 if pad is None else int(pad)

    def __call__(self, features: list[dict]):
        import torch

        longest = max(len(f["input_ids"]) for f in features)
        # Only batches that pad anyway (config.py says why not a single sequence).
        if self.pad_to_multiple_of and (len(features) > 1 or "position_ids" in features[0]):
            m = self.pad_to_multiple_of
            rounded = -(-longest // m) * m
            longest = max(longest, min(rounded, self.max_len)) if self.max_len else rounded
        if "position_ids" in features[0]:
            return self._packed(features, longest)
        out: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
        for f in features:
            ids = [int(x) for x in f["input_ids"]]
            n = longest - len(ids)
            mask = [int(x) for x in f.get("attention_mask", [1] * len(ids))]
            labels = [int(x) for x in f.get("labels", ids)]
            out["input_ids"].append(ids + [self.pad_id] * n)
            out["attention_mask"].append(mask + [0] * n)
            out["labels"].append(labels + [IGNORE] * n)
        tokens = sum(sum(m) for m in out["attention_mask"])
        if tokens == len(features) * longest:
            # Nothing to mask: no mask. transformers would check an all-ones mask on the GPU
            # (masking_utils' padding_mask.all(), to hand SDPA none): a read that makes the CPU
            # wait for the GPU's whole queue at the start of every micro-batch's forward.
            del out["attention_mask"]
        batch = {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}
        batch[TOKENS_KEY] = tokens
        return self._with_host_ids(batch)

    def _packed(self, features: list[dict], longest: int):
        import torch

        out: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "position_ids": []}
        for f in features:
            n = longest - len(f["input_ids"])
            out["input_ids"].append([int(x) for x in f["input_ids"]] + [self.pad_id] * n)
            out["labels"].append([int(x) for x in f["labels"]] + [IGNORE] * n)
            out["position_ids"].append([int(x) for x in f["position_ids"]] + list(range(n)))
        batch = {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}
        batch[TOKENS_KEY] = sum(len(f["input_ids"]) for f in features)
        return self._with_host_ids(batch)

    def _with_host_ids(self, batch: dict) -> dict:
        if self.host_ids:
            batch[HOST_IDS_KEY] = OnHost(batch["input_ids"])
        return batch

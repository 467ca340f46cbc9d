"""What vramfit ships so it runs with no downloads: a tiny model config, a byte-level
tokenizer built in code, and a small instruction dataset (``instructions.jsonl``,
written by ``scripts/make_embedded_dataset.py``)."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

EMBEDDED_MODEL = "embedded:tiny"  # how plans name the shipped model
SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|user|>", "<|assistant|>", "<|system|>"]
# One template for every role; a generation prompt opens the assistant turn, so the
# response tokens are exactly what follows it (the masking in data.py relies on that).
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|eos|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _file(name: str) -> Path:
    return Path(str(resources.files("vramfit.embedded") / name))


def tiny_config() -> dict[str, Any]:
    return json.loads(_file("tiny_config.json").read_text())


def dataset_path() -> Path:
    return _file("instructions.jsonl")


def byte_tokenizer():
    """A 262-token byte-level tokenizer: 6 specials + 256 bytes, no merges, no download."""
    from tokenizers import Tokenizer, decoders, models
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {s: i for i, s in enumerate(SPECIAL_TOKENS)}
    for ch in sorted(ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<|pad|>",
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        additional_special_tokens=SPECIAL_TOKENS[3:],
    )
    tok.chat_template = CHAT_TEMPLATE
    tok.model_max_length = 1 << 20
    return tok

"""Where a run's weights come from: a local directory, a hub id, or a model built here.

``random_weights`` builds a model of any architecture from its config.json with
random weights and saves it like a downloaded one. Memory and speed do not depend
on the weights' values, so this is how vramfit calibrates and benchmarks real
architectures without downloads, and how the embedded tiny model comes to exist.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from . import embedded
from .embedded import EMBEDDED_MODEL


def cache_dir() -> Path:
    root = os.environ.get("VRAMFIT_HOME") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vramfit"
    return Path(root)


def random_weights(
    config: dict[str, Any],
    out: Path,
    tokenizer=None,
    seed: int = 0,
    dtype: str = "bfloat16",
    device: str = "cpu",
) -> Path:
    """Build ``config`` with random weights (transformers' own init) and save it to ``out`` atomically."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = {k: v for k, v in config.items() if k not in ("architectures", "torch_dtype", "dtype")}
    hf_config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    torch.manual_seed(seed)
    # Building directly on the target device runs the init kernels there: seconds
    # for a 7B on a GPU, where a CPU init would take minutes.
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=getattr(torch, dtype))
    out = Path(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    del model
    return out


def embedded_model_dir() -> Path:
    """The embedded tiny model, built once (deterministically) into the cache."""
    config = embedded.tiny_config()
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:10]
    out = cache_dir() / f"embedded-tiny-{digest}"
    if not (out / "config.json").is_file():
        random_weights(config, out, tokenizer=embedded.byte_tokenizer(), seed=0, dtype="float32")
    return out


def resolve_model_dir(ref: str) -> str:
    """A path or hub id that ``from_pretrained`` accepts."""
    return str(embedded_model_dir()) if ref == EMBEDDED_MODEL else ref


def load_tokenizer(ref: str, trust_remote_code: bool = False):
    if ref == EMBEDDED_MODEL:
        return embedded.byte_tokenizer()
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(ref, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        from .errors import ModelError

        raise ModelError(
            f"cannot load a tokenizer from {ref}: {' '.join(str(e).split())[:200]}",
            "the model directory needs its tokenizer files (tokenizer.json or tokenizer.model)",
        ) from None
    # transformers 5 builds a tokenizer with no vocabulary from a config.json alone (its
    # model_type names the class; the vocabulary files are simply missing): every text then
    # becomes no tokens, and the data step would blame the sequence length instead.
    if not tok("vramfit checks the tokenizer", add_special_tokens=False)["input_ids"]:
        from .errors import ModelError

        raise ModelError(
            f"the tokenizer loaded from {ref} has no vocabulary (it turns text into no tokens)",
            "the model directory needs its tokenizer files (tokenizer.json or tokenizer.model)",
        )
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok

"""config.json -> ModelShape: the numbers the memory model needs, without loading weights."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .embedded import EMBEDDED_MODEL, tiny_config
from .errors import ModelError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ModelShape:
    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    attention_bias: bool

    # --- parameter counts (elements, not bytes)
    def layer_linears(self) -> dict[str, tuple[int, int]]:
        """Linear layers of one decoder block: name -> (in_features, out_features)."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        if self.model_type == "phi3":  # fused projections
            return {"qkv_proj": (h, q + 2 * kv), "o_proj": (q, h), "gate_up_proj": (h, 2 * i), "down_proj": (i, h)}
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    @property
    def linear_params(self) -> int:
        """Weights of the decoder blocks' linear layers (what 4-bit quantization touches)."""
        per_layer = sum(a * b for a, b in self.layer_linears().values())
        if self.attention_bias:
            per_layer += self.heads * self.head_dim + 2 * self.kv_heads * self.head_dim
        return per_layer * self.layers

    @property
    def embed_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def head_params(self) -> int:
        return 0 if self.tied else self.vocab * self.hidden

    @property
    def norm_params(self) -> int:
        return self.hidden * (2 * self.layers + 1)

    @property
    def total_params(self) -> int:
        return self.linear_params + self.embed_params + self.head_params + self.norm_params

    def lora_params(self, r: int, targets: list[str] | str) -> int:
        """Trainable LoRA elements: r * (in + out) per targeted linear layer."""
        linears = self.layer_linears()
        names = list(linears) if targets == "all-linear" else [t for t in targets if t in linears]
        return self.layers * sum(r * (linears[n][0] + linears[n][1]) for n in names)

    def unknown_targets(self, targets: list[str] | str) -> list[str]:
        if targets == "all-linear":
            return []
        return [t for t in targets if t not in self.layer_linears()]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["total_params"] = self.total_params
        return d


def shape_from_config(cfg: dict[str, Any]) -> ModelShape:
    cfg = cfg.get("text_config", cfg) if "hidden_size" not in cfg else cfg
    try:
        hidden = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        return ModelShape(
            model_type=str(cfg.get("model_type", "unknown")),
            hidden=hidden,
            layers=int(cfg["num_hidden_layers"]),
            heads=heads,
            kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            intermediate=int(cfg["intermediate_size"]),
            vocab=int(cfg["vocab_size"]),
            tied=bool(cfg.get("tie_word_embeddings", False)),
            # Qwen2 has q/k/v biases without saying so in config.json.
            attention_bias=bool(cfg.get("attention_bias", cfg.get("model_type") == "qwen2")),
        )
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
        raise ModelError(
            f"config.json lacks a decoder-only field: {e}",
            "vramfit supports decoder-only causal LMs (llama, qwen2, mistral, gemma, phi3)",
        ) from None


def read_model_config(name: str | None) -> dict[str, Any]:
    """A local directory's config.json, the embedded tiny model, or a hub id's config.json."""
    if name in (None, EMBEDDED_MODEL):
        return tiny_config()
    path = Path(name).expanduser()
    if path.exists():
        cfg_file = path / "config.json" if path.is_dir() else path
        if not cfg_file.is_file():
            raise ModelError(f"no config.json in {path}", "point --model at a Hugging Face model directory")
        return _load_json(cfg_file)
    if HUB_ID.match(name):
        try:
            from huggingface_hub import hf_hub_download

            return _load_json(Path(hf_hub_download(name, "config.json")))
        except Exception as e:  # offline, gated, missing: all the same to the user
            raise ModelError(
                f"cannot fetch config.json for {name!r} ({type(e).__name__})",
                "check the model id and network, or pass a local model directory",
            ) from None
    raise ModelError(f"model not found: {name}", "pass a local model directory or a hub id like Qwen/Qwen2.5-7B")


def _load_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"cannot read {path}: {e}", "the model's config.json must be valid JSON") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path} is not a JSON object", "the model's config.json must be valid JSON")
    return data


def load_shape(name: str | None) -> ModelShape:
    return shape_from_config(read_model_config(name))

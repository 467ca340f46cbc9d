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

# What transformers (5.x configuration_*.py) assumes when config.json leaves a key out:
# Gemma's published config.json has no tie_word_embeddings (its head is the embedding),
# and Qwen2 has q/k/v biases without an attention_bias key.
TYPE_DEFAULTS: dict[str, dict[str, Any]] = {
    "qwen2": {"attention_bias": True},
    "gemma": {"tie_word_embeddings": True},
    "gemma2": {"tie_word_embeddings": True, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0},
    "gemma3_text": {"tie_word_embeddings": True},
    "cohere": {"tie_word_embeddings": True},
    "cohere2": {"tie_word_embeddings": True},
    "starcoder2": {"tie_word_embeddings": True},
    "smollm3": {"tie_word_embeddings": True},
}
# RMSNorms per decoder block: Gemma2 adds one before and one after the MLP to the usual two.
LAYER_NORMS = {"gemma2": 4}
# Layers that fuse several projections (phi3): the separate names a target list may use
# for each, all of which must be targeted together.
FUSED = {"phi3": {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}}

# Decoder layers that end in ``residual + mlp.down_proj(act(gate) * up)`` with nothing after
# (transformers 5.x; liger's SwiGLU keeps that form): the recomputation of a checkpointed one
# never reads down_proj's output (kernels.lean_recompute, fused_lora.py). Not gemma2/gemma3
# (a norm after the MLP) nor phi3 (a dropout after it).
DOWN_PROJ_LAST = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma"})

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
    layer_norms: int = 2
    attn_softcap: bool = False  # tanh-capped attention scores (gemma2)
    final_softcap: bool = False  # tanh-capped logits (gemma2)
    attention_dropout: float = 0.0

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
        return self.hidden * (self.layer_norms * self.layers + 1)

    @property
    def total_params(self) -> int:
        return self.linear_params + self.embed_params + self.head_params + self.norm_params

    def resolve_targets(self, targets: list[str] | str) -> list[str] | str:
        """LoRA target names as this model's modules are called: q_proj, k_proj and v_proj
        together name phi3's fused qkv_proj (gate_proj and up_proj its gate_up_proj), so
        one target list serves every architecture. Unknown names are left for
        unknown_targets to report."""
        if targets == "all-linear":
            return targets
        out = list(targets)
        for fused, parts in FUSED.get(self.model_type, {}).items():
            if all(p in out for p in parts):
                out = [fused if t == parts[0] else t for t in out if t not in parts[1:]]
        return list(dict.fromkeys(out))

    def split_fused_targets(self, targets: list[str] | str) -> list[str]:
        """Targets naming only part of a fused layer: they cannot be adapted alone."""
        resolved = self.resolve_targets(targets)
        parts = {p for ps in FUSED.get(self.model_type, {}).values() for p in ps}
        return [] if resolved == "all-linear" else [t for t in resolved if t in parts]

    def lora_params(self, r: int, targets: list[str] | str) -> int:
        """Trainable LoRA elements: r * (in + out) per targeted linear layer."""
        linears = self.layer_linears()
        names = list(linears) if targets == "all-linear" else [t for t in self.resolve_targets(targets) if t in linears]
        return self.layers * sum(r * (linears[n][0] + linears[n][1]) for n in names)

    def unknown_targets(self, targets: list[str] | str) -> list[str]:
        if targets == "all-linear":
            return []
        return [t for t in self.resolve_targets(targets) if t not in self.layer_linears()]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["total_params"] = self.total_params
        return d


def shape_from_config(cfg: dict[str, Any]) -> ModelShape:
    cfg = cfg.get("text_config", cfg) if "hidden_size" not in cfg else cfg
    model_type = str(cfg.get("model_type", "unknown"))
    cfg = {**TYPE_DEFAULTS.get(model_type, {}), **cfg}
    try:
        hidden = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        return ModelShape(
            model_type=model_type,
            hidden=hidden,
            layers=int(cfg["num_hidden_layers"]),
            heads=heads,
            kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            intermediate=int(cfg["intermediate_size"]),
            vocab=int(cfg["vocab_size"]),
            tied=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", False)),
            layer_norms=LAYER_NORMS.get(model_type, 2),
            attn_softcap=bool(cfg.get("attn_logit_softcapping")),
            final_softcap=bool(cfg.get("final_logit_softcapping")),
            attention_dropout=float(cfg.get("attention_dropout") or 0.0),
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

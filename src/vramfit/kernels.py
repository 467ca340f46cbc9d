"""Which kernels exist for which architectures: plain data, so planning never imports Triton."""

from __future__ import annotations

# Architectures liger-kernel (0.8) patches, text decoders only
# (liger_kernel.transformers.monkey_patch.MODEL_TYPE_TO_APPLY_LIGER_FN). Kept here, not
# imported: planning must not import Triton.
LIGER_MODEL_TYPES = frozenset(
    "deepseek_v2 deepseek_v3 exaone4 falcon_h1 gemma gemma2 gemma3_text glm4 granite llama llama4_text ministral "
    "mistral mixtral nemotron olmo2 olmo3 phi3 qwen2 qwen3 qwen3_moe smollm3".split()
)

# Decoder architectures whose transformers (5.x) model sets _supports_sdpa = False, so
# that loading them with attn_implementation="sdpa" fails: gemma2 because sdpa cannot
# softcap the attention scores. Eager attention (or flash attention) is theirs.
NO_SDPA_MODEL_TYPES = frozenset(
    "deepseek_v4 gemma2 gpt_oss granite_swa granitemoe_swa hy_v4 mimo_v2_flash vaultgemma".split()
)


def liger_installed() -> bool:
    """Whether liger-kernel (the fused loss; the `kernels` extra) is importable: auto-fit
    only chooses the fused loss where training can use it."""
    import importlib.util

    return importlib.util.find_spec("liger_kernel") is not None


def flash_attn_installed() -> bool:
    """Whether the flash_attn package that attn_implementation=flash_attention_2 loads is
    importable (without it transformers would fetch a kernel from the hub instead)."""
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None

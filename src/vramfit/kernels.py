"""Which kernels exist for which architectures: plain data, so planning never imports Triton."""

from __future__ import annotations

# Architectures liger-kernel (0.8) patches, text decoders only
# (liger_kernel.transformers.monkey_patch.MODEL_TYPE_TO_APPLY_LIGER_FN). Kept here, not
# imported: planning must not import Triton.
LIGER_MODEL_TYPES = frozenset(
    "deepseek_v2 deepseek_v3 exaone4 falcon_h1 gemma gemma2 gemma3_text glm4 granite llama llama4_text ministral "
    "mistral mixtral nemotron olmo2 olmo3 phi3 qwen2 qwen3 qwen3_moe smollm3".split()
)

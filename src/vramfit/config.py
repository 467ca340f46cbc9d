"""The one typed vocabulary of a run: pydantic models, no I/O.

Every section forbids unknown keys, so a typo is an error instead of a silently
ignored setting. ``presets.py`` layers dicts into these models; everything after
that (plan, render, train, merge) reads only the validated ``RunConfig``.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator, model_validator

# Whole words of a variable name (HF_TOKEN, AWS_SECRET_ACCESS_KEY, WANDB_API_KEY), so
# that TOKENIZERS_PARALLELISM is not mistaken for one.
SECRET_NAME = re.compile(
    r"(^|_)(TOKEN|SECRET|PASSWORD|PASSWD|API_KEY|APIKEY|ACCESS_KEY|PRIVATE_KEY|CREDENTIALS?)(_|$)", re.IGNORECASE
)

Method = Literal["full", "lora", "qlora"]
DType = Literal["auto", "bfloat16", "float16", "float32"]
Attn = Literal["sdpa", "eager", "flash_attention_2"]
DataFormat = Literal["auto", "alpaca", "messages", "sharegpt", "text", "prompt_completion"]
Optimizer = Literal[
    "adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "sgd"
]
Scheduler = Literal["linear", "cosine", "constant", "constant_with_warmup"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    # None means the tiny model that ships inside the package (CPU demo, tests).
    name: str | None = None
    dtype: DType = "auto"
    attn_implementation: Attn = "sdpa"
    # Off by default: loading a model must never run code from the hub unasked.
    trust_remote_code: bool = False


class LoraConfig(_Section):
    r: PositiveInt = 16
    alpha: PositiveInt = 32
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    # Module names, or "all-linear" (PEFT picks every linear layer but the head).
    target_modules: list[str] | Literal["all-linear"] = ["q_proj", "k_proj", "v_proj", "o_proj"]


class QuantConfig(_Section):
    """bitsandbytes settings; used only when method == 'qlora'."""

    bits: Literal[4, 8] = 4
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    # PEFT's prepare_model_for_kbit_training upcasts embeddings and lm_head to
    # fp32: 2.2 GiB extra on Qwen2.5-7B (shared/gpu/README.md). Keeping them
    # 16-bit is what lets a 7B QLoRA fit an 8 GB card.
    upcast_embeddings: bool = False


class DataConfig(_Section):
    # None means the instruction dataset that ships inside the package.
    path: str | None = None
    format: DataFormat = "auto"
    seq_len: PositiveInt = 1024
    val_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    # Use the tokenizer's chat template when it has one.
    chat_template: bool = True
    max_examples: PositiveInt | None = None
    # Several whole examples per row of up to seq_len tokens, each attending only to
    # itself (position_ids restart per example; transformers builds the block-diagonal
    # mask from them). A micro-batch then holds micro_batch rows, not examples.
    packing: bool = False
    # Pad a micro-batch of several sequences to a multiple of this many tokens (never past
    # seq_len); None pads to the longest. Such a batch carries an attention mask, and on an
    # H200 a Qwen2.5-0.5B plan on varied lengths trained 1.5x faster at 64 than unrounded
    # (docs/benchmarks/autofit.md, "Padding"). A single sequence is never padded: it needs
    # no mask, and a mask is what the slow lengths are slow with.
    pad_to_multiple_of: PositiveInt | None = 64


class TrainConfig(_Section):
    micro_batch: PositiveInt = 1
    grad_accum: PositiveInt = 16
    # max_steps > 0 wins over epochs, as in TrainingArguments.
    max_steps: int = Field(-1, ge=-1)
    epochs: float = Field(1.0, gt=0)
    lr: float = Field(2e-4, gt=0)
    scheduler: Scheduler = "cosine"
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    optimizer: Optimizer = "adamw_torch"
    grad_ckpt: bool = True
    # With grad_ckpt, checkpoint only the first N decoder layers (None: all of them). The
    # others keep what they save for backward, so the backward recomputes N layers, not all:
    # where a budget has room for some layers' activations but not every layer's, that is
    # less recomputation for the same peak. The last layers are the ones kept, since their
    # backward runs first and frees them before any recomputation begins. Auto-fit picks the
    # fewest that fit (fit.py).
    grad_ckpt_layers: PositiveInt | None = None
    # Keep what autograd saves for backward in host RAM instead of on the GPU: with
    # grad_ckpt, each decoder layer's input (layers x tokens x hidden); without, every
    # tensor each layer saves. It crosses PCIe twice per micro-batch (src/vramfit/offload.py).
    offload_activations: bool = False
    # With offload_activations and grad_ckpt on a GPU: copy the layer inputs out and back on
    # a CUDA stream of their own, each fetched back one layer ahead of its recomputation,
    # instead of on the compute stream, where every copy stalls the kernels after it (a 7B's
    # inputs at micro-batch 8 x 1536 tokens: ~0.18 s of a 2.5 s step). Off by default; auto-fit
    # tries both where the inputs are in host RAM and takes it where faster and it fits: on
    # H100s 4-8% faster (speed.ASYNC_HIDDEN_S_PER_GB), 0.46-0.48 GiB higher peaks (the
    # allocator's reserve, memory.OFFLOAD_ASYNC_RESERVE_INPUTS, checked on three shapes).
    # offload.StreamCopies; CPU runs copy in order either way. Without offload_activations and
    # grad_ckpt it does nothing.
    offload_async: bool = False
    # Keep the (frozen) input embedding table in host RAM: the lookup runs on the CPU and
    # only the rows looked up cross PCIe. A 7-8B model's table is 1 GiB in 16 bits, an
    # eighth of an 8 GB card. Adapter methods on one GPU without DeepSpeed only (offload.py).
    offload_embeddings: bool = False
    # With offload_embeddings on a GPU: look the rows up without stalling the GPU
    # (offload._OverlappedLookup): the ids are the collator's CPU copy (never read back from
    # the GPU), the rows are gathered into pinned memory on a few threads and copied without
    # the CPU waiting, so the gather runs while the GPU finishes the previous micro-batch.
    # The plain lookup's copy of the ids waits for the whole queue first, then the GPU idles
    # through the gather (a 7B's 8192 rows took 32 ms on one core of the CPU machine). The
    # same rows, bit for bit. On by default: on an H100 the 8 GB plan measured +2.9% and
    # +1.5% with it in two pairs of runs (docs/benchmarks/speed/23-8gb-ab/); the speed model
    # leaves the lookup out of the step where it is on (speed.step_features).
    offload_embeddings_async: bool = True
    seed: int = 42
    logging_steps: PositiveInt = 1
    save_steps: PositiveInt = 50
    save_total_limit: PositiveInt = 2
    eval_steps: PositiveInt = 50
    dataloader_workers: int = Field(0, ge=0)


class KernelsConfig(_Section):
    """Kernels that trade compute for memory: liger-kernel's fused loss and fused ops (Triton:
    NVIDIA GPUs only, applied by the HF Trainer) and DeepSpeed's tiled MLP (any device)."""

    # Fused linear cross-entropy: the loss over the vocabulary is computed chunk by chunk
    # together with the output projection, so full-vocabulary logits (12 bytes per token
    # and vocabulary entry at the loss's peak: 7 GiB at 4096 tokens of a 152k vocabulary)
    # never exist.
    fused_loss: bool = False
    # liger-kernel's fused RMSNorm, SwiGLU and RoPE (Triton), patched into the model by the
    # HF Trainer like the fused loss. Fewer kernel launches and smaller saved activations
    # (the SwiGLU keeps only its two inputs). Off by default in presets; `--preset auto`
    # turns it on where liger-kernel knows the architecture (memory.liger_swiglu,
    # speed.LIGER_LAYER_PASS). With kernels.tiled_mlp the SwiGLU is left out (the tiled
    # MLP replaces the same forward).
    liger_ops: bool = False
    # Each decoder layer's MLP computed over chunks of about `hidden` tokens of the sequence
    # (DeepSpeed's TiledMLP), and recomputed chunk by chunk in the backward: its
    # intermediates (3 x intermediate_size values per token, most of a layer's activations)
    # exist for one chunk at a time. One more MLP forward per step: for long sequences.
    tiled_mlp: bool = False
    # 16-bit LoRA's adapted linear layers as one autograd function (fused_lora.py): the
    # adapter's scaling and its add into the base output run inside the matrix multiplies,
    # and the backward joins the two input gradients in one kernel, instead of PEFT's
    # separate elementwise kernels per layer and pass (16% of a 7B r128 all-linear step).
    # For QLoRA's 4-bit layers, the adapter's scaling and add in one kernel on bitsandbytes'
    # output. The same arithmetic and, for a seed, the same dropout masks (tests/test_fused_lora.py,
    # on the CPU and on an H100). On by default since measured: on an H100 the 24 GB guide's
    # r128 all-linear plan ran 7.6% faster (9,930 against 9,226 tokens/s) at 0.2 GiB less, the 8
    # GB QLoRA r8 q/v plan 1.3% (docs/benchmarks/speed-checks/16-fused-lora-and-async). Not under
    # ZeRO-3; false gives PEFT's layers as they are.
    fused_lora: bool = True
    # With fused_lora and grad_ckpt: a checkpointed decoder layer's recomputation leaves out
    # the base multiply of its down_proj, whose output only the layer's output reads, which the
    # backward never needs (fused_lora.py says how; llama, mistral, qwen2/3 and gemma layers:
    # model_shape.DOWN_PROJ_LAST). Where down_proj is adapted that is its largest matrix multiply
    # done for nothing: Qwen2.5-7B's down_proj holds 68M of a layer's 233M weights. The same
    # gradients (tests/test_fused_lora.py). Not with PEFT's own layers (fused_lora false). An
    # unadapted 4-bit down_proj needs nothing: bitsandbytes' layer saves no tensor, so torch's
    # checkpoint already stops the recomputation before it.
    lean_recompute: bool = True
    # With liger_ops, grad_ckpt and QLoRA: a checkpointed layer's recomputation leaves out
    # liger's SwiGLU kernel where down_proj is a 4-bit layer with no adapter (lean_mlp.py):
    # nothing after the SwiGLU saves a tensor, so torch's checkpoint stops at its save and
    # the product the kernel writes is never read. The same gradients, bit for bit
    # (tests/test_lean_mlp.py, on the CPU and with liger on an H100). The product is not made:
    # on an H100 the 8 GB plan peaked 0.29 GiB lower (7.17 against 7.47 GiB) at the same
    # speed (docs/benchmarks/speed/23-8gb-ab/); memory.lean_mlp_skips_product counts it.
    lean_mlp: bool = True


class DeepSpeedConfig(_Section):
    stage: Literal[0, 2, 3] = 0
    offload_optimizer: bool = False
    offload_params: bool = False

    @model_validator(mode="after")
    def _offload_needs_zero(self) -> DeepSpeedConfig:
        if self.offload_params and self.stage != 3:
            raise ValueError("offload_params needs stage 3")
        if self.offload_optimizer and self.stage == 0:
            raise ValueError("offload_optimizer needs stage 2 or 3")
        return self


class LaunchConfig(_Section):
    gpus: PositiveInt = 1
    nodes: PositiveInt = 1
    node_rank: int = Field(0, ge=0)
    # Node 0's address as every node reaches it. No whitespace: it goes on accelerate's
    # command line, and an empty or spaced value is a typo, not a host.
    master_addr: str = Field("127.0.0.1", min_length=1, pattern=r"^\S+$")
    master_port: int = Field(29500, gt=0, lt=65536)
    # Written into launch.sh so the allocator/threading behaviour belongs to the
    # plan, not to whatever the user's shell happens to export.
    env: dict[str, str] = {
        "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
        "TOKENIZERS_PARALLELISM": "false",
    }

    @field_validator("env")
    @classmethod
    def _no_secrets(cls, v: dict[str, str]) -> dict[str, str]:
        # launch.sh and plan.yaml are plain files that get copied and shared.
        secret = [k for k in v if SECRET_NAME.search(k)]
        if secret:
            raise ValueError(
                f"{secret[0]} looks like a secret; it would be written into launch.sh and plan.yaml. "
                "Export it in the shell that runs vramfit instead"
            )
        return v

    @field_validator("env", mode="before")
    @classmethod
    def _env_as_strings(cls, v):
        # `--set launch.env.OMP_NUM_THREADS=4` parses 4 as an int; the environment wants text.
        if isinstance(v, dict):
            return {str(k): str(x).lower() if isinstance(x, bool) else str(x) for k, x in v.items()}
        return v


class RunConfig(_Section):
    method: Method = "lora"
    # GPU memory cap in GiB per process (CUDA context included); None = the card.
    budget_gib: float | None = Field(None, gt=0)
    model: ModelConfig = ModelConfig()
    lora: LoraConfig = LoraConfig()
    quant: QuantConfig = QuantConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    kernels: KernelsConfig = KernelsConfig()
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    launch: LaunchConfig = LaunchConfig()

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        if self.launch.node_rank >= self.launch.nodes:
            raise ValueError(f"launch.node_rank {self.launch.node_rank} must be below launch.nodes {self.launch.nodes}")
        if self.method == "qlora" and self.deepspeed.offload_params:
            raise ValueError("qlora cannot offload 4-bit parameters (deepspeed.offload_params); use method lora")
        if self.train.grad_ckpt_layers is not None:
            if not self.train.grad_ckpt:
                raise ValueError("train.grad_ckpt_layers needs train.grad_ckpt true")
            # offload.py moves every layer's input (or every saved tensor) the same way.
            if self.train.offload_activations:
                raise ValueError("train.grad_ckpt_layers does not combine with train.offload_activations; unset one")
        if self.train.offload_embeddings:
            if not self.uses_adapter:
                raise ValueError("train.offload_embeddings needs method lora or qlora (full fine-tuning trains the embeddings)")
            # DDP and DeepSpeed want every parameter of the module on the GPU.
            if self.deepspeed.stage or self.world_size > 1:
                raise ValueError("train.offload_embeddings works on one GPU without DeepSpeed (deepspeed.stage 0, launch.gpus 1)")
        return self

    @property
    def uses_adapter(self) -> bool:
        return self.method in ("lora", "qlora")

    @property
    def world_size(self) -> int:
        return self.launch.gpus * self.launch.nodes

"""Several GPUs, several nodes, DeepSpeed: the combinations refused before launch.

Pure, like ``plan.py`` (which calls ``check``): config, model shape and hardware facts
in; notes out, or a ``ConfigError`` (exit 2, a setting is wrong) or a ``FitError``
(exit 3, this machine is too small). Each refusal exists because the combination
fails, or silently does something else, only after minutes of loading on rented
GPUs. docs/distributed.md is the table of what is refused, what only renders, and
what has actually run.
"""

from __future__ import annotations

from .config import RunConfig
from .errors import ConfigError, FitError
from .hardware import GIB, HardwareFacts
from .memory import host_embedding_bytes, offloaded_activation_host_bytes, trainable_params
from .model_shape import ModelShape

# ZeRO-Offload keeps, in host RAM, for every trainable parameter: an fp32 master copy
# (4 bytes), Adam's two fp32 moments (8) and the fp32 gradient partition (4).
OFFLOAD_OPTIMIZER_BYTES = 16
# Leave this share of the host's RAM to the OS, the training processes themselves
# (Python, torch, the dataset) and pinned-buffer overhead. A floor, not a prediction:
# the offload path has not been measured on a GPU yet (docs/distributed.md).
HOST_RAM_USABLE = 0.9
# Optimizers that survive ZeRO-Offload as chosen. With offload_optimizer, accelerate
# replaces the Trainer's torch optimizer with DeepSpeedCPUAdam
# (accelerate.utils.deepspeed.map_pytorch_optim_to_deepspeed): AdamW stays AdamW,
# anything else (SGD, bitsandbytes 8-bit or paged) silently becomes CPU Adam.
OFFLOAD_OPTIMIZERS = ("adamw_torch", "adamw_torch_fused")
LOOPBACK = ("127.", "localhost", "::1", "0.0.0.0")
# (predicted since session 10, measured) GiB per GPU for QLoRA 7B under ZeRO-3 on 2 H200s: the
# one run the gather stream's slack (memory.ZERO3_QLORA_GATHER_SLACK_HEADS) was taken from.
QLORA_ZERO3_MEASURED_GIB = (13.66, 13.9)


def offloaded_host_bytes(shape: ModelShape, cfg: RunConfig, dtype: str, longest: int | None = None) -> float:
    """Bytes that offload to host RAM keeps on one node (0 without offload): ZeRO's,
    train.offload_activations' (``longest``: the dataset's longest example, if known) and
    train.offload_embeddings'.

    ZeRO partitions optimizer state (and, at stage 3, parameters) over every rank of
    every node, and each rank offloads its partition to its own host: one node holds
    1/nodes of the total, assuming identical nodes. Activations are not partitioned:
    each GPU process offloads its own micro-batch's."""
    ds = cfg.deepspeed
    total = 0.0
    if ds.offload_optimizer:
        total += OFFLOAD_OPTIMIZER_BYTES * trainable_params(shape, cfg)
    if ds.offload_params:
        total += (4 if dtype == "float32" else 2) * shape.total_params  # the 16-bit (or fp32) weights
    return total / cfg.launch.nodes + offloaded_activation_host_bytes(shape, cfg, dtype, longest) + host_embedding_bytes(shape, cfg, dtype)


def check(cfg: RunConfig, shape: ModelShape, facts: HardwareFacts, dtype: str, longest: int | None = None) -> list[str]:
    """Raise on a known-bad combination; return notes for pointless-but-harmless ones.

    train.offload_activations is refused with nothing. Its hooks apply around each decoder
    layer and pass parameters through as they are (offload.py), so they meet neither
    ZeRO-3's gathered weights nor parameter offload's; with grad_ckpt they see only the
    layers' inputs. Under ZeRO offload both share host RAM, which the check below counts."""
    ds, la = cfg.deepspeed, cfg.launch
    notes: list[str] = []
    if la.nodes > 1 and la.master_addr.startswith(LOOPBACK):
        # Every node would look for node 0 on itself and wait for the rendezvous timeout.
        raise ConfigError(
            f"launch.nodes {la.nodes} with launch.master_addr {la.master_addr}: the other machines cannot reach a loopback address",
            "pass --master-addr with node 0's address as the other nodes reach it, such as its private IP",
        )
    if cfg.method == "qlora" and cfg.quant.bits == 8 and ds.stage == 3:
        # ZeRO-3 flattens and shards parameters by dtype. 4-bit weights can be stored in
        # the compute dtype (bnb_4bit_quant_storage, set by render.bnb_config); 8-bit
        # LLM.int8 weights have no such option.
        raise ConfigError(
            "qlora with quant.bits 8 cannot be sharded by DeepSpeed ZeRO-3 (8-bit weights have no quant_storage dtype)",
            "use --set quant.bits=4 (stored in the compute dtype under ZeRO-3), or --set deepspeed.stage=2",
        )
    if ds.offload_optimizer and cfg.train.optimizer not in OFFLOAD_OPTIMIZERS:
        raise ConfigError(
            f"deepspeed.offload_optimizer replaces train.optimizer {cfg.train.optimizer} with DeepSpeed's CPU Adam, "
            "so the optimizer you chose would silently not be used",
            "use --set train.optimizer=adamw_torch with offload, or turn deepspeed.offload_optimizer off",
        )
    if cfg.method == "qlora" and ds.stage == 3:
        # The prediction counts what ZeRO-3 cannot shard for QLoRA (every 4-bit linear stays
        # gathered on every rank) and the gather stream's cache, each from one 2-GPU run
        # (memory.estimate): in-sample there, an extrapolation for any other shape.
        notes.append(
            f"QLoRA under ZeRO-3: the per-GPU prediction is calibrated on one run (a 7B on 2 H200s: "
            f"{QLORA_ZERO3_MEASURED_GIB[1]} GiB measured, {QLORA_ZERO3_MEASURED_GIB[0]} predicted; docs/benchmarks/distributed.md); "
            "keep some headroom, or use ZeRO-2 (QLoRA's 4-bit weights are small enough to replicate, and ZeRO-3 shards none of them)"
        )
    if ds.stage and cfg.world_size == 1 and not (ds.offload_optimizer or ds.offload_params):
        notes.append(
            f"ZeRO-{ds.stage} on one GPU shards nothing: without offload it only adds DeepSpeed's overhead "
            "(set deepspeed.stage=0, or deepspeed.offload_optimizer=true to move optimizer state to host RAM)"
        )
    if cfg.train.offload_activations and not facts.has_gpu:
        # A CPU run's activations are in host RAM already: the hooks only copy them within
        # it. Allowed, so the GPU code path runs (and is tested) on machines without one.
        notes.append("train.offload_activations on a CPU run saves nothing: the activations already live in host RAM")
    # On a CPU-only machine nothing is offloaded from a GPU (ZeRO is refused there before this).
    need = offloaded_host_bytes(shape, cfg, dtype, longest) if facts.has_gpu else 0.0
    acts = offloaded_activation_host_bytes(shape, cfg, dtype, longest) if facts.has_gpu else 0.0
    if acts:
        # Not in the GPU breakdown, so the plan says where it went and what it costs.
        notes.append(
            f"train.offload_activations keeps about {acts / GIB:.1f} GiB of activations in pinned host RAM per node, "
            "copied out and back over PCIe each micro-batch (mostly hidden behind the compute on an H200: docs/benchmarks/savers/)"
        )
    if need and facts.host_ram_bytes:
        usable = facts.host_ram_bytes * HOST_RAM_USABLE
        what = " and ".join(
            w
            for w, on in (
                ("optimizer state", ds.offload_optimizer),
                ("parameters", ds.offload_params),
                ("activations", cfg.train.offload_activations),
                ("the input embeddings", cfg.train.offload_embeddings),
            )
            if on
        )
        zero = ds.offload_optimizer or ds.offload_params
        if need > usable:
            fixes = ["use a machine with more RAM"]
            if zero:
                fixes += ["more nodes (--nodes)", "fewer trainable parameters (a LoRA method, lower lora.r)"]
                fixes += ["turn off deepspeed.offload_params"] if ds.offload_params else []
            if cfg.train.offload_activations:
                fixes += ["a shorter data.seq_len or a smaller train.micro_batch"]
            if cfg.train.offload_embeddings:
                fixes += ["--set train.offload_embeddings=false"]
            raise FitError(
                f"offloading {what} needs about {need / GIB:.1f} GiB of host RAM per node, and this machine has "
                f"{facts.host_ram_bytes / GIB:.1f} GiB ({HOST_RAM_USABLE:.0%} usable: {usable / GIB:.1f} GiB)",
                ", ".join(fixes[:-1]) + ", or " + fixes[-1] if len(fixes) > 1 else fixes[0],
            )
        if need > facts.host_ram_available_bytes:
            notes.append(
                f"offloading {what} needs about {need / GIB:.1f} GiB of host RAM; only "
                f"{facts.host_ram_available_bytes / GIB:.1f} GiB is available now (other processes hold the rest)"
            )
    return notes

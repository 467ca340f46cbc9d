"""The training process: ``python -m vramfit.train RUN_DIR [--resume]``.

Reads only the run directory (plan.yaml and the rendered JSON configs), so what
ran is exactly what was planned. The only module that imports torch and
transformers at top level.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

# A scheduler's SIGTERM can come while torch is still importing (seconds): note it
# now, and let the preemption handler act on it once installed.
# (Only when this module is the training process: importers keep their handlers.)
_EARLY_SIGNALS: list[int] = []
if __name__ == "__main__":
    for _sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(_sig, lambda signum, _frame: _EARLY_SIGNALS.append(signum))

# Before transformers imports bitsandbytes, whose CPU build warns about optional kernels
# (and, offline, the kernels hub it fetches them with: "Skipping publisher trust check").
if not os.environ.get("VRAMFIT_DEBUG"):
    for _name in ("bitsandbytes", "kernels"):
        logging.getLogger(_name).setLevel(logging.ERROR)

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments  # noqa: E402
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints  # noqa: E402

from .config import RunConfig
from .errors import Preempted, RunLocked, UsageError, VramfitError
from .gpu_memory import MemoryMonitor, apply_budget
from .model_source import load_tokenizer, resolve_model_dir
from .preempt import PreemptionCallback
from .quiet import quiet_libraries
from .data import HOST_IDS_KEY, TOKENS_KEY
from .render import ADAPTER, BAD_INPUT_MARK, CHECKPOINTS, CRASH_MARK, METRICS, TRAIN_LOG, read_plan, write_text_atomic

GIB = 1 << 30


class Log:
    """One-line progress to stdout and RUN_DIR/train.log (rank 0 only)."""

    def __init__(self, run_dir: Path, enabled: bool) -> None:
        self.enabled = enabled
        self.file = open(run_dir / TRAIN_LOG, "a", encoding="utf-8") if enabled else None

    def __call__(self, msg: str) -> None:
        if not self.enabled:
            return
        print(msg, flush=True)
        self.file.write(msg + "\n")
        self.file.flush()


def fsync_tree(root: Path, files: bool = True) -> None:
    """Flush ``root``'s files and directories to disk. A preempted cloud machine is often cut
    off seconds after training exits, without a clean shutdown: a checkpoint still in the
    page cache would be lost, or found renamed into place but torn. ``files=False``: only
    ``root`` itself (a rename inside it made durable)."""
    if not root.exists():
        return
    for path in (sorted(root.rglob("*"), reverse=True) if files else []) + [root]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class StagedCheckpointTrainer(Trainer):
    """Writes each checkpoint as checkpoints/.tmp-checkpoint-N/checkpoint-N, then renames
    it to checkpoints/checkpoint-N once every file is written.

    A save killed midway (SIGKILL, a crash, a full disk) then leaves only a dot-named
    staging directory, which resume, rotation and the HF Trainer's own checkpoint
    globs (``checkpoint-*``) all ignore; the next run deletes it. A ``checkpoint-N``
    is always complete. (The trainer_state.json check in ``last_checkpoint`` stays as
    a second guard, for checkpoints written before this.) HF's best-checkpoint
    bookkeeping, which looks in the run dir mid-save, is unused: vramfit sets no
    metric_for_best_model.
    """

    _staging: Path | None = None  # set only while a checkpoint is being written

    def _get_output_dir(self, trial) -> str:
        # The Trainer saves into _get_output_dir(trial)/checkpoint-N: while saving,
        # point that at the staging directory.
        return str(self._staging) if self._staging else super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        checkpoints = Path(super()._get_output_dir(trial))
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        self._staging = checkpoints / f".tmp-{name}"
        try:
            # Every rank writes its part (weights, its RNG state, ZeRO shards). The
            # Trainer's rotation runs in there too and finds nothing to delete.
            super()._save_checkpoint(model, trial)
        finally:
            staging, self._staging = self._staging, None
        fsync_tree(staging)  # each rank its own writes (and, on one node, the others')
        self.accelerator.wait_for_everyone()  # no rank is still writing into staging
        if self.args.should_save:  # the one process that writes trainer_state.json
            final = checkpoints / name
            # A checkpoint-N can already be there only from an earlier run in this
            # directory (restarted from step 0 without --resume, or torn before saves
            # were staged); os.rename does not replace a non-empty directory.
            shutil.rmtree(final, ignore_errors=True)
            os.rename(staging / name, final)
            staging.rmdir()
            fsync_tree(checkpoints, files=False)  # the rename itself
            # Rotate only now that the new checkpoint is complete, so the last good one
            # is never deleted for it. Newest by mtime, as the Trainer itself rotates.
            rotate_checkpoints(str(checkpoints), self.args.save_total_limit, use_mtime=True)
        # No rank returns before checkpoint-N is in place: after a preemption save the
        # others exit at once, and a launcher (torchrun) then stops the rest with SIGTERM.
        self.accelerator.wait_for_everyone()


# Where the training process is, for the record an OOM leaves (oom.json).
_PROGRESS: dict[str, Any] = {}


class TokenCountingTrainer(StagedCheckpointTrainer):
    """Counts real (non-padding) tokens, for tokens/s that compare across batch shapes.

    Every token of every example counts, prompt included, packed or not: the padded
    batch's attention_mask.sum(), or for packed rows (no mask) the collator's count.
    """

    tokens_seen = 0
    longest_first = False
    # Batch shapes met so far, and whether the current optimizer step met one not seen
    # before (Progress reads and clears it): a new shape costs once (the allocator grows,
    # kernels are chosen for it), which a long run amortises.
    seen_shapes: frozenset = frozenset()
    new_shape_in_step = False
    # Set during a step the steady rate must leave out for another reason: VRAMFIT_PROFILE's
    # profiled steps and the step its trace is written in (step_profile.py).
    untimed_step = False
    # train.offload_activations: the hooks (offload.HostActivations), and the most that one
    # micro-batch moved to host RAM: (bytes, tensors, padded tokens of that micro-batch, the
    # pinned blocks they took).
    host_activations = None
    offloaded_peak = (0, 0, 0, 0)
    # train.offload_embeddings: offload.HostEmbeddings, told each batch's CPU ids.
    host_embeddings = None
    _flops_params: int | None = None

    def _get_train_sampler(self, train_dataset=None):
        # `vramfit train --probe` meets the peak in its few steps: longest examples first, in order.
        if self.longest_first:
            return torch.utils.data.SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)
        return super()._get_train_sampler(train_dataset)

    def training_step(self, model, inputs, *args, **kwargs):
        _PROGRESS["step"] = self.state.global_step
        fault = os.environ.get("VRAMFIT_FAULT_OOM_ABOVE_MICRO_BATCH")
        if fault and self.state.global_step >= 1 and inputs["input_ids"].shape[0] > int(fault):
            # Fault injection for tests of OOM recovery on machines without a GPU.
            raise torch.OutOfMemoryError("CUDA out of memory (injected). Tried to allocate 1.00 GiB")
        shape = tuple(inputs["input_ids"].shape)
        if shape not in self.seen_shapes:
            self.seen_shapes |= {shape}
            self.new_shape_in_step = True
        counted = inputs.get(TOKENS_KEY)  # the collator's count: reading it waits for nothing (data.py)
        mask = inputs.get("attention_mask")
        if counted is not None:
            self.tokens_seen += int(counted)
        elif mask is not None:
            self.tokens_seen += int(mask.sum())
        loss = super().training_step(model, inputs, *args, **kwargs)
        if self.host_activations is not None:
            tensors, moved = self.host_activations.reset()
            if moved > self.offloaded_peak[0]:
                pinned = self.host_activations.last_pinned_bytes
                self.offloaded_peak = (moved, tensors, int(inputs["input_ids"].numel()), pinned)
        return loss

    def floating_point_ops(self, inputs) -> int:
        # The Trainer adds 6 x tokens x parameters to total_flos after every micro-batch, and
        # its parameter count walks every module each time: 1.5 ms of CPU for a 7B with LoRA,
        # spent where the GPU may be waiting for the next micro-batch. The count never changes.
        ids = inputs.get("input_ids")
        if ids is None or not hasattr(self.model, "num_parameters"):
            return super().floating_point_ops(inputs)
        if self._flops_params is None:
            self._flops_params = self.model.num_parameters(exclude_embeddings=True)
        return 6 * ids.numel() * self._flops_params

    def compute_loss(self, model, inputs, *args, **kwargs):
        # Training and evaluation both reach the model through here: the count and the CPU
        # ids are not its inputs.
        host_ids = inputs.get(HOST_IDS_KEY)
        inputs = {k: v for k, v in inputs.items() if k not in (TOKENS_KEY, HOST_IDS_KEY)}
        if self.host_embeddings is None or host_ids is None:
            return super().compute_loss(model, inputs, *args, **kwargs)
        self.host_embeddings.expect(host_ids.tensor)
        try:
            return super().compute_loss(model, inputs, *args, **kwargs)
        finally:
            self.host_embeddings.expect(None)  # never left for a forward they were not made for


class EmbeddingsOnHost(TrainerCallback):
    """train.offload_embeddings: Accelerate's prepare (after loading, before the first
    step) moves a non-quantized model to the GPU whole; put the table back in host RAM."""

    def __init__(self, host) -> None:
        self.host = host  # offload.HostEmbeddings

    def on_train_begin(self, args, state, control, **kw):
        self.host.place()


class LeanRecompute(TrainerCallback):
    """kernels.lean_recompute and kernels.lean_mlp: the Trainer sets each decoder layer's
    checkpoint function as training begins (TrainingArguments.gradient_checkpointing); run its
    recomputations under fused_lora.checkpoint_contexts, where the flagged down_proj layers
    skip their base multiply and (``mlps``: liger's SwiGLU before an unadapted 4-bit
    down_proj, lean_mlp.py) the MLPs their SwiGLU kernel. liger patches the MLPs as training
    begins too, before this runs."""

    def __init__(self, model, log, downs: int, mlps: bool) -> None:
        self.model, self.log, self.downs, self.mlps = model, log, downs, mlps

    def on_train_begin(self, args, state, control, **kw):
        from .fused_lora import lean_checkpointing
        from .offload import outermost_layers

        layers = outermost_layers(self.model)
        mlps = 0
        if self.mlps:
            from .lean_mlp import install as lean_mlps

            mlps = lean_mlps(layers, getattr(self.model.config, "model_type", ""))
        if (self.downs or mlps) and lean_checkpointing(layers):
            n = sum(1 for layer in layers if getattr(layer, "gradient_checkpointing", False))
            what = ["down_proj's base multiply"] * bool(self.downs) + ["the SwiGLU kernel"] * bool(mlps)
            self.log(f"checkpointing: the recomputations of {n} checkpointed decoder layers leave out {' and '.join(what)} (its output is never read)")


class PartialCheckpointing(TrainerCallback):
    """train.grad_ckpt_layers: the Trainer turns checkpointing on for every decoder layer
    as training begins (TrainingArguments.gradient_checkpointing); turn it off again for
    all but the first N. Each layer's own flag is what transformers' GradientCheckpointingLayer
    reads on every call, in 5.17 (which checkpoints __call__) and later (forward) alike."""

    def __init__(self, layers: list, n: int) -> None:
        self.layers, self.n = layers, n

    def on_train_begin(self, args, state, control, **kw):
        for i, layer in enumerate(self.layers):
            layer.gradient_checkpointing = i < self.n


def window_rate(marks: list[tuple[float, int, bool]]) -> float | None:
    """Tokens/s from the end of the first optimizer step to the end of the last. ``marks``:
    (time, tokens seen, whether the steady rate leaves the step out: it met a new batch shape,
    or the profiler recorded it or wrote its trace in it) at the end of each step."""
    if len(marks) < 2:
        return None
    (t0, n0, _), (t1, n1, _) = marks[0], marks[-1]
    return (n1 - n0) / max(t1 - t0, 1e-9)


def steady_rate(marks: list[tuple[float, int, bool]]) -> float | None:
    """What a long run sees, and what the speed model predicts: tokens/s over the steps
    after the first, leaving out each step that met a batch shape for the first time (and
    VRAMFIT_PROFILE's profiled steps and the one its trace is written in: step_profile.py).

    The first step pays the one-off costs (allocator warm-up, lazy optimizer state); a new
    shape pays some again (the allocator grows, kernels are chosen for it): on varied
    lengths a 20-step proof meets 2-3 shapes after step 1, each step 20-50% slower than the
    rest (docs/benchmarks/autofit.md). A long run meets each shape once, so it amortises
    them; a short window does not. With every step new, it falls back to the window."""
    kept = [(b[0] - a[0], b[1] - a[1]) for a, b in zip(marks, marks[1:]) if not b[2]]
    seconds = sum(dt for dt, _ in kept)
    if not kept or seconds <= 0:
        return window_rate(marks)
    return sum(n for _, n in kept) / seconds


class Progress(TrainerCallback):
    def __init__(self, log: Log, trainer_ref: list, monitor: MemoryMonitor) -> None:
        self.log, self.trainer_ref, self.monitor = log, trainer_ref, monitor
        self.t0 = self.last_t = None
        self.last_tokens = 0
        self.losses: list[float] = []

    def on_train_begin(self, args, state, control, **kw):
        if self.monitor.cuda:
            # Loading, quantizing and (under DeepSpeed) partitioning are done by now: the
            # peak so far is theirs, which ZeRO-3 can make the run's peak.
            self.monitor.setup_peak = torch.cuda.max_memory_allocated()
        self.t0 = self.last_t = time.perf_counter()
        self.start_step = state.global_step
        self.step_marks: list[tuple[float, int, bool]] = []  # (time, tokens, left out of the steady rate)
        self.new_shapes: list[bool] = []

    def on_step_end(self, args, state, control, **kw):
        self.monitor.sample()
        if self.monitor.cuda:
            torch.cuda.synchronize()  # step timing must include the queued kernels
        trainer = self.trainer_ref[0]
        self.step_marks.append((time.perf_counter(), trainer.tokens_seen, trainer.new_shape_in_step or trainer.untimed_step))
        self.new_shapes.append(trainer.new_shape_in_step)
        trainer.new_shape_in_step = trainer.untimed_step = False

    def steady_tokens_per_s(self) -> float | None:
        return steady_rate(self.step_marks)

    def window_tokens_per_s(self) -> float | None:
        return window_rate(self.step_marks)

    def on_log(self, args, state, control, logs=None, **kw):
        if not logs or "loss" not in logs:
            return
        now = time.perf_counter()
        tokens = self.trainer_ref[0].tokens_seen
        rate = (tokens - self.last_tokens) / max(now - self.last_t, 1e-9)
        self.last_t, self.last_tokens = now, tokens
        self.losses.append(float(logs["loss"]))
        if not math.isfinite(self.losses[-1]) and all(math.isfinite(x) for x in self.losses[:-1]):
            self.log(f"diverged: loss {self.losses[-1]} at step {state.global_step} (lower train.lr, or check the data)")
        mem = self.monitor.line()
        self.log(
            f"step {state.global_step}/{state.max_steps} | loss {logs['loss']:.4f} | "
            f"lr {logs.get('learning_rate', 0):.2e} | {rate:,.0f} tok/s" + (f" | {mem}" if mem else "")
        )


def finite_loss(x: float) -> float | None:
    """A loss for metrics.json, or None where it is nan or inf: JSON has no NaN, and the
    Trainer's filter that once hid them from the log is off (render.py); metrics.json's
    nonfinite_losses counts them instead."""
    return round(x, 4) if math.isfinite(x) else None


def _torch_dtype(name: str):
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def load_model(doc: dict[str, Any], cfg: RunConfig, run_dir: Path):
    model_dir = resolve_model_dir(doc["model_path"])
    kwargs: dict[str, Any] = {
        "dtype": _torch_dtype(doc["dtype"]),
        "attn_implementation": cfg.model.attn_implementation,
        "trust_remote_code": cfg.model.trust_remote_code,
    }
    bnb_file = run_dir / "bnb_config.json"
    if bnb_file.is_file():
        from transformers import BitsAndBytesConfig

        bnb = json.loads(bnb_file.read_text())
        for k in ("bnb_4bit_compute_dtype", "bnb_4bit_quant_storage"):
            if k in bnb and bnb[k] != "uint8":
                bnb[k] = _torch_dtype(bnb[k])
        kwargs["quantization_config"] = BitsAndBytesConfig(**bnb)
    if doc["device"] == "cuda" and cfg.deepspeed.stage != 3:
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    # The KV cache is dead weight in training. Packing also needs it off: with a cache,
    # transformers does not look for packed sequences in position_ids (tests/test_packing.py).
    model.config.use_cache = False
    if cfg.method == "qlora" and cfg.quant.upcast_embeddings:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.train.grad_ckpt, gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    lora_file = run_dir / "lora_config.json"
    if lora_file.is_file():
        from peft import LoraConfig, get_peft_model
        from transformers import set_seed

        # Seed right before the adapter's random init: anything earlier that draws
        # from the RNG (building the embedded model on first use, say) must not
        # change the adapter a given seed produces.
        set_seed(cfg.train.seed)
        model = get_peft_model(model, LoraConfig(**json.loads(lora_file.read_text())))
    if cfg.kernels.fused_loss and cfg.deepspeed.stage == 3:
        # The fused loss reads the output head's weight directly, never calling the head
        # module, so ZeRO-3's hooks would leave it an empty shard there. Registered as an
        # external parameter of the outermost module, it is gathered for the whole
        # forward pass (inside which the fused loss runs) and released after.
        import deepspeed

        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        deepspeed.zero.register_external_parameter(model, base.get_output_embeddings().weight)
    return model


def offload_activations(model, cfg: RunConfig, device: str, log: Log):
    """Keep what the decoder layers save for backward in host RAM (offload.py), pinned on
    CUDA so the copies are asynchronous DMA. Attached to the layers themselves, so they
    survive the Trainer's wrapping (DDP, DeepSpeed) and its enabling of checkpointing later."""
    from .memory import offload_async_applies
    from .offload import HostActivations, StreamCopies, install

    side_stream = offload_async_applies(cfg, device)  # the memory model counts its reserve where this holds
    copies = StreamCopies(torch.device("cuda", torch.cuda.current_device())) if side_stream else None
    hooks = HostActivations(pin_memory=device == "cuda", copies=copies)
    layers = install(model, hooks)
    if not layers:
        raise VramfitError(
            "train.offload_activations: this model has no transformers GradientCheckpointingLayer decoder layers, "
            "so there is nothing it knows how to offload",
            "plan again with --set train.offload_activations=false",
        )
    what = "input" if cfg.train.grad_ckpt else "saved activations"
    how = ", copied on a stream of its own and fetched back a layer ahead" if side_stream else ""
    log(f"activations: each of {layers} decoder layers keeps its {what} in host RAM until backward{how}")
    return hooks


def save_final(trainer: Trainer, tokenizer, run_dir: Path, name: str) -> Path:
    """Save adapter/model + tokenizer under a temporary name, then swap it in."""
    final = run_dir / name
    tmp = run_dir / f".{name}.tmp"
    old = run_dir / f".{name}.old"
    if trainer.is_world_process_zero():
        shutil.rmtree(tmp, ignore_errors=True)
    trainer.save_model(str(tmp))  # every rank: ZeRO-3 gathers the weights collectively
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(str(tmp))
        fsync_tree(tmp)
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            os.rename(final, old)
        os.rename(tmp, final)
        fsync_tree(run_dir, files=False)
        shutil.rmtree(old, ignore_errors=True)
    return final


def trainer_state(checkpoint: Path) -> dict[str, Any] | None:
    """A checkpoint's trainer_state.json, or None if the checkpoint is incomplete.

    The Trainer writes it after the weights, optimizer, scheduler and RNG state: a
    checkpoint killed mid-save lacks it (or holds a torn one).
    """
    try:
        state = json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and "global_step" in state else None


def last_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint; partial ones (killed mid-save) are skipped.

    A save in progress is a ``.tmp-checkpoint-N`` directory, which the glob skips.
    """
    ckpts = [p for p in (run_dir / CHECKPOINTS).glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
    ckpts = [p for p in ckpts if trainer_state(p) is not None]
    return max(ckpts, key=lambda p: int(p.name.split("-")[-1])) if ckpts else None


def remove_stale_staging(run_dir: Path) -> None:
    """Delete ``.tmp-checkpoint-N`` dirs: saves that a kill cut short, never complete."""
    for p in (run_dir / CHECKPOINTS).glob(".tmp-*"):
        shutil.rmtree(p, ignore_errors=True)


def is_final(global_step: int, max_steps: int) -> bool:
    return max_steps > 0 and global_step >= max_steps


def checkpoint_bytes(model, cfg: RunConfig) -> tuple[int, int]:
    """(bytes of one checkpoint, bytes of the trainable weights as saved).

    Without DeepSpeed: the trainable weights and Adam's two moments in their dtype (one
    byte each for 8-bit optimizers). With DeepSpeed, the ZeRO shards add the fp32 master
    weights and fp32 moments (12 bytes per trainable parameter, over all ranks) to the
    16-bit weights the Trainer saves beside them.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    # Under ZeRO-3's zero.Init a parameter is an empty shard; ds_numel is its real size.
    numel = [getattr(p, "ds_numel", p.numel()) for p in params]
    trainable = sum(n * p.element_size() for n, p in zip(numel, params))
    if cfg.deepspeed.stage:
        half = sum(numel) * 2
        return half + half + 12 * sum(numel), half
    moments = sum(n * (1 if "8bit" in cfg.train.optimizer else p.element_size()) for n, p in zip(numel, params))
    return trainable + 2 * moments, trainable


def check_disk_for_checkpoints(run_dir: Path, model, cfg: RunConfig) -> None:
    """Refuse to start when the disk cannot hold the checkpoints the plan keeps.

    A checkpoint holds the trainable weights and their optimizer state (Adam: two
    moments in the parameters' dtype, or one byte each for 8-bit optimizers);
    rotation keeps save_total_limit of them plus the one being written (fewer if the
    run is too short to save that often; a preemption adds one), and the final
    output needs one more set of weights.
    """
    per_ckpt, trainable = checkpoint_bytes(model, cfg)
    kept = cfg.train.save_total_limit + 1
    if cfg.train.max_steps > 0:
        kept = min(kept, cfg.train.max_steps // cfg.train.save_steps + 1)
    need = per_ckpt * kept + trainable
    free = shutil.disk_usage(run_dir).free
    if free < need:
        raise VramfitError(
            f"{run_dir} has {free / 2**30:.1f} GiB free; checkpoints need ~{need / 2**30:.1f} GiB",
            "free disk space, lower train.save_total_limit, or plan the run on another disk (--out)",
        )


def lock_run_dir(run_dir: Path):
    """Hold an exclusive lock on RUN_DIR/.lock for this process's life: one trainer per run."""
    import fcntl

    fh = open(run_dir / ".lock", "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "?"
        raise RunLocked(
            f"another training process (pid {holder}) is using {run_dir}",
            "wait for it to finish, or stop it first; two trainers would corrupt the checkpoints",
        ) from None
    fh.seek(0)
    fh.truncate()
    fh.write(str(os.getpid()))
    fh.flush()
    return fh


# Trainer state that belongs to the checkpoint, not to the trained model.
_STATE_FILES = ("optimizer.pt", "scheduler.pt", "trainer_state.json", "training_args.bin", "scaler.pt")
# ... and DeepSpeed's: the per-rank ZeRO shards (global_stepN/), its pointer to them
# and its consolidation script. The 16-bit weights the Trainer saved beside them are
# already whole (stage3_gather_16bit_weights_on_model_save).
_DEEPSPEED_STATE = ("latest", "zero_to_fp32.py")


def _is_state(name: str) -> bool:
    return name in _STATE_FILES or name in _DEEPSPEED_STATE or name.startswith(("rng_state", "global_step"))


def promote_checkpoint(checkpoint: Path, tokenizer, run_dir: Path, name: str) -> Path:
    """Make the final adapter/model from a complete last checkpoint, atomically."""
    tmp, final = run_dir / f".{name}.tmp", run_dir / name
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(
        checkpoint, tmp, ignore=lambda _d, names: [n for n in names if _is_state(n)]
    )
    tokenizer.save_pretrained(str(tmp))
    os.rename(tmp, final)
    return final


PREEMPTED_MARK = "preempted.json"


def _mark_preempted(run_dir: Path, step: int | None, rank0: bool) -> None:
    """Leave a note that this exit is a preemption. Multi-process launchers (accelerate,
    torchrun) exit 1 whatever their ranks' codes, so `vramfit train` reads this note to
    still exit 75 for them."""
    if rank0:
        write_text_atomic(run_dir / PREEMPTED_MARK, json.dumps({"step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n")


def _round(rate: float | None, world: int) -> float | None:
    return None if rate is None else round(rate * world, 1)


def _gpu_turn(path: str | None):
    """For calibration and benchmarks that share one GPU between several runs: wait
    for an exclusive lock on ``path`` before training, so loading overlaps between runs
    but the timed steps never do. Unset in normal use."""
    if not path:
        return None
    import fcntl

    fh = open(path, "a+")
    fcntl.flock(fh, fcntl.LOCK_EX)
    return fh


def _lora_inputs_uncast(model, cfg: RunConfig, args):
    """16-bit LoRA under mixed precision: keep each adapted layer's input in the compute dtype.

    PEFT keeps adapters in fp32 and casts every adapted layer's input to fp32 before the
    adapter (lora/layer.py, ``_cast_input_dtype``); its dropout then makes a second fp32
    tensor, and autocast casts the result straight back to 16 bits for lora_A's matmul. An
    allocator snapshot of the 24 GB guide's r128 all-linear adapter at micro-batch 8 had 1.7
    GiB of these fp32 copies alive at the down projection (docs/memory-model.md). Under
    autocast the matmul is the same either way (PEFT's bitsandbytes layers skip the cast
    there); only the dropout mask is drawn on a 16-bit tensor instead of an fp32 one (tested in
    tests/test_memory_savers.py). PEFT's own switch, for the training loop only: outside
    autocast (merge, inference) the cast is needed."""
    import contextlib

    if cfg.method != "lora" or not (args.bf16 or args.fp16):
        return contextlib.nullcontext()
    from peft.helpers import disable_input_dtype_casting

    return disable_input_dtype_casting(model)


def _memory_history(path: str | None, device: str):
    """For calibration (scripts/backward_peak_report.py): with VRAMFIT_MEMORY_HISTORY=FILE on
    a GPU, record every allocation of the training loop with its Python stack, and return
    the function that writes torch's memory snapshot to FILE when it ends. The record of
    what is alive at the peak is how the memory model's terms are checked one by one."""
    if not path or device != "cuda":
        return None
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        path = f"{path}.rank{os.environ.get('RANK', 0)}"  # one snapshot per process
    torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")

    def dump() -> None:
        torch.cuda.memory._dump_snapshot(path)
        torch.cuda.memory._record_memory_history(enabled=None)

    return dump


def run(run_dir: Path, resume: bool) -> dict[str, Any]:
    from .data import Collator, build_datasets

    doc = read_plan(run_dir)
    quiet_libraries(doc["device"])
    preemption = PreemptionCallback()
    preemption.install()  # early: a SIGTERM during loading must not kill us mid-write
    if _EARLY_SIGNALS:
        preemption.requested = _EARLY_SIGNALS[0]
    cfg = RunConfig.model_validate(doc["config"])
    rank0 = int(os.environ.get("RANK", 0)) == 0
    lock = None
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        lock = lock_run_dir(run_dir)  # noqa: F841 (held until exit)
        # Under the lock, so no live trainer's save is in there; before any rank's first save.
        remove_stale_staging(run_dir)
    log = Log(run_dir, rank0)
    if rank0:
        (run_dir / PREEMPTED_MARK).unlink(missing_ok=True)  # only this run's preemption counts
    monitor = MemoryMonitor(doc["device"] == "cuda")
    if doc["device"] == "cuda":
        if not torch.cuda.is_available():
            raise VramfitError("this run was planned for a GPU, but torch sees none", "plan it again here: `vramfit train`")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        if cfg.budget_gib:
            log(apply_budget(cfg.budget_gib, monitor))

    import importlib.util

    for key in ("fused_loss", "liger_ops"):
        if getattr(cfg.kernels, key) and importlib.util.find_spec("liger_kernel") is None:
            raise VramfitError(
                f"kernels.{key} needs liger-kernel, which is not installed",
                f"pip install 'vramfit[kernels]', or plan again with --set kernels.{key}=false",
            )
    if cfg.model.attn_implementation == "flash_attention_2":
        from .kernels import flash_attn_installed

        if not flash_attn_installed():  # planned where it was installed, run where it is not
            raise VramfitError(
                "model.attn_implementation=flash_attention_2 needs the flash_attn package, which is not installed",
                "pip install flash-attn, or plan again with --set model.attn_implementation=sdpa",
            )
    tokenizer = load_tokenizer(doc["model_path"], cfg.model.trust_remote_code)
    data_cfg = cfg.data.model_copy(update={"path": doc.get("data_path")})
    train_ds, val_ds, stats, fmt = build_datasets(data_cfg, tokenizer, cfg.train.seed)
    longest_first = bool(os.environ.get("VRAMFIT_LONGEST_FIRST"))
    if longest_first:
        lengths = [len(x) for x in train_ds["input_ids"]]
        train_ds = train_ds.select(sorted(range(len(lengths)), key=lambda i: -lengths[i]))
    s = stats.to_dict()
    log(
        f"data: {s['n_examples']} examples ({fmt}), {stats.truncated_share:.1%} truncated at {cfg.data.seq_len} tokens,"
        f" {s['n_dropped']} dropped (no response left)" + (f", {len(val_ds)}{' rows' if cfg.data.packing else ''} for validation" if val_ds is not None else "")
        + (f"; packed into {len(train_ds)} rows of up to {cfg.data.seq_len} tokens" if cfg.data.packing else "")
    )
    if cfg.data.packing:
        s["packed_rows"] = len(train_ds)

    args_dict = json.loads((run_dir / "training_args.json").read_text())
    args_dict["output_dir"] = str(run_dir / CHECKPOINTS)
    if args_dict.get("deepspeed"):
        args_dict["deepspeed"] = str(run_dir / args_dict["deepspeed"])
    # Before the model: TrainingArguments with a ZeRO-3 config registers it globally, and
    # from_pretrained then loads under deepspeed.zero.Init, each rank materializing only
    # its shard. Loaded first, every process would hold the whole 16-bit model.
    args = TrainingArguments(**args_dict)
    torch.manual_seed(cfg.train.seed)
    model = load_model(doc, cfg, run_dir)
    callbacks: list[TrainerCallback] = []
    if cfg.kernels.tiled_mlp:
        from .tiled_mlp import install as tile_mlps

        tiled = tile_mlps(model)
        if not tiled:
            raise VramfitError(
                "kernels.tiled_mlp: this model's decoder layers have no `mlp` module it knows how to tile",
                "plan again with --set kernels.tiled_mlp=false",
            )
        log(f"kernels: the MLP of each of {tiled} decoder layers runs over chunks of the sequence (DeepSpeed TiledMLP)")
    lean = 0  # down_proj layers flagged for kernels.lean_recompute
    if cfg.kernels.fused_lora and cfg.uses_adapter:
        from .speed import fused_lora_applies, lean_recompute_applies  # the speed model counts them where these install them

        if not fused_lora_applies(cfg):
            # ZeRO-3 gathers a weight only when its module is called; the function reads it directly.
            log("kernels: fused_lora is not used under ZeRO-3; PEFT's layers run as they are")
        else:
            from .fused_lora import install as fuse_lora

            fused = fuse_lora(model)
            if fused:
                log(f"kernels: {fused} LoRA layers run as one function each (scaling and adds inside the matrix multiplies)")
            if fused and lean_recompute_applies(cfg):
                from .fused_lora import mark_unused_outputs

                lean = mark_unused_outputs(model)
    if cfg.train.grad_ckpt_layers is not None:  # config.py: only with grad_ckpt
        from .offload import outermost_layers

        layers = outermost_layers(model)
        if not layers:
            raise VramfitError(
                "train.grad_ckpt_layers: this model has no transformers GradientCheckpointingLayer decoder layers to choose from",
                "plan again with --set train.grad_ckpt_layers=null",
            )
        n = min(cfg.train.grad_ckpt_layers, len(layers))
        callbacks.append(PartialCheckpointing(layers, n))
        log(f"checkpointing: the first {n} of {len(layers)} decoder layers are recomputed in the backward; the last {len(layers) - n} keep their activations")
    from .memory import lean_mlp_applies

    lean_mlps = lean_mlp_applies(cfg)
    if lean or lean_mlps:  # after PartialCheckpointing: its count is of the layers that still checkpoint
        callbacks.append(LeanRecompute(model, log, lean, lean_mlps))
    host_embeddings = overlap = None
    if cfg.train.offload_embeddings:
        from .offload import embeddings_on_host

        # The overlapped lookup takes the collator's CPU ids (Collator.host_ids), or where a
        # forward comes without them reads the ids on a side stream: only safe where the
        # batches' copies to the GPU are blocking, as rendered (offload._OverlappedLookup).
        overlap = (cfg.train.offload_embeddings_async and doc["device"] == "cuda"
                   and not getattr(args.accelerator_config, "non_blocking", False))  # fmt: skip
        host_embeddings = embeddings_on_host(model, overlap=overlap)
        callbacks.append(EmbeddingsOnHost(host_embeddings))
        how = ", overlapped with the GPU's work (train.offload_embeddings_async)" if overlap else ""
        log(f"embeddings: the input embedding table stays in host RAM; lookups run on the CPU{how}")

    trainer_ref: list = []
    progress = Progress(log, trainer_ref, monitor)
    trainer = TokenCountingTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=val_ds,
        data_collator=Collator(tokenizer, cfg.data.pad_to_multiple_of, cfg.data.seq_len, host_ids=bool(overlap)),
        callbacks=[progress, *callbacks],
    )
    trainer.longest_first = longest_first
    trainer.host_embeddings = host_embeddings
    if cfg.train.offload_activations:
        trainer.host_activations = offload_activations(model, cfg, doc["device"], log)
    trainer_ref.append(trainer)
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # Progress prints the one line we want
    checkpoint = None
    final_name = ADAPTER if cfg.uses_adapter else "model"
    if resume:
        checkpoint = last_checkpoint(run_dir)
        log(f"resuming from {checkpoint}" if checkpoint else "no checkpoint yet: starting from step 0")
        state = trainer_state(checkpoint) if checkpoint else None
        if state and is_final(state["global_step"], state.get("max_steps", 0)):
            # The Trainer would train one step past max_steps on such a resume.
            if rank0 and not (run_dir / final_name).is_dir():
                promote_checkpoint(checkpoint, tokenizer, run_dir, final_name)
            log(f"run already complete at step {state['global_step']}: nothing to train")
            return json.loads((run_dir / METRICS).read_text()) if (run_dir / METRICS).is_file() else {}
    check_disk_for_checkpoints(run_dir, model, cfg)
    trainer.add_callback(preemption)
    if os.environ.get("VRAMFIT_PROFILE") and rank0:
        from .step_profile import StepProfiler

        untimed = lambda: setattr(trainer, "untimed_step", True)  # noqa: E731
        trainer.add_callback(StepProfiler(os.environ["VRAMFIT_PROFILE"], doc["device"] == "cuda", untimed))
    if preemption.requested is not None:
        _mark_preempted(run_dir, None, rank0)
        raise Preempted("stopped by a signal before training started; nothing to save", "rerun the same command to start")
    gate = _gpu_turn(os.environ.get("VRAMFIT_GPU_TURN"))  # noqa: F841 (held until exit)
    history = _memory_history(os.environ.get("VRAMFIT_MEMORY_HISTORY"), doc["device"])
    start = time.perf_counter()
    with _lora_inputs_uncast(model, cfg, args):
        result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    seconds = time.perf_counter() - start
    if history:
        history()
    if preemption.stopped_at is not None and not is_final(trainer.state.global_step, trainer.state.max_steps):
        log(f"preempted: checkpoint saved at step {preemption.stopped_at}")
        _mark_preempted(run_dir, preemption.stopped_at, rank0)
        by = f"signal {preemption.requested}" if preemption.requested is not None else "a signal to another rank"
        raise Preempted(
            f"training stopped by {by} at step {preemption.stopped_at}; checkpoint saved",
            f"rerun the same command, or `vramfit train --resume --out {run_dir}`, to continue",
            every_rank=True,
        )
    final = save_final(trainer, tokenizer, run_dir, final_name)
    memory = monitor.summary()  # samples NVML once more: the figures rank 0 writes and every rank gathers
    per_rank = _per_rank(memory)  # every rank takes part

    metrics = {
        "steps": trainer.state.global_step,
        "first_loss": finite_loss(progress.losses[0]) if progress.losses else None,
        "final_loss": finite_loss(progress.losses[-1]) if progress.losses else None,
        "train_loss": finite_loss(result.training_loss),
        "nonfinite_losses": sum(not math.isfinite(x) for x in progress.losses),
        "tokens": trainer.tokens_seen * int(os.environ.get("WORLD_SIZE", 1)),
        "train_seconds": round(seconds, 2),
        "tokens_per_s": round(trainer.tokens_seen * int(os.environ.get("WORLD_SIZE", 1)) / max(seconds, 1e-9), 1),
        "steady_tokens_per_s": _round(progress.steady_tokens_per_s(), int(os.environ.get("WORLD_SIZE", 1))),
        # Until session 9 the steady rate was this one (new shapes' steps included):
        "window_tokens_per_s": _round(progress.window_tokens_per_s(), int(os.environ.get("WORLD_SIZE", 1))),
        "new_shape_steps": sum(progress.new_shapes[1:]),
        "predicted_tokens_per_s": doc.get("predicted_tokens_per_s"),
        "predicted_peak_gib": doc.get("predicted_peak_gib"),
        "budget_gib": cfg.budget_gib,
        "data": s,
        "output": str(final),
        **memory,
    }
    if trainer.host_activations is not None:
        moved, tensors, tokens, pinned = trainer.offloaded_peak
        # The micro-batch that moved the most: memory.offloaded_activation_transfer_bytes predicts
        # it, and offloaded_activation_host_bytes the pinned blocks it took (pinned_gib).
        metrics["offloaded_activations"] = {"bytes": moved, "gib": round(moved / GIB, 4), "tensors": tensors,
                                            "tokens": tokens, "pinned_gib": round(pinned / GIB, 4)}  # fmt: skip
    if per_rank:
        # Each GPU's own peak: ranks differ (rank 0 also gathers for saves), and a card
        # OOMs on its own figure, so the largest is the one to compare with the plan.
        metrics["per_rank"] = per_rank
        metrics["max_rank_peak_process_gib"] = max((r.get("peak_process_gib") or 0) for r in per_rank)
        metrics["max_rank_peak_reserved_gib"] = max((r.get("peak_reserved_gib") or 0) for r in per_rank)
    if rank0:
        write_text_atomic(run_dir / METRICS, json.dumps(metrics, indent=2) + "\n")
        log(f"saved {final}")
    return metrics


def _per_rank(summary: dict[str, Any]) -> list[dict[str, Any]] | None:
    """Every rank's memory summary, gathered to all (None with one process)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    mine = {"rank": dist.get_rank(), **summary}
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, mine)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vramfit.train", description="Train the run in RUN_DIR.")
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--resume", action="store_true")
    a = ap.parse_args(argv)
    try:
        run(a.run_dir.resolve(), a.resume)
    except VramfitError as e:
        if os.environ.get("VRAMFIT_DEBUG"):
            raise
        bad_input = isinstance(e, UsageError)
        if bad_input:
            _append_log(a.run_dir, f"{BAD_INPUT_MARK}\nerror: {e.one_line()}\n")
        if not (bad_input and int(os.environ.get("WORLD_SIZE", "1")) > 1):
            # Bad input is every rank's (the same files, config and packages): under a
            # launcher vramfit.launcher prints the line once, from train.log, not each rank.
            print(f"error: {e.one_line()}", file=sys.stderr)
        if isinstance(e, Preempted) and e.every_rank:
            # A stop every rank agreed on (not a signal before training, which only the
            # signalled rank sees): they leave together, as a finished run does. Without it a
            # rank's exit 75 became gloo's abort (-6) and the launcher's kill (-9) once in a
            # loaded CPU test suite.
            _close_process_group()
        return e.exit_code
    except torch.OutOfMemoryError as e:
        if os.environ.get("VRAMFIT_DEBUG"):
            raise
        from .oom import OOM_EXIT, OOM_FILE

        needed = _needed_at_oom(str(e))
        # detail: torch's whole message, with the card's free memory and the processes holding
        # the rest (other processes: the usual cause of an OOM the plan did not predict).
        record = {"step": _PROGRESS.get("step"), "needed_gib": needed, "message": str(e).split(".")[0], "detail": str(e)}
        if int(os.environ.get("RANK", 0)) == 0:
            write_text_atomic(a.run_dir / OOM_FILE, json.dumps(record) + "\n")
        # Not an "error:" line: the launcher decides whether this ends the run (see oom.py).
        print(f"oom: CUDA out of memory at step {record['step']} ({record['message']})", file=sys.stderr)
        return OOM_EXIT
    except Exception:
        log_crash(a.run_dir)
        raise  # Python prints it to stderr too, and exits 1: the launcher says where to look
    _close_process_group()
    return 0


def log_crash(run_dir: Path) -> None:
    """Append the exception being handled, with its traceback, to RUN_DIR/train.log: on a
    rented machine the terminal that showed it is often gone when someone looks, and the
    run directory is what is kept. Each rank writes its own (one append each); never raises,
    so the original error is the one that surfaces."""
    import traceback

    rank = os.environ.get("RANK")
    head = CRASH_MARK + (f" (rank {rank})" if rank is not None and int(os.environ.get("WORLD_SIZE", 1)) > 1 else "")
    _append_log(run_dir, head + "\n" + traceback.format_exc())


def _append_log(run_dir: Path, text: str) -> None:
    """One append to RUN_DIR/train.log; never raises (the error being reported comes first)."""
    try:
        fd = os.open(run_dir / TRAIN_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, text.encode("utf-8", "replace"))
        finally:
            os.close(fd)
    except OSError:
        pass


def _close_process_group() -> None:
    """Tear down the ranks' process group after a finished run, all ranks together. Rank 0
    still writes the adapter and metrics after the others are done; a rank that exits (or
    tears down) while its peer is still connected, or after it has gone, can be aborted by
    gloo's threads at shutdown ("terminate called without an active exception"): a finished
    run's exit 0 turned into a crash twice in CPU test suites. The barrier lines the ranks up
    first; the launcher ends the others if a rank failed before reaching it."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def _needed_at_oom(message: str) -> float | None:
    """GiB the process needed at least: what it held (allocator + outside it) plus the
    allocation that failed, as PyTorch's message states it."""
    import re

    from .memory import CUDA_CONTEXT_GIB

    m = re.search(r"Tried to allocate ([\d.]+) (GiB|MiB|KiB)", message)
    asked = float(m.group(1)) / {"GiB": 1, "MiB": 1024, "KiB": 1024**2}[m.group(2)] if m else 0.0
    if not torch.cuda.is_available():
        return None  # an injected fault: nothing was measured
    return round(torch.cuda.memory_reserved() / GIB + CUDA_CONTEXT_GIB + asked, 3)


if __name__ == "__main__":
    sys.exit(main())

"""Plan -> the run directory: the contract between plan, train and merge.

Everything train and merge need is written here before anything runs: plan.yaml
(resolved config, provenance, memory breakdown), the constructor kwargs for
TrainingArguments / LoraConfig / BitsAndBytesConfig as JSON, deepspeed.json when
used, and launch.sh. The directory appears atomically (built under a temporary
name, then renamed), so a run directory that exists is always complete.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import yaml

from . import __version__
from .errors import UsageError
from .launch import cpu_threads_env, launch_script
from .plan import Plan
from .presets import deepspeed_dir

PLAN_FILE = "plan.yaml"
CHECKPOINTS = "checkpoints"
ADAPTER = "adapter"  # PEFT adapter (or full weights) + tokenizer, written by train
METRICS = "metrics.json"
TRAIN_LOG = "train.log"  # progress lines, and a crash's traceback (train.log_crash)
# The line train.py writes into RUN_DIR/train.log above the traceback of a crash; the CLI
# looks for it to say where the traceback is kept.
CRASH_MARK = "crash: training stopped on an unexpected error"
# The line it writes there before a bad-input error it found (a UsageError: the tokenizer,
# the data as tokenized), so that the CLI passes that error's exit code on as it is.
BAD_INPUT_MARK = "bad input: training stopped on an error in what it was given"


def training_args(plan: Plan) -> dict[str, Any]:
    c, t = plan.config, plan.config.train
    has_val = c.data.val_fraction > 0
    args: dict[str, Any] = {
        "output_dir": CHECKPOINTS,  # relative: train resolves it against the run dir
        "per_device_train_batch_size": t.micro_batch,
        "per_device_eval_batch_size": t.micro_batch,
        "gradient_accumulation_steps": t.grad_accum,
        "max_steps": t.max_steps,
        "num_train_epochs": t.epochs,
        "learning_rate": t.lr,
        "lr_scheduler_type": t.scheduler,
        "warmup_steps": t.warmup_steps,
        "weight_decay": t.weight_decay,
        "max_grad_norm": t.max_grad_norm,
        "optim": t.optimizer,
        "bf16": plan.dtype == "bfloat16" and plan.device == "cuda",
        "fp16": plan.dtype == "float16" and plan.device == "cuda",
        "gradient_checkpointing": t.grad_ckpt,
        # Non-reentrant checkpointing works with frozen embeddings (LoRA/QLoRA)
        # without forcing inputs to require grad.
        "gradient_checkpointing_kwargs": {"use_reentrant": False} if t.grad_ckpt else None,
        "logging_steps": t.logging_steps,
        "logging_first_step": True,
        # The filter's check (isnan(loss) or isinf(loss)) reads the loss on the CPU after every
        # micro-batch: the CPU waits for the GPU's whole queue, then the GPU idles while the
        # CPU prepares the next micro-batch. It only swaps a NaN in the *logged* loss for the
        # average so far; off, a diverged run logs nan, which is what it is.
        "logging_nan_inf_filter": False,
        "save_strategy": "steps",
        "save_steps": t.save_steps,
        "save_total_limit": t.save_total_limit,
        "eval_strategy": "steps" if has_val else "no",
        "eval_steps": t.eval_steps if has_val else None,
        "seed": t.seed,
        "data_seed": t.seed,
        "report_to": "none",
        "remove_unused_columns": False,  # our collator needs labels as built
        "dataloader_num_workers": t.dataloader_workers,
        "disable_tqdm": True,  # vramfit prints its own one-line progress
        "use_cpu": plan.device == "cpu",
    }
    if c.deepspeed.stage:
        args["deepspeed"] = "deepspeed.json"
    if c.kernels.fused_loss or c.kernels.liger_ops:
        # The Trainer patches the model with liger-kernel (transformers.integrations.liger);
        # only the kernels asked for, so the memory model knows what runs. No SwiGLU under the
        # tiled MLP: liger would replace the MLP forward the tiling wraps.
        ops = c.kernels.liger_ops
        args["use_liger_kernel"] = True
        args["liger_kernel_config"] = {
            "fused_linear_cross_entropy": c.kernels.fused_loss,
            "cross_entropy": False,
            "rms_norm": ops,
            "swiglu": ops and not c.kernels.tiled_mlp,
            "rope": ops,
        }
    if c.world_size > 1:
        args["ddp_find_unused_parameters"] = False
    return args


def lora_config(plan: Plan) -> dict[str, Any] | None:
    if not plan.config.uses_adapter:
        return None
    lo = plan.config.lora
    return {
        "r": lo.r,
        "lora_alpha": lo.alpha,
        "lora_dropout": lo.dropout,
        # The model's own module names (phi3's fused qkv_proj for q/k/v_proj).
        "target_modules": plan.shape.resolve_targets(lo.target_modules),
        "bias": "none",
        "task_type": "CAUSAL_LM",
    }


def bnb_config(plan: Plan) -> dict[str, Any] | None:
    c = plan.config
    if c.method != "qlora":
        return None
    if c.quant.bits == 8:
        return {"load_in_8bit": True}
    return {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": c.quant.quant_type,
        "bnb_4bit_use_double_quant": c.quant.double_quant,
        "bnb_4bit_compute_dtype": plan.dtype,
        # ZeRO-3 shards parameters by dtype: 4-bit storage must match the compute dtype.
        "bnb_4bit_quant_storage": plan.dtype if c.deepspeed.stage == 3 else "uint8",
    }


def deepspeed_config(plan: Plan) -> dict[str, Any] | None:
    ds = plan.config.deepspeed
    if not ds.stage:
        return None
    name = "zero3_offload.json" if ds.stage == 3 and ds.offload_params else f"zero{ds.stage}.json"
    cfg = json.loads((deepspeed_dir() / name).read_text())
    zo = cfg["zero_optimization"]
    if ds.offload_optimizer:
        zo["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    else:
        zo.pop("offload_optimizer", None)
    return cfg


def plan_document(plan: Plan) -> dict[str, Any]:
    """plan.yaml's content; local model/data paths made absolute so the run dir works from any cwd."""
    doc = {
        "vramfit_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model_path": resolve_path(plan.config.model.name) or plan.model_ref,
        "data_path": resolve_path(plan.config.data.path),
    }
    doc.update(plan.summary())
    return doc


def resolve_path(ref: str | None) -> str | None:
    """Absolute path for a local file/dir so the run dir works from any cwd; hub ids as given."""
    if ref is None:
        return None
    p = Path(ref).expanduser()
    return str(p.resolve()) if p.exists() else ref


def check_out_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} is a file, not a run directory", "pass --out NEW_DIR, a directory that does not exist yet")
    if out.exists() and any(out.iterdir()):
        what = "a run" if (out / PLAN_FILE).exists() else "files"
        raise UsageError(
            f"{out} already holds {what}",
            "pass --resume to continue that run, or --out NEW_DIR for a new one",
        )


def write_run_dir(plan: Plan, out: Path) -> Path:
    """Write every file of the run, atomically. Returns the run directory."""
    out = out.expanduser().resolve()
    check_out_dir(out)
    files: dict[str, Any] = {
        PLAN_FILE: plan_document(plan),
        "training_args.json": training_args(plan),
        "lora_config.json": lora_config(plan),
        "bnb_config.json": bnb_config(plan),
        "deepspeed.json": deepspeed_config(plan),
    }
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create {out.parent}: {e.strerror}", "choose a writable --out directory") from None
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        tmp.mkdir(mode=0o700)
        for name, content in files.items():
            if content is None:
                continue
            text = yaml.safe_dump(content, sort_keys=False) if name.endswith(".yaml") else json.dumps(content, indent=2)
            (tmp / name).write_text(text + ("" if text.endswith("\n") else "\n"), encoding="utf-8")
        script = tmp / "launch.sh"
        # On a CPU run DeepSpeed (imported by transformers) would warn that it found no GPU.
        extra_env = {"DS_ACCELERATOR": "cpu"} if plan.device == "cpu" else {}
        extra_env |= cpu_threads_env(plan.config, plan.device)
        script.write_text(launch_script(plan.config, extra_env=extra_env), encoding="utf-8")
        script.chmod(0o700)
        if out.exists():
            out.rmdir()  # empty (checked above); rename needs the name free
        os.rename(tmp, out)
    except OSError as e:
        raise UsageError(f"cannot write run directory {out}: {e.strerror}", "choose a writable --out directory") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _with_defaults(config: Any) -> Any:
    """An existing plan.yaml's config with today's defaults filled in: a key added to
    vramfit after the run was planned (kernels.fused_loss, data.packing) is not a
    difference when the new plan leaves it at its default. A config that no longer
    validates is compared as written."""
    from .config import RunConfig

    try:
        return RunConfig.model_validate(config).model_dump(mode="json")
    except Exception:  # noqa: BLE001 - compared as written, and so reported as different
        return config


def plan_differences(doc: dict[str, Any], plan: Plan) -> list[str]:
    """Dotted keys where an existing run's plan.yaml and a new plan disagree."""
    new = plan_document(plan)
    diffs = [k for k in ("model_path", "data_path") if doc.get(k) != new[k]]

    def walk(a: Any, b: Any, prefix: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                walk(a.get(k), b.get(k), f"{prefix}{k}.")
        elif a != b:
            diffs.append(prefix.rstrip("."))

    walk(_with_defaults(doc.get("config")), new["config"], "")
    # The node rank names the machine, not the run: every node of a multi-node run may
    # run the same command (with its own --node-rank) on one shared run directory.
    return [d for d in diffs if d != "launch.node_rank"]


def write_text_atomic(path: Path, text: str) -> None:
    """Replace one file of a run directory in a single rename: readers see the old
    content or the new, never a torn one (metrics.json, oom.json, preempted.json, the
    files OOM recovery rewrites)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def read_plan(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / PLAN_FILE
    if not path.is_file():
        raise UsageError(f"{run_dir} is not a vramfit run directory (no {PLAN_FILE})", "pass the directory `vramfit train` printed")
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise UsageError(f"cannot read {path}: {e}", "the run directory is damaged; plan a new run") from None
    if not isinstance(doc, dict) or "config" not in doc:
        raise UsageError(f"{path} is not a vramfit plan", "plan a new run")
    return doc

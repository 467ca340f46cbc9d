"""Recover from a CUDA out-of-memory: halve the micro-batch, double accumulation, resume.

The training process exits with OOM_EXIT after writing what it saw (RUN_DIR/oom.json:
the allocator's peak and the allocation that failed). ``adjust_after_oom`` then
rewrites the run's plan with half the micro-batch and twice the accumulation (the
effective batch, learning rate schedule and data order stay), appends the event to
RUN_DIR/events.jsonl with how far the prediction was off, and the caller resumes
from the last checkpoint. It gives up at micro-batch 1 or after MAX_RETRIES.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import yaml

from .errors import TrainingFailed
from .render import write_text_atomic

OOM_EXIT = 5
MAX_RETRIES = 3
OOM_FILE = "oom.json"
EVENTS = "events.jsonl"


def oom_events(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / EVENTS
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue  # a torn last line from a killed process: the rest still counts
        if isinstance(event, dict) and event.get("event") == "oom":
            out.append(event)
    return out


def _repredict(doc: dict[str, Any]) -> float | None:
    """The memory model's peak for the adjusted plan (None if the plan lacks a shape)."""
    from .config import RunConfig
    from .memory import estimate
    from .model_shape import ModelShape

    try:
        shape = ModelShape(**{k: v for k, v in doc["shape"].items() if k != "total_params"})
        cfg = RunConfig.model_validate(doc["config"])
    except (KeyError, TypeError, ValueError):
        return None
    return estimate(shape, cfg, doc.get("dtype", "bfloat16"), doc.get("device", "cuda")).peak_gib


def oom_cause(predicted: float | None, needed: float | None) -> tuple[str | None, str]:
    """Why the run ran out, as far as the numbers tell: (cause, words for the one-line message).

    ``needed`` is what the process held when it ran out plus the allocation that failed. Above
    the plan's prediction, the memory model under-predicted; at or below it, the prediction
    held and the card had less free memory than planned (proven that way: another process
    took memory mid-run, docs/benchmarks/oom.md)."""
    if not (predicted and needed):
        return None, ""
    if needed > predicted:
        pct = 100 * (needed - predicted) / predicted
        return "under_prediction", (
            f"; the plan predicted {predicted:.2f} GiB, the run needed at least {needed:.2f} GiB "
            f"(the memory model was {pct:.0f}% under)"
        )
    return "less_memory_than_planned", (
        f"; the run held {needed:.2f} GiB when it ran out, within the {predicted:.2f} GiB planned: "
        "less memory was free than planned (another process on the GPU?)"
    )


def adjust_after_oom(run_dir: Path) -> dict[str, Any]:
    """Rewrite RUN_DIR for half the micro-batch; returns the event recorded. Raises
    TrainingFailed when no retry is left."""
    run_dir = Path(run_dir)
    doc = yaml.safe_load((run_dir / "plan.yaml").read_text(encoding="utf-8"))
    seen = json.loads((run_dir / OOM_FILE).read_text()) if (run_dir / OOM_FILE).is_file() else {}
    train = doc["config"]["train"]
    mb, ga = int(train["micro_batch"]), int(train["grad_accum"])
    predicted = doc.get("predicted_peak_gib")
    needed = seen.get("needed_gib")
    cause, off = oom_cause(predicted, needed)
    # Positive: the run needed more than predicted (an under-prediction).
    under = round(100 * (needed - predicted) / predicted, 1) if predicted and needed else None
    tries = len(oom_events(run_dir))
    if mb == 1 or tries >= MAX_RETRIES:
        why = "at micro-batch 1" if mb == 1 else f"after {tries} retries with smaller micro-batches"
        raise TrainingFailed(
            f"CUDA out of memory {why}{off}; checkpoints in {run_dir} are kept",
            "plan again with a shorter data.seq_len, method=qlora or a larger --budget, and a new --out",
        )
    train["micro_batch"], train["grad_accum"] = mb // 2, ga * 2
    new_peak = _repredict(doc)
    if new_peak is not None:
        doc["predicted_peak_gib"] = round(new_peak, 3)
    args_file = run_dir / "training_args.json"
    args = json.loads(args_file.read_text())
    args["per_device_train_batch_size"], args["gradient_accumulation_steps"] = mb // 2, ga * 2
    event = {
        "event": "oom",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "step": seen.get("step"),
        "micro_batch": [mb, mb // 2],
        "grad_accum": [ga, ga * 2],
        "predicted_peak_gib": predicted,
        "needed_at_least_gib": needed,
        "under_prediction_pct": under,
        "cause": cause,
        "message": seen.get("message"),
        "detail": seen.get("detail"),
    }
    # Training args first, plan last: plan.yaml is what a rerun compares against.
    write_text_atomic(args_file, json.dumps(args, indent=2) + "\n")
    write_text_atomic(run_dir / "plan.yaml", yaml.safe_dump(doc, sort_keys=False))
    with (run_dir / EVENTS).open("a", encoding="utf-8") as f:
        f.write(json.dumps(event) + "\n")
    (run_dir / OOM_FILE).unlink(missing_ok=True)
    return event

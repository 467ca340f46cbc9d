"""Adapter + base -> merged 16-bit model, verified, written atomically.

A QLoRA adapter is merged into the 16-bit base, not into the 4-bit weights it
trained against: the result is a normal model every tool loads, at the cost of
the small difference between the 4-bit and 16-bit base (docs/merge.md).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from .config import RunConfig
from .errors import UsageError, VramfitError
from .render import ADAPTER, read_plan

# Text the check runs through both models; short so a 70B on CPU still finishes.
PROMPTS = [
    "Reverse the letters of the word: garden",
    "Write a short sentence about the ocean.",
    "1 2 3 4 5 6 7 8",
]
# Merging adds B@A into W and rounds once to 16 bits; unmerged, the same sum is
# done in fp32 activations. The logits then differ by rounding, which for bf16
# (8 mantissa bits) is up to a few 1e-2 relative to the logits' scale.
TOLERANCE = {"bfloat16": 5e-2, "float16": 1e-2, "float32": 1e-4}


@dataclass
class MergeResult:
    out: Path
    max_abs_diff: float
    tolerance: float
    prompts: int
    dtype: str


def _is_inside(path: Path, parent: Path) -> bool:
    try:
        path.resolve().relative_to(parent.resolve())
        return True
    except ValueError:
        return False


def merge_run(run_dir: Path, out: Path | None = None, force: bool = False) -> MergeResult:
    run_dir = Path(run_dir).expanduser().resolve()
    doc = read_plan(run_dir)
    cfg = RunConfig.model_validate(doc["config"])
    if not cfg.uses_adapter:
        raise UsageError(
            f"{run_dir} is a full fine-tuning run: {run_dir / 'model'} is already a complete model",
            "load that directory with from_pretrained; there is no adapter to merge",
        )
    adapter = run_dir / ADAPTER
    if not (adapter / "adapter_config.json").is_file():
        raise UsageError(f"no trained adapter in {adapter}", f"finish training first: vramfit train --resume --out {run_dir}")
    out = (Path(out).expanduser() if out else run_dir / "merged").resolve()

    from .model_source import resolve_model_dir

    base_dir = resolve_model_dir(doc["model_path"])
    if Path(base_dir).exists() and _is_inside(out, Path(base_dir)):
        raise UsageError(f"refusing to write into the base model's directory {base_dir}", "pass --out somewhere else")
    if out.exists() and not force:
        raise UsageError(f"{out} already exists", "pass --force to replace it, or --out NEW_DIR")

    import torch

    cuda = torch.cuda.is_available()
    from .quiet import quiet_libraries

    quiet_libraries("cuda" if cuda else "cpu")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from .model_source import load_tokenizer

    # 16-bit as promised; on CPU bf16 matmuls are slow, but correctness is what matters here.
    dtype_name = doc.get("dtype") if doc.get("dtype") in ("bfloat16", "float16") else "bfloat16"
    if not cuda and dtype_name == "float16":
        dtype_name = "bfloat16"
    dtype = getattr(torch, dtype_name)
    base = AutoModelForCausalLM.from_pretrained(
        base_dir,
        dtype=dtype,
        device_map={"": 0} if cuda else None,
        trust_remote_code=cfg.model.trust_remote_code,
    )
    tokenizer = load_tokenizer(str(adapter) if (adapter / "tokenizer_config.json").is_file() else doc["model_path"])
    try:
        model = PeftModel.from_pretrained(base, str(adapter))
    except (ValueError, RuntimeError, KeyError) as e:
        raise VramfitError(
            f"the adapter in {adapter} does not match its base model: {' '.join(str(e).split())[:200]}",
            "merge with the base model the run was trained on",
        ) from None
    model.eval()
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True).to(base.device)
    with torch.no_grad():
        before = model(**batch).logits.float()
        merged = model.merge_and_unload()
        after = merged(**batch).logits.float()
    mask = batch["attention_mask"].bool()
    diff = (before - after).abs()[mask].max().item()
    scale = before.abs()[mask].max().item() or 1.0
    tolerance = TOLERANCE[dtype_name] * scale
    if not diff <= tolerance:  # also catches NaN
        raise VramfitError(
            f"merged model's logits differ from base + adapter by {diff:.3g} (tolerance {tolerance:.3g})",
            "the adapter or base is damaged; nothing was written",
        )

    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        merged.save_pretrained(tmp, safe_serialization=True, max_shard_size="5GB")
        tokenizer.save_pretrained(tmp)
        # Swap in one rename: an interrupted merge leaves only dot-named temporaries.
        if out.exists():
            os.rename(out, old)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return MergeResult(out=out, max_abs_diff=diff, tolerance=tolerance, prompts=len(PROMPTS), dtype=dtype_name)

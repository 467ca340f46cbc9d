"""Adapter + base -> merged 16-bit model, verified, written atomically.

The merge arithmetic runs in fp32: the 16-bit base is upcast (losslessly), the
adapter's delta added, and the sum rounded to 16 bits once, at save. Merging in
bf16 directly (PEFT's default on a bf16 model) rounds the delta and then the sum:
a LoRA delta is often only a few bf16 ulps of the weight it updates, and on a 7B
that double rounding moved the logits by ~7% of their scale in our GPU proof.

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
# Both sides of the check run in fp32 with the same weights but for the merge, so
# they differ only by fp32 rounding of (W + BA) x against W x + B (A x):
# ~1e-6 relative per layer. 1e-3 of the logits' scale leaves room for depth and
# for GPU kernels choosing different reduction orders, and is still far below
# the effect of any real adapter (which moves logits by whole units).
RELATIVE_TOLERANCE = 1e-3
# fp32 weights + activations per parameter, with room for the forward pass.
FP32_BYTES_PER_PARAM = 4.4


@dataclass
class MergeResult:
    out: Path
    max_abs_diff: float
    tolerance: float
    prompts: int
    dtype: str
    device: str


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

    from .quiet import quiet_libraries

    device = _merge_device(int(doc.get("total_params") or 0))
    quiet_libraries(device)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from .model_source import load_tokenizer

    # The saved model is 16-bit like its base; fp16 only where the run used it.
    dtype_name = "float16" if doc.get("dtype") == "float16" else "bfloat16"
    base = AutoModelForCausalLM.from_pretrained(
        base_dir,
        dtype=torch.float32,  # merge arithmetic in fp32; one rounding to 16 bits at save
        device_map={"": 0} if device == "cuda" else None,
        trust_remote_code=cfg.model.trust_remote_code,
    )
    tokenizer = load_tokenizer(str(adapter) if (adapter / "tokenizer_config.json").is_file() else doc["model_path"])
    try:
        model = PeftModel.from_pretrained(base, str(adapter))
    except Exception as e:  # noqa: BLE001 - every way an adapter fails to load is the user's to fix
        detail = " ".join(str(e).split())[:200]
        # Unreadable files (torn JSON, bad safetensors header) are damage, not a mismatch.
        damaged = (isinstance(e, ValueError) and "Expecting" in str(e)) or type(e).__name__ == "SafetensorError"
        if damaged:
            raise VramfitError(
                f"the adapter in {adapter} is damaged: {detail}",
                f"restore it from the newest checkpoint in {run_dir / 'checkpoints'} or retrain",
            ) from None
        raise VramfitError(
            f"the adapter in {adapter} does not match its base model: {detail}",
            "merge with the base model the run was trained on",
        ) from None
    model.eval()
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True).to(base.device)
    # TF32 would make the two fp32 sides differ by ~1e-3 on its own.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    with torch.no_grad():
        before = model(**batch).logits
        merged = model.merge_and_unload()
        after = merged(**batch).logits
    mask = batch["attention_mask"].bool()
    diff = (before - after).abs()[mask].max().item()
    scale = before.abs()[mask].max().item() or 1.0
    tolerance = RELATIVE_TOLERANCE * scale
    if not diff <= tolerance:  # also catches NaN
        raise VramfitError(
            f"merged model's logits differ from base + adapter by {diff:.3g} (tolerance {tolerance:.3g})",
            "the adapter or base is damaged; nothing was written",
        )
    merged = merged.to(getattr(torch, dtype_name))
    need = sum(p.numel() for p in merged.parameters()) * 2 * 1.05  # 16-bit shards + index/tokenizer
    disk = out.parent
    while not disk.exists():  # --out in directories not made yet: the disk they will be on
        disk = disk.parent
    free = shutil.disk_usage(disk).free
    if free < need:
        raise VramfitError(
            f"{out.parent} has {free / 2**30:.1f} GiB free; the merged model needs ~{need / 2**30:.1f} GiB",
            "free disk space or pass --out on a larger disk; nothing was written",
        )

    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        merged.save_pretrained(tmp, safe_serialization=True, max_shard_size="5GB")
        tokenizer.save_pretrained(tmp)
        # An interrupted merge leaves only dot-named temporaries; a replaced output
        # is moved aside first and deleted only once the new one is in place.
        try:
            if out.exists():
                os.rename(out, old)
            os.rename(tmp, out)
        except BaseException:  # a failed rename, and a Ctrl-C between the two, too
            if old.exists() and not out.exists():
                os.rename(old, out)  # the old output back under its name
            raise
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return MergeResult(
        out=out, max_abs_diff=diff, tolerance=tolerance, prompts=len(PROMPTS), dtype=dtype_name, device=device
    )


def _merge_device(total_params: int) -> str:
    """The GPU when the fp32 model fits its free memory, else the CPU if host RAM holds it."""
    import torch

    need = total_params * FP32_BYTES_PER_PARAM
    if torch.cuda.is_available() and torch.cuda.mem_get_info()[0] >= need:
        return "cuda"
    from .hardware import detect

    avail = detect().host_ram_available_bytes
    if avail and need > avail:
        raise VramfitError(
            f"merging needs ~{need / 2**30:.0f} GiB for the fp32 model; {avail / 2**30:.0f} GiB of RAM is free"
            + (" and the GPU has less" if torch.cuda.is_available() else ""),
            "run the merge on a machine with more RAM (any machine works: merge needs no GPU)",
        )
    return "cpu"

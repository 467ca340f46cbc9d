#!/usr/bin/env python3
"""Measure the memory savers (train.offload_embeddings, kernels.tiled_mlp, and
train.offload_activations on the fixed path) on one GPU, through the real CLI.

Each case is one `vramfit train` of a random-weight model of a real architecture
(scripts/make_random_model.py) on a generated dataset whose every example is longer than the
sequence (scripts/make_embedded_dataset.py), every choice pinned with --set on the 24gb
preset, under the cap --budget gives (the allocator is capped there, so a case that needs
more OOMs instead of borrowing the card). Each appends one JSON line to RESULTS/savers.jsonl:
the command, exit, the plan's predicted peak and tokens/s and breakdown, metrics.json
(measured peaks, steady tokens/s), GPU and versions.

    python scripts/prove_memory_savers.py --results $OUT/savers                  # every case
    python scripts/prove_memory_savers.py --only qwen-16k-all --results DIR
    python scripts/prove_memory_savers.py --list                                   # CPU: the commands
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time

import yaml
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from prove_preset import versions  # noqa: E402

QWEN_R8 = ["method=qlora", "lora.r=8", "lora.alpha=16", "lora.target_modules=[q_proj,v_proj]"]
LLAMA_R32 = ["method=qlora", "lora.r=32", "lora.alpha=64", "lora.target_modules=all-linear"]
MB1 = ["train.micro_batch=1", "train.grad_accum=1", "kernels.fused_loss=true", "train.grad_ckpt=true"]
SAVERS = ["train.offload_embeddings=true", "kernels.tiled_mlp=true"]
# name: (arch, seq_len, budget GiB, --set values, steps)
CASES: dict[str, tuple[str, int, float, list[str], int]] = {
    # The 8 GB target, Qwen2.5-7B QLoRA at micro-batch 1 and 16,384 tokens, measured
    # under a roomy cap first: what it really takes with every saver.
    "qwen-16k-all": ("qwen2.5-7b", 16384, 24, [*QWEN_R8, *MB1, *SAVERS, "train.offload_activations=true"], 3),
    # The one offload run so far (docs/benchmarks/fused/, 3,256 tokens/s) ran on the path that
    # copied each layer's insides too; the same config on the fixed path.
    "qwen-8k-offload": ("qwen2.5-7b", 8192, 24, [*QWEN_R8, *MB1, "train.offload_activations=true"], 4),
    # The same 8k with the embedding table in host RAM and the tiled MLP, without offload:
    # the savers' own cost and memory, no PCIe activations in the way.
    "qwen-8k-savers": ("qwen2.5-7b", 8192, 24, [*QWEN_R8, *MB1, *SAVERS], 4),
    # Llama-3.1-8B QLoRA r32 all-linear past Unsloth's published 21,848 tokens at 12 GB.
    "llama-22k-12": ("llama-3.1-8b", 22528, 12, [*LLAMA_R32, *MB1, *SAVERS, "train.offload_activations=true"], 3),
}


def command(name: str, work: Path) -> list[str]:
    arch, seq, budget, sets, steps = CASES[name]
    flags = [x for s in [*sets, f"data.seq_len={seq}", f"train.max_steps={steps}", "train.save_steps=1000"] for x in ("--set", s)]
    return ["train", "--preset", "24gb", "--budget", f"{budget:g}", "--model", str(work / arch),
            "--data", str(work / f"ctx-{seq}.jsonl"), "--out", str(work / f"run-{name}"), *flags]  # fmt: skip


def run(argv: list[str], log) -> tuple[int, float, list[str]]:
    print("$ " + shlex.join(argv), flush=True)
    t = time.perf_counter()
    p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log.write(p.stdout)
    return p.returncode, time.perf_counter() - t, p.stdout.splitlines()[-15:]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", choices=list(CASES))
    ap.add_argument("--work", type=Path, default=Path("/tmp/vramfit-savers"))
    ap.add_argument("--results", type=Path)
    ap.add_argument("--list", action="store_true")
    a = ap.parse_args()
    names = a.only or list(CASES)
    if a.list:
        for n in names:
            print(n + ": vramfit " + shlex.join(command(n, a.work)))
        return 0
    if a.results is None:
        ap.error("--results is required to run")
    import torch

    a.work.mkdir(parents=True, exist_ok=True)
    a.results.mkdir(parents=True, exist_ok=True)
    meta = {"gpu": torch.cuda.get_device_name(0), "versions": versions(), "date": time.strftime("%Y-%m-%d")}
    py = sys.executable
    with open(a.results / "savers.log", "a") as log:
        for n in names:
            arch, seq, *_ = CASES[n]
            if not (a.work / arch).exists():
                run([py, str(ROOT / "scripts/make_random_model.py"), str(ROOT / f"scripts/archs/{arch}.json"), str(a.work / arch), "--device", "cuda"], log)
            data = a.work / f"ctx-{seq}.jsonl"
            if not data.exists():
                # Byte-level tokens: 512 characters more than seq_len fill it, chat template and all.
                run([py, str(ROOT / "scripts/make_embedded_dataset.py"), "--n", "16", "--min-chars", str(seq + 512), "--out", str(data)], log)
            argv = command(n, a.work)
            rc, secs, tail = run([py, "-m", "vramfit", *argv], log)
            out = a.work / f"run-{n}"
            rec = {"case": n, "command": "vramfit " + shlex.join(argv), "exit": rc, "seconds": round(secs, 1), "tail": tail, **meta}
            for f, key in (("metrics.json", "metrics"), ("plan.yaml", "plan")):
                if (out / f).is_file():
                    text = (out / f).read_text()
                    rec[key] = json.loads(text) if f.endswith(".json") else yaml.safe_load(text)
            m = rec.get("metrics", {})
            print(f"{n}: exit {rc} in {secs:.0f} s; predicted {m.get('predicted_peak_gib')} GiB, "
                  f"measured reserved {m.get('peak_reserved_gib')} process {m.get('peak_process_gib')}; "
                  f"{m.get('steady_tokens_per_s')} tok/s (predicted {m.get('predicted_tokens_per_s')})", flush=True)  # fmt: skip
            with open(a.results / "savers.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

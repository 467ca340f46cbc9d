#!/usr/bin/env python3
"""Per-layer saved activations: the memory model against the two-depth runs on a GPU.

scripts/calibration_matrix_layers.yaml trains each configuration at two depths of one
architecture (its first 2 and 6 decoder layers) without checkpointing. Everything outside
the decoder layers is the same at both depths, so the difference of the two measured peaks,
over the 4 layers between them, is what one layer costs; less the layer's weights, adapters
and their state (which the model counts exactly), it is one layer's saved activations. This
prints that, per token, beside memory.layer_activation_bytes for the same configuration.
No GPU needed: it reads docs/benchmarks/calibration/layers/calibration.jsonl.

    python scripts/layer_activation_report.py
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "src"))
import calibrate_memory  # noqa: E402

RAW = ROOT / "docs/benchmarks/calibration/layers/calibration.jsonl"
GIB = 1 << 30


def pairs(raw: Path = RAW) -> list[dict]:
    """One dict per configuration run at two depths: measured and predicted bytes of saved
    activations per token and layer (measured from the allocator's peak)."""
    from vramfit.memory import estimate
    from vramfit.model_shape import shape_from_config

    groups: dict[tuple, dict[int, dict]] = {}
    for line in raw.read_text().splitlines():
        r = json.loads(line)
        if r["exit"] != 0:
            continue
        key = tuple(r.get(k) for k in ("arch", "method", "lora_r", "targets", "micro_batch", "seq_len", "liger", "dropout"))
        groups.setdefault(key, {})[r["layers"]] = r
    out = []
    for key, runs in groups.items():
        if len(runs) != 2:
            continue
        (lo, r_lo), (hi, r_hi) = sorted(runs.items())
        got = {}
        for depth, r in ((lo, r_lo), (hi, r_hi)):
            cfg = calibrate_memory.config_for(r)
            shape = shape_from_config(calibrate_memory.arch_config(r))
            b = estimate(shape, cfg, "bfloat16", "cuda", shortest=cfg.data.seq_len)  # every example fills the sequence
            got[depth] = (b, r["metrics"]["peak_allocated_gib"] * GIB, cfg)
        (b_lo, m_lo, cfg), (b_hi, m_hi, _) = got[lo], got[hi]
        layers = hi - lo
        tokens = cfg.train.micro_batch * cfg.data.seq_len
        # The loss phase holds every layer's activations: what else a layer adds is its weights'.
        other = ((b_hi.peak - b_hi.activations - b_hi.allocator_slack) - (b_lo.peak - b_lo.activations - b_lo.allocator_slack)) / layers
        measured = ((m_hi - m_lo) / layers - other) / tokens
        predicted = (b_hi.activations - b_lo.activations) / layers / tokens
        out.append({
            "arch": key[0], "method": key[1], "lora_r": key[2], "targets": key[3], "liger": bool(key[6]),
            "dropout": cfg.lora.dropout, "tokens": tokens, "measured_bytes_per_token_layer": round(measured),
            "predicted_bytes_per_token_layer": round(predicted), "error_pct": round((predicted / measured - 1) * 100, 2),
            "phases": (b_lo.phase, b_hi.phase),
        })  # fmt: skip
    return out


def markdown(rows: list[dict]) -> str:
    lines = ["| model | method | adapter | LoRA dropout | liger's ops | measured B/token/layer | predicted | error |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['arch']} | {r['method']} | r{r['lora_r']} {r['targets']} | {r['dropout']:g} | "
                     f"{'on' if r['liger'] else 'off'} | {r['measured_bytes_per_token_layer']:,} | "
                     f"{r['predicted_bytes_per_token_layer']:,} | {r['error_pct']:+.1f}% |")  # fmt: skip
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--raw", type=Path, default=RAW)
    a = ap.parse_args()
    rows = pairs(a.raw)
    print(markdown(rows))
    errs = [abs(r["error_pct"]) for r in rows]
    print(json.dumps({"pairs": len(rows), "worst_abs_error_pct": max(errs), "worst_under_pct": min(r["error_pct"] for r in rows)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""docs/benchmarks/autofit.csv and the tables of docs/benchmarks/autofit.md from the raw
lines scripts/prove_autofit.py wrote (docs/benchmarks/autofit/autofit.jsonl).

Each row shows what the plan predicted when it ran, and what this checkout's memory
and speed models predict for the same configuration and data (the proof's dataset is
regenerated deterministically for its length statistics). Rows whose speed the
current speed constants were fitted on are marked: the others are out of sample.

    python scripts/collect_autofit.py
    python scripts/collect_autofit.py --raw docs/benchmarks/autofit/session6/autofit.jsonl \
        --csv docs/benchmarks/autofit-session6.csv --fit-rows 0     # the grid re-run with session 6's auto-fit
"""

from __future__ import annotations

import csv
import json
import statistics
import sys
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
FIELDS = ("arch,budget_gib,method,seq_len,micro_batch,grad_accum,grad_ckpt,grad_ckpt_layers,optimizer,fused_loss,predicted_gib,measured_gib,"
          "mem_error_pct,under_budget,predicted_tokens_per_s,measured_tokens_per_s,speed_error_pct,"
          "now_predicted_gib,now_mem_error_pct,now_predicted_tokens_per_s,now_speed_error_pct,speed_fit_row,same_choice_now,"
          "steps,exit,gpu,command").split(",")
# The rows speed.py's constants were fitted on (the first 14 runs, in file order).
SPEED_FIT_ROWS = 14


@cache  # fit_speed reads six grids: the dataset is generated and tokenized once
def proof_lengths():
    """The length statistics every proof plan saw: same generator, seed and tokenizer."""
    import subprocess
    import tempfile

    from vramfit.data import load_records, tokenize_records
    from vramfit.embedded import byte_tokenizer
    from vramfit.speed import LengthStats

    with tempfile.TemporaryDirectory() as d:
        data = Path(d) / "spread.jsonl"
        subprocess.run([sys.executable, str(ROOT / "scripts/make_embedded_dataset.py"), "--n", "2000", "--min-chars", "100",
                        "--max-chars", "500", "--out", str(data)], check=True, capture_output=True)  # fmt: skip
        records, _ = load_records(str(data))
    examples, _ = tokenize_records(records, byte_tokenizer(), 10**9, True)
    return LengthStats(tuple(len(e["input_ids"]) for e in examples))


def plan_now(r: dict, lengths):
    """The RunConfig this checkout's auto-fit plans for the run's model and budget."""
    from vramfit.config import RunConfig
    from vramfit.fit import auto_fit
    from vramfit.model_shape import load_shape

    base = RunConfig.model_validate({"budget_gib": r["budget_gib"], "train": {"max_steps": 20, "save_steps": 20}})
    pinned = {"budget_gib", "model.name", "data.path", "train.max_steps", "train.save_steps"}
    # As on the GPU machine, where liger-kernel is installed.
    shape = load_shape(str(ROOT / f"scripts/archs/{r['arch']}.json"))
    cfg, _ = auto_fit(base, pinned, shape, r["budget_gib"], r["gpu"], lengths, fused_available=True)
    return cfg


def choice_now(planned, r: dict) -> bool:
    """Whether ``planned`` (plan_now) is the configuration the run trained (the recorded
    choices: method, length, batch split, checkpointing, optimizer, fused loss, liger's ops)."""
    return _same_choices(planned, r) and planned.kernels.liger_ops == liger(r)


def ckpt_layers(r: dict) -> int | None:
    """train.grad_ckpt_layers as the run had it (session 11 on; None before: every layer)."""
    return ((r.get("planned_config") or {}).get("train") or {}).get("grad_ckpt_layers")


def _same_choices(cfg, r: dict) -> bool:
    c = r["config"]
    now = (cfg.method, cfg.data.seq_len, cfg.train.micro_batch, cfg.train.grad_accum, cfg.train.grad_ckpt,
           cfg.train.grad_ckpt_layers, cfg.train.optimizer, cfg.kernels.fused_loss)  # fmt: skip
    return now == (r["plan"]["method"], c["seq_len"], c["micro_batch"], c["grad_accum"], c["grad_ckpt"], ckpt_layers(r),
                   c["optimizer"], fused(r))  # fmt: skip


def liger(r: dict) -> bool:
    """Whether the run had liger's fused ops (an auto-fit choice since session 6)."""
    return any(x.startswith("kernels.liger_ops true") for x in r["plan"].get("auto_fit") or [])


def savers(r: dict) -> dict[str, bool]:
    """The host-RAM savers a run recorded before session 7 had, from its auto-fit lines
    ("train.offload_activations true: ..."); off where a line does not turn one on."""
    lines = r["plan"].get("auto_fit") or []
    return {k: any(x.startswith(f"train.{k} true") for x in lines) for k in ("offload_activations", "offload_embeddings")}


def fused(r: dict) -> bool:
    """Whether the run used the fused loss (recorded since it became an auto-fit choice;
    before that, auto-fit never turned it on)."""
    return bool(r["config"].get("fused_loss", any(x.startswith("kernels.fused_loss true") for x in r["plan"].get("auto_fit", []))))


def predict_now(r: dict, lengths) -> tuple[float, float]:
    """This checkout's memory and speed models for the run as it trained."""
    from calibrate_memory import as_recorded
    from vramfit.config import RunConfig
    from vramfit.memory import estimate
    from vramfit.model_shape import load_shape
    from vramfit.speed import estimate_speed

    c = r["config"]
    if r.get("planned_config"):
        # Recorded whole since session 7. A key the run's checkout did not have yet takes
        # the behaviour it had then: data.pad_to_multiple_of (64 by default since session 7),
        # the kernel switches of calibrate_memory.KERNELS_BEFORE.
        doc = {**r["planned_config"], "data": {"pad_to_multiple_of": None, **r["planned_config"].get("data", {})}}
        cfg = RunConfig.model_validate(as_recorded(doc))
    else:
        # Before session 7: the recorded choices, and the savers its auto-fit lines name. Not
        # today's plan for the same choices: it adds what those runs did not have (the layer
        # inputs in host RAM where they were not needed, their async copies), and predicted
        # a Llama-3.1-8B run 6.2% under what it measured.
        cfg = RunConfig.model_validate(as_recorded({
            "method": r["plan"]["method"], "budget_gib": r["budget_gib"],
            "data": {"seq_len": c["seq_len"], "pad_to_multiple_of": None},
            "train": {**{k: c[k] for k in ("micro_batch", "grad_accum", "grad_ckpt", "optimizer")}, **savers(r)},
            "kernels": {"fused_loss": fused(r), "liger_ops": liger(r)},
        }))  # fmt: skip
    shape = load_shape(str(ROOT / f"scripts/archs/{r['arch']}.json"))
    return estimate(shape, cfg, "bfloat16", "cuda", lengths.longest, lengths.shortest).peak_gib, estimate_speed(shape, cfg, lengths, r["gpu"]).tokens_per_s


def table(raw: Path, fit_rows: int = SPEED_FIT_ROWS) -> list[dict]:
    out = []
    lengths = proof_lengths()
    for i, line in enumerate(raw.read_text().splitlines()):
        r = json.loads(line)
        planned = plan_now(r, lengths)  # one auto-fit search per run: it is the slow part
        now_peak, now_rate = predict_now(r, lengths)
        m, c, p = r["metrics"], r["config"], r["plan"]
        meas, pred = m.get("peak_process_gib"), p.get("predicted_peak_gib")
        rate, prate = m.get("steady_tokens_per_s"), p.get("predicted_tokens_per_s")
        out.append({
            "arch": r["arch"], "budget_gib": r["budget_gib"], "method": p.get("method"), **c, "fused_loss": fused(r),
            "grad_ckpt_layers": ckpt_layers(r),
            "predicted_gib": pred, "measured_gib": meas,
            "mem_error_pct": round(100 * (pred - meas) / meas, 1) if meas and pred else None,
            "under_budget": bool(meas and meas <= r["budget_gib"]),
            "predicted_tokens_per_s": prate, "measured_tokens_per_s": rate,
            "speed_error_pct": round(100 * (prate - rate) / rate, 1) if rate and prate else None,
            "now_predicted_gib": round(now_peak, 3), "now_mem_error_pct": round(100 * (now_peak - meas) / meas, 1),
            "now_predicted_tokens_per_s": round(now_rate, 1), "now_speed_error_pct": round(100 * (now_rate - rate) / rate, 1),
            "speed_fit_row": i < fit_rows,
            "same_choice_now": choice_now(planned, r),
            "steps": m.get("steps"), "exit": r["exit"], "gpu": r["gpu"], "command": r["command"],
        })  # fmt: skip
    return out


def ckpt_words(row: dict) -> str:
    if not row["grad_ckpt"]:
        return "off"
    n = row["grad_ckpt_layers"]
    return "on" if n is None else f"first {n} layer{'s' if n > 1 else ''}"


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--raw", type=Path, default=ROOT / "docs/benchmarks/autofit/autofit.jsonl")
    ap.add_argument("--csv", type=Path, default=ROOT / "docs/benchmarks/autofit.csv")
    ap.add_argument("--fit-rows", type=int, default=SPEED_FIT_ROWS,
                    help="how many leading rows of RAW the speed constants were fitted on (0 for a later grid)")
    a = ap.parse_args(argv)
    rows = table(a.raw, a.fit_rows)
    with a.csv.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    rows.sort(key=lambda r: (r["arch"], r["budget_gib"]))
    print("| model | budget GiB | plan: method, seq, micro-batch x accumulation, checkpointing | measured peak GiB | predicted then | predicted now | measured tokens/s | predicted then | predicted now |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        mark = ("" if r["speed_fit_row"] else " *") + ("" if r["same_choice_now"] else " †")
        print(f"| {r['arch']} | {r['budget_gib']:g} | {r['method']}, {r['seq_len']}, {r['micro_batch']} x {r['grad_accum']}, "
              f"{ckpt_words(r)}{', fused loss' if r['fused_loss'] else ''} | {r['measured_gib']:.2f} | {r['predicted_gib']:.2f} ({r['mem_error_pct']:+.1f}%) "
              f"| {r['now_predicted_gib']:.2f} ({r['now_mem_error_pct']:+.1f}%) | {r['measured_tokens_per_s']:,.0f} "
              f"| {r['predicted_tokens_per_s']:,.0f} ({r['speed_error_pct']:+.0f}%) | {r['now_predicted_tokens_per_s']:,.0f} ({r['now_speed_error_pct']:+.0f}%){mark} |")  # fmt: skip

    def stats(vals):
        vals = [abs(v) for v in vals]
        return {"median": statistics.median(vals), "worst": max(vals)}

    out_rows = [r for r in rows if not r["speed_fit_row"]]
    print(json.dumps({
        "runs": len(rows), "all_exit_0": all(r["exit"] == 0 for r in rows), "all_under_budget": all(r["under_budget"] for r in rows),
        "min_steps": min(r["steps"] for r in rows),
        "same_choice_now": sum(r["same_choice_now"] for r in rows),
        "memory_then": stats([r["mem_error_pct"] for r in rows]), "memory_now": stats([r["now_mem_error_pct"] for r in rows]),
        "memory_now_worst_under_pct": -min(r["now_mem_error_pct"] for r in rows),
        "speed_then": stats([r["speed_error_pct"] for r in rows]), "speed_now_all": stats([r["now_speed_error_pct"] for r in rows]),
        "speed_now_out_of_sample": stats([r["now_speed_error_pct"] for r in out_rows]), "out_of_sample_runs": len(out_rows),
    }))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Measure vramfit's real training stack on a GPU against the memory model.

For every row of a matrix (scripts/calibration_matrix.yaml) this runs the real CLI,
`python -m vramfit train`, for a few optimizer steps on a random-weight model of a
real architecture, with a dataset whose examples all fill the sequence length, and
records the predicted peak (the plan's breakdown) beside the measured one: the
allocator's peak reserved memory, the process's figure as NVML sees it, and the
steady tokens/s. One JSON line per run goes to RESULTS/calibration.jsonl with the
command, GPU and versions; scripts/calibration_report.py turns that into
docs/benchmarks/memory-calibration.csv, the error table and the plot.

Several runs share the GPU to save time: each is capped (--budget) at its
prediction plus headroom, the caps never add up to more than the card, and
VRAMFIT_GPU_TURN makes the runs take turns for their timed steps, so loading
overlaps but training never does.

    python scripts/calibrate_memory.py --results $OUT --work /tmp/cal --parallel 3 [--only qwen2.5-0.5b]
    python scripts/calibrate_memory.py --matrix scripts/calibration_matrix_archs.yaml --results $OUT/archs
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from prove_preset import versions  # noqa: E402

TARGETS = {"all": "all-linear", "qkvo": "[q_proj,k_proj,v_proj,o_proj]", "qv": "[q_proj,v_proj]"}
# A row's optional ninth column, attn, is model.attn_implementation (sdpa when left out);
# the tenth, loss, is plain or fused (kernels.fused_loss; plain when left out).
COLUMNS = ("arch", "method", "lora_r", "targets", "micro_batch", "seq_len", "grad_ckpt", "optimizer", "attn", "loss")
# A row may also be a mapping of these columns plus: layers (the architecture cut to that
# many decoder layers: two depths of one configuration isolate the per-layer terms),
# dropout (lora.dropout; the preset's 0.05 when left out) and liger (kernels.liger_ops).
EXTRA = ("layers", "dropout", "liger")


def read_matrix(path: Path) -> list[dict]:
    rows = []
    for r in yaml.safe_load(path.read_text())["rows"]:
        row = dict(r) if isinstance(r, dict) else dict(zip(COLUMNS, r))
        unknown = set(row) - set(COLUMNS) - set(EXTRA)
        if unknown:
            raise ValueError(f"{path}: unknown columns {sorted(unknown)} in {r}")
        rows.append({"attn": "sdpa", "loss": "plain", **row})
    return rows


def arch_name(row: dict) -> str:
    """The model directory's name: the architecture, or it cut to ``layers`` layers."""
    return f"{row['arch']}-L{row['layers']}" if row.get("layers") else row["arch"]


def arch_config(row: dict) -> dict:
    """The row's config.json: scripts/archs/ARCH.json, cut to ``layers`` decoder layers."""
    cfg = json.loads((ROOT / f"scripts/archs/{row['arch']}.json").read_text())
    if row.get("layers"):
        cfg["num_hidden_layers"] = int(row["layers"])
        for key in ("layer_types", "max_window_layers"):  # per-layer lists/limits sized to the depth
            if isinstance(cfg.get(key), list):
                cfg[key] = cfg[key][: int(row["layers"])]
    return cfg


@dataclass
class Job:
    row: dict
    argv: list[str] = field(default_factory=list)
    predicted: float = 0.0
    cap: float = 0.0
    tries: int = 0
    proc: subprocess.Popen | None = None
    run_dir: Path | None = None
    log: Path | None = None
    started: float = 0.0


# Kernel switches added since the oldest recorded runs, as those runs had them: PEFT's own LoRA
# layers (kernels.fused_lora: session 12, on by default since 13), recomputing every multiply
# (kernels.lean_recompute: session 15), making liger's SwiGLU product in recomputations
# (kernels.lean_mlp: session 18). A recorded config without the key ran so; the default,
# true since, would model it as fused and lean (memory.down_input_grad_copies,
# memory.lean_mlp_skips_product, speed.py).
KERNELS_BEFORE = {"fused_lora": False, "lean_recompute": False, "lean_mlp": False}
# The same for train: the embedding lookup from host RAM, in line with the GPU's work until
# session 19 made the overlapped one the default (train.offload_embeddings_async).
TRAIN_BEFORE = {"offload_embeddings_async": False}


def as_recorded(config: dict) -> dict:
    """A recorded plan.yaml config as its run behaved: the KERNELS_BEFORE and TRAIN_BEFORE
    switches it lacks, off."""
    return {**config, "kernels": {**KERNELS_BEFORE, **config.get("kernels", {})},
            "train": {**TRAIN_BEFORE, **config.get("train", {})}}  # fmt: skip


# What train.py logs where lean_mlp.py is installed: the runs of sessions 18 and 19 had the
# skip under kernels.lean_recompute, before kernels.lean_mlp was its own key.
LEAN_MLP_LOGGED = "the SwiGLU kernel (its output is never read)"


def run_config(run_dir: Path) -> dict:
    """A run directory's recorded config as its run behaved (as_recorded), with
    kernels.lean_mlp on where its train.log says the skip was installed."""
    config = yaml.safe_load((run_dir / "plan.yaml").read_text())["config"]
    log = run_dir / "train.log"
    if "lean_mlp" not in config.get("kernels", {}) and log.is_file() and LEAN_MLP_LOGGED in log.read_text():
        config = {**config, "kernels": {**config.get("kernels", {}), "lean_mlp": True}}
    return as_recorded(config)


def set_args(row: dict, steps: int) -> list[str]:
    sets = {
        "method": row["method"],
        "data.seq_len": row["seq_len"],
        "train.micro_batch": row["micro_batch"],
        "train.grad_accum": 1,
        "train.grad_ckpt": str(row["grad_ckpt"]).lower(),
        "train.optimizer": row["optimizer"],
        "train.max_steps": steps,
        "train.save_steps": 1000,
        "train.logging_steps": 1,
    }
    if row["method"] != "full":
        sets.update({"lora.r": row["lora_r"], "lora.alpha": 2 * row["lora_r"], "lora.target_modules": TARGETS[row["targets"]]})
    if row.get("attn", "sdpa") != "sdpa":  # sdpa rows keep the command they always had
        sets["model.attn_implementation"] = row["attn"]
    if row.get("loss", "plain") == "fused":
        sets["kernels.fused_loss"] = "true"
    if row.get("dropout") is not None:
        sets["lora.dropout"] = row["dropout"]
    if row.get("liger"):
        sets["kernels.liger_ops"] = "true"
    if row["method"] != "full":
        # The matrices calibrate PEFT's layers: every row recorded so far ran before
        # kernels.fused_lora existed, and its backward keeps less (memory.down_input_grad_copies).
        sets["kernels.fused_lora"] = str(bool(row.get("fused_lora", KERNELS_BEFORE["fused_lora"]))).lower()
    # Every row so far made liger's SwiGLU product in its recomputations (memory.lean_mlp_skips_product).
    sets["kernels.lean_mlp"] = str(bool(row.get("lean_mlp", KERNELS_BEFORE["lean_mlp"]))).lower()
    out: list[str] = []
    for k, v in sets.items():
        out += ["--set", f"{k}={v}"]
    return out


def config_for(row: dict):
    """The RunConfig a row's `vramfit train` resolves (the 24gb preset + its --set flags)."""
    sys.path.insert(0, str(ROOT / "src"))
    from vramfit.presets import load_preset, parse_set, resolve

    sets = set_args(row, 4)[1::2]
    return resolve([("24gb", load_preset("24gb").values), ("--set", parse_set(sets))]).config


def config_from_command(command: str):
    """The RunConfig a recorded `vramfit train` command line planned: its preset, --gpus,
    --budget and --set flags, layered as the CLI layers them. Only for commands with a
    fixed preset (``--preset auto`` chose its plan from the hardware)."""
    sys.path.insert(0, str(ROOT / "src"))
    from vramfit.presets import load_preset, parse_set, resolve

    argv = shlex.split(command)
    preset, sets, flags = None, [], {}
    for i, a in enumerate(argv):
        if a == "--preset":
            preset = argv[i + 1]
        elif a == "--set":
            sets.append(argv[i + 1])
        elif a == "--gpus":
            flags.setdefault("launch", {})["gpus"] = int(argv[i + 1])
        elif a == "--budget":
            flags["budget_gib"] = float(argv[i + 1])
    if preset in (None, "auto"):
        raise ValueError(f"no fixed preset in {command!r}")
    return resolve([(preset, load_preset(preset).values), ("flag", flags), ("--set", parse_set(sets))]).config


def model_of(command: str) -> str:
    """The --model of a recorded command line."""
    argv = shlex.split(command)
    return argv[argv.index("--model") + 1]


def matrix_runs(raw: Path, measured: str = "peak_process_gib"):
    """(row, config, shape) of every run in a results file this script wrote that trained
    and recorded ``measured`` in its metrics; the model is its scripts/archs/ architecture."""
    from vramfit.model_shape import shape_from_config

    for line in raw.read_text().splitlines():
        r = json.loads(line)
        if r["exit"] != 0 or not r["metrics"].get(measured):
            continue
        yield r, config_for(r), shape_from_config(arch_config(r))


def predict(row: dict, model: Path):
    """The memory model's breakdown for a row, as `vramfit train` plans it (no dataset
    lengths: every example is longer than the sequence). ``model``: a model directory or
    its config.json."""
    from vramfit.memory import estimate
    from vramfit.model_shape import load_shape

    cfg = config_for(row)
    # Every example of the calibration dataset is longer than the sequence: no padding.
    return estimate(load_shape(str(model)), cfg, "bfloat16", "cuda", shortest=cfg.data.seq_len)


def gpu_total_gib() -> float:
    import torch

    return torch.cuda.get_device_properties(0).total_memory / 2**30


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--matrix", type=Path, default=ROOT / "scripts/calibration_matrix.yaml")
    ap.add_argument("--only", action="append", default=[], help="arch names to run (default: all)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/vramfit-calibration"))
    ap.add_argument("--results", type=Path, required=True)
    ap.add_argument("--parallel", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--headroom", type=float, default=0.3, help="cap = prediction * (1 + headroom) + 2 GiB")
    a = ap.parse_args()

    rows = read_matrix(a.matrix)
    if a.only:
        rows = [r for r in rows if r["arch"] in a.only]
    a.work.mkdir(parents=True, exist_ok=True)
    a.results.mkdir(parents=True, exist_ok=True)
    out_file = a.results / "calibration.jsonl"
    log_all = (a.results / "calibration.log").open("a")
    py = sys.executable

    def say(msg: str) -> None:
        print(msg, flush=True)
        log_all.write(msg + "\n")
        log_all.flush()

    # Inputs: one random-weight model per architecture (built on the GPU), one dataset
    # whose every example is longer than the longest sequence measured.
    data = a.work / "long.jsonl"
    if not data.exists():
        subprocess.run(
            [py, str(ROOT / "scripts/make_embedded_dataset.py"), "--n", "80", "--min-chars", "17000", "--out", str(data)],
            check=True,
        )
    models = {}
    for row in rows:
        arch = arch_name(row)
        if arch in models:
            continue
        models[arch] = a.work / arch
        if (models[arch] / "config.json").is_file():
            continue  # built by an earlier matrix in this --work
        say(f"building {arch}")
        t = time.perf_counter()
        spec = a.work / f"{arch}.json"
        spec.write_text(json.dumps(arch_config(row)))
        subprocess.run(
            [py, str(ROOT / "scripts/make_random_model.py"), str(spec), str(models[arch]), "--device", "cuda"], check=True,
        )  # fmt: skip
        say(f"model {arch}: {time.perf_counter() - t:.0f} s")

    total = gpu_total_gib()
    pool = total - 3.0  # what the caps may add up to
    turn = a.work / "gpu.turn"
    env = {**os.environ, "VRAMFIT_GPU_TURN": str(turn), "PYTHONUNBUFFERED": "1"}
    ver, gpu = versions(), __import__("torch").cuda.get_device_name(0)

    jobs: list[Job] = []
    for i, row in enumerate(rows):
        base = ["--preset", "24gb", "--model", str(models[arch_name(row)]), "--data", str(data), *set_args(row, a.steps)]
        # The memory model in this process (a `vramfit plan` subprocess per row took ~15 s
        # on the GPU machine): the same config the run's `vramfit train` resolves.
        try:
            b = predict(row, models[arch_name(row)])
        except Exception as e:  # noqa: BLE001 - a row the model cannot plan is reported, not fatal
            say(f"row {i} {row}: plan failed: {e}")
            continue
        job = Job(row={**row, "index": i}, argv=base, predicted=round(b.peak_gib, 3))
        job.row["predicted_at_run"] = {"peak_gib": job.predicted, "breakdown": {k: round(v, 3) for k, v in b.gib().items()}}
        job.cap = min(round(job.predicted * (1 + a.headroom) + 2.0, 1), total - 1.0)
        jobs.append(job)

    pending, running = list(jobs), []
    with out_file.open("a") as results:
        while pending or running:
            # Start what fits beside what runs (the largest caps first, so they don't starve).
            pending.sort(key=lambda j: -j.cap)
            for job in list(pending):
                if len(running) >= a.parallel or sum(j.cap for j in running) + job.cap > pool:
                    continue
                pending.remove(job)
                job.run_dir = a.work / f"run-{job.row['index']}-{job.tries}"
                shutil.rmtree(job.run_dir, ignore_errors=True)
                job.log = a.work / f"run-{job.row['index']}-{job.tries}.log"
                cmd = [py, "-m", "vramfit", "train", "--budget", f"{job.cap:g}", "--out", str(job.run_dir), *job.argv]
                job.row["command"] = "vramfit " + shlex.join(cmd[3:])
                job.proc = subprocess.Popen(cmd, stdout=job.log.open("w"), stderr=subprocess.STDOUT, env=env)
                job.started = time.perf_counter()
                job.row["concurrent_runs"] = len(running)
                running.append(job)
                say(f"start row {job.row['index']} cap {job.cap:g} GiB (pred {job.predicted:.2f}): {job.row['command']}")
            time.sleep(1)
            for job in list(running):
                if job.proc.poll() is None:
                    continue
                running.remove(job)
                rc = job.proc.returncode
                tail = job.log.read_text(errors="replace").strip().splitlines()[-3:]
                metrics_file = job.run_dir / "metrics.json"
                m = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
                if rc == 5 and job.tries == 0:
                    # OOM under the cap: the prediction was far too low. Measure it again with room.
                    job.tries += 1
                    job.cap = min(round(job.predicted * 2 + 4, 1), total - 1.0)
                    say(f"row {job.row['index']} OOM under its cap; retrying at {job.cap:g} GiB")
                    pending.append(job)
                    shutil.rmtree(job.run_dir, ignore_errors=True)
                    continue
                rec = {
                    **job.row,
                    "exit": rc,
                    "cap_gib": job.cap,
                    "wall_s": round(time.perf_counter() - job.started, 1),
                    "gpu": gpu,
                    "versions": ver,
                    "date": time.strftime("%Y-%m-%d"),
                    "metrics": {k: v for k, v in m.items() if k not in ("data", "output")},
                    "tail": tail if rc else [],
                }
                results.write(json.dumps(rec) + "\n")
                results.flush()
                say(
                    f"done row {job.row['index']} exit {rc}: predicted {job.predicted:.2f}, reserved "
                    f"{m.get('peak_reserved_gib')}, process {m.get('peak_process_gib')}, {m.get('steady_tokens_per_s')} tok/s"
                    + (f" | {' / '.join(tail)}" if rc else "")
                )
                shutil.rmtree(job.run_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The vramfit command line: parse, call one core function, print.

Heavy modules (torch, transformers, pydantic models) are imported inside the
commands that need them, so `vramfit --help` stays fast. Every VramfitError
becomes one line on stderr and an exit code here, and nowhere else.
"""

from __future__ import annotations

import functools
import json
import os
import re
import sys
import traceback
from pathlib import Path
from typing import Optional

import typer

from .errors import UsageError, VramfitError

app = typer.Typer(
    help="Fine-tune language models on whatever GPU you have: detect, plan, train, merge.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
presets_app = typer.Typer(help="List presets, or show one resolved.", invoke_without_command=True)
app.add_typer(presets_app, name="presets")


def handled(fn):
    """Turn failures into one line + exit code; VRAMFIT_DEBUG=1 shows the traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except VramfitError as e:
            if os.environ.get("VRAMFIT_DEBUG"):
                traceback.print_exc()
            if e.message:  # a Reported error's line is already out
                typer.echo(f"error: {e.one_line()}", err=True)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None
        except BrokenPipeError:
            # `vramfit plan | head`: the reader left; say nothing more, like other Unix tools.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise typer.Exit(141) from None
        except Exception as e:  # a bug, not bad input: still one line unless debugging
            if os.environ.get("VRAMFIT_DEBUG"):
                traceback.print_exc()
            msg = " ".join(str(e).split())[:300]
            typer.echo(f"error: internal error: {type(e).__name__}: {msg} (hint: rerun with VRAMFIT_DEBUG=1 and report it)", err=True)
            raise typer.Exit(1) from None

    return wrapper


# ------------------------------------------------------------------ detect


@app.command()
@handled
def detect(as_json: bool = typer.Option(False, "--json", help="Print the facts as JSON.")) -> None:
    """Show the GPUs (NVML), host RAM and CPUs, and the preset vramfit recommends."""
    from .hardware import detect as probe
    from .hardware import recommend_preset
    from .presets import list_presets

    facts = probe()
    preset, reason = recommend_preset(facts, {p.name: p.card_gib for p in list_presets()})
    if as_json:
        typer.echo(json.dumps({**facts.to_dict(), "recommended_preset": preset, "reason": reason}, indent=2))
        return
    if not facts.has_gpu:
        typer.echo(f"GPU: none ({facts.nvml_error})")
    for g in facts.gpus:
        typer.echo(
            f"GPU {g.index}: {g.name}  {g.total_gib:.1f} GiB total, {g.free_gib:.1f} GiB free, "
            f"compute {g.compute_capability[0]}.{g.compute_capability[1]}, bf16 {'yes' if g.bf16 else 'no'}"
        )
        for p in g.processes:
            used = f"{p.used_bytes / 2**30:.2f} GiB" if p.used_bytes is not None else "? GiB"
            typer.echo(f"  process {p.pid} {p.name or ''} holds {used}")
    if facts.has_gpu:
        typer.echo(f"driver {facts.driver_version}, CUDA {facts.cuda_version}")
    typer.echo(f"host: {facts.host_ram_bytes / 2**30:.1f} GiB RAM, {facts.cpu_count} CPUs")
    typer.echo(f"recommended preset: {preset} ({reason})")


# ------------------------------------------------------------------ presets


@presets_app.callback()
@handled
def presets_list(ctx: typer.Context) -> None:
    """List the presets."""
    if ctx.invoked_subcommand:
        return
    from .presets import list_presets

    for p in list_presets():
        card = f"{p.card_gib:g} GB" if p.card_gib else "-"
        typer.echo(f"{p.name:<14} {card:>6}  {p.summary}")
    typer.echo("\nvramfit presets show NAME   prints one, resolved over the defaults")


@presets_app.command("show")
@handled
def presets_show(name: str) -> None:
    """Print one preset resolved over the defaults, as YAML you can pass to --config."""
    import yaml

    from .presets import load_preset, resolve

    p = load_preset(name)
    header = [line for line in p.path.read_text(encoding="utf-8").splitlines() if line.startswith("#")]
    typer.echo("\n".join(header))
    typer.echo(yaml.safe_dump(resolve([(p.name, p.values)]).config.model_dump(mode="json"), sort_keys=False))


# ------------------------------------------------------------------ plan / train

ModelOpt = typer.Option(None, "--model", "-m", help="Model dir or hub id (default: the embedded tiny model).")
PresetOpt = typer.Option(
    None, "--preset", "-p", help="Preset name, or 'auto': fit the fastest plan to the budget (default: the detected card's preset, cpu without a GPU)."
)
PriceOpt = typer.Option(None, "--gpu-hour-price", help="Price of one GPU-hour: the plan also predicts the run's cost.")
DataOpt = typer.Option(None, "--data", "-d", help="Dataset: jsonl/json/csv/parquet or hub id (default: shipped demo set).")
# No click range check here: its error is a usage panel, not vramfit's one line (_make_plan checks).
BudgetOpt = typer.Option(None, "--budget", help="GPU memory cap in GiB per process, CUDA context included.")
OutOpt = typer.Option(None, "--out", "-o", help="Run directory (default: runs/<model>-<preset>).")
ConfigOpt = typer.Option(None, "--config", "-c", help="YAML file layered over the preset.")
SetOpt = typer.Option(None, "--set", "-s", help="Override one key, e.g. --set lora.r=8 (repeatable).")
TrustOpt = typer.Option(
    False, "--trust-remote-code", help="Allow the model's own Python code from the hub to run (off by default)."
)
# Launch flags -> launch.* keys (layered as "flag", like --budget). Taken as text and
# checked by _launch_overrides, so a bad value is vramfit's one error line, not click's panel.
GpusOpt = typer.Option(None, "--gpus", metavar="N", help="Training processes (GPUs) per node (launch.gpus).")
NodesOpt = typer.Option(None, "--nodes", metavar="N", help="Number of machines (launch.nodes).")
NodeRankOpt = typer.Option(
    None, "--node-rank", metavar="R", help="This machine's rank, 0 to nodes-1 (launch.node_rank; NODE_RANK overrides it in launch.sh)."
)
MasterAddrOpt = typer.Option(None, "--master-addr", metavar="HOST", help="Node 0's address as every node reaches it (launch.master_addr).")
MasterPortOpt = typer.Option(None, "--master-port", metavar="P", help="Rendezvous port on node 0 (launch.master_port).")


def _int_flag(name: str, raw: str | None, low: int, example: int, high: int | None = None) -> int | None:
    if raw is None:
        return None
    try:
        value = int(raw.strip())
    except ValueError:
        value = None
    if value is None or value < low or (high is not None and value > high):
        span = f"from {low} to {high}" if high is not None else f"{low} or more"
        raise UsageError(f"{name} must be a whole number {span}, got {raw!r}", f"e.g. {name} {example}")
    return value


def _launch_overrides(gpus, nodes, node_rank, master_addr, master_port) -> dict:
    """The launch flags as a launch.* override layer; bad values are one-line UsageErrors.
    node_rank < nodes is checked by the config once every layer is merged."""
    out = {
        "gpus": _int_flag("--gpus", gpus, 1, 2),
        "nodes": _int_flag("--nodes", nodes, 1, 2),
        "node_rank": _int_flag("--node-rank", node_rank, 0, 0),
        "master_port": _int_flag("--master-port", master_port, 1, 29500, high=65535),
    }
    if master_addr is not None:
        if not master_addr.strip() or any(c.isspace() for c in master_addr):
            raise UsageError(f"--master-addr must be a host name or IP address, got {master_addr!r}", "e.g. --master-addr 10.0.0.1")
        out["master_addr"] = master_addr
    return {k: v for k, v in out.items() if v is not None}


def _make_plan(
    model, preset, data, budget, config_file, set_items, trust_remote_code=False, price=None, launch=None, elsewhere=False
):
    """The plan for these flags. ``elsewhere`` (`vramfit plan`): without a GPU here,
    `--preset auto --budget B` plans for a GPU of B GiB, to train where there is one."""
    if budget is not None and not budget > 0:
        raise UsageError(f"--budget must be a positive number of GiB, got {budget:g}", "e.g. --budget 8 for an 8 GB card")
    if price is not None and not price >= 0:
        raise UsageError(f"--gpu-hour-price must be zero or more, got {price:g}", "e.g. --gpu-hour-price 2.49")
    from .hardware import detect as probe
    from .hardware import recommend_preset
    from .model_shape import load_shape
    from .plan import build_plan, resolve_dtype
    from .presets import list_presets, resolve_layers

    facts = probe()
    auto = preset == "auto"
    for_card = elsewhere and auto and budget is not None and not facts.has_gpu
    if for_card:
        # Plan before renting: a made-up card of the budget's size (its speed as an unknown
        # GPU's, host RAM 64 GiB), never trained here (train refuses a GPU plan without one).
        from .hardware import fake_facts

        facts = fake_facts(budget, count=int((launch or {}).get("gpus", 1)), name="a GPU of --budget")
    if preset is None:
        # No preset named: the card preset for the detected GPU (or --budget).
        cards = {p.name: p.card_gib for p in list_presets()}
        if budget is not None and facts.has_gpu:
            from .hardware import fake_facts

            preset, _ = recommend_preset(fake_facts(budget, free_gib=budget), cards)
        else:
            preset, _ = recommend_preset(facts, cards)
    overrides: dict = {}
    if model is not None:
        overrides["model"] = {"name": model}
    if data is not None:
        overrides["data"] = {"path": data}
    if budget is not None:
        overrides["budget_gib"] = budget
    if trust_remote_code:
        overrides.setdefault("model", {})["trust_remote_code"] = True
    if launch:
        overrides["launch"] = dict(launch)
    if auto and not facts.has_gpu:
        from .errors import FitError

        raise FitError(
            "--preset auto fits a plan to a GPU's memory, and no NVIDIA GPU was found",
            "use --preset cpu here, or `vramfit plan --preset auto --budget GIB` to plan for a card you will train on",
        )
    resolved = resolve_layers(None if auto else preset, config_file, overrides, set_items)
    # --preset auto and the multi-gpu preset plan for every GPU of this machine, unless
    # --gpus (or a --set/--config) says otherwise.
    gpus_from = resolved.sources.get("launch.gpus", "default")
    multi = resolved.preset is not None and resolved.preset.name == "multi-gpu"
    if facts.gpu_count > 1 and ((auto and gpus_from == "default") or (multi and gpus_from.startswith("preset"))):
        resolved = resolve_layers(
            None if auto else preset, config_file, overrides, [f"launch.gpus={facts.gpu_count}", *(set_items or [])]
        )
    shape = load_shape(resolved.config.model.name)
    # Read the dataset now: a malformed file should fail before a run dir exists.
    import datasets

    from .data import load_records

    datasets.disable_progress_bars()  # the one-line error (or the plan) is the output
    d = resolved.config.data
    records, fmt = load_records(d.path, d.format, d.max_examples)
    lengths = _length_stats(resolved.config, records) if facts.has_gpu else None
    config, sources, choices = resolved.config, resolved.sources, []
    if auto:
        from .fit import auto_fit

        pinned = {k for k, src in sources.items() if src != "default"}
        fit_budget = config.budget_gib or facts.min_total_gib
        dtype = resolve_dtype(config.model.dtype, facts)
        from .kernels import liger_installed

        fitted, choices = auto_fit(
            config, pinned, shape, fit_budget, facts.gpus[0].name, lengths, dtype, facts.host_ram_bytes, liger_installed()
        )
        from .presets import flatten

        before, after = flatten(config.model_dump(mode="json")), flatten(fitted.model_dump(mode="json"))
        sources = {**sources, **{k: "auto" for k in after if after[k] != before.get(k)}}
        config = fitted
    plan = build_plan(config, shape, facts, sources, "auto" if auto else preset, lengths, len(records), price)
    plan.choices = choices
    plan.notes.append(f"data: {d.path or 'shipped demo set'} ({fmt})")
    if for_card:
        plan.notes.append(
            f"planned for a GPU of {budget:g} GiB: this machine has none (host RAM taken as 64 GiB, speed as an unknown "
            "GPU's); copy the run directory to one and start it there with `vramfit train --resume --out RUN_DIR`"
        )
    return plan


# Length statistics come from at most this many records, evenly spaced: enough for
# the percentiles auto-fit and the speed model use, quick on any dataset.
LENGTH_SAMPLE = 2000


def _length_stats(config, records):
    from .data import tokenize_records
    from .embedded import EMBEDDED_MODEL
    from .model_source import load_tokenizer
    from .speed import LengthStats

    step = max(1, len(records) // LENGTH_SAMPLE)
    sample = records[::step][:LENGTH_SAMPLE]
    tokenizer = load_tokenizer(config.model.name or EMBEDDED_MODEL, config.model.trust_remote_code)
    examples, _ = tokenize_records(sample, tokenizer, 10**9, config.data.chat_template)
    return LengthStats(tuple(len(e["input_ids"]) for e in examples))


def _log_size(run_dir: Path) -> int:
    from .render import TRAIN_LOG

    log = run_dir / TRAIN_LOG
    return log.stat().st_size if log.is_file() else 0


def _logged(run_dir: Path, since: int, mark: str) -> bool:
    """Whether the trainer wrote ``mark`` (render.CRASH_MARK, render.BAD_INPUT_MARK) in what
    it wrote to its log after ``since`` bytes: an earlier attempt's further up is not this one."""
    from .render import TRAIN_LOG

    log = run_dir / TRAIN_LOG
    if not log.is_file():
        return False
    with log.open("rb") as f:
        f.seek(since)
        return mark.encode() in f.read()


def _default_out(plan) -> Path:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(plan.model_ref.replace("embedded:", "")).name).strip("-") or "model"
    return Path("runs") / f"{slug}-{plan.preset or 'custom'}"


def _ckpt_words(c, layers: int) -> str:
    if not c.train.grad_ckpt:
        return "off"
    n = c.train.grad_ckpt_layers
    return "on" if n is None or n >= layers else f"on for the first {n} of {layers} layers"


def _print_plan(plan, verbose: bool) -> None:
    c = plan.config
    gpus = f"{c.world_size} GPU{'s' if c.world_size > 1 else ''}" if plan.device == "cuda" else "CPU"
    typer.echo(
        f"plan: {plan.model_ref} | {c.method} | preset {plan.preset or '-'} | {gpus} {plan.dtype} | "
        f"{plan.breakdown.trainable_params:,} trainable of {plan.shape.total_params:,} params"
    )
    typer.echo(
        f"  seq {c.data.seq_len}, micro-batch {c.train.micro_batch} x accumulation {c.train.grad_accum}"
        f" = {c.train.micro_batch * c.train.grad_accum * c.world_size} {'packed rows' if c.data.packing else 'sequences'}/step,"
        f" checkpointing {_ckpt_words(c, plan.shape.layers)}, optimizer {c.train.optimizer}"
        + (f", ZeRO-{c.deepspeed.stage}" if c.deepspeed.stage else "")
    )
    for line in plan.choices:
        typer.echo(f"  auto: {line}")
    where = "GPU memory per process" if plan.device == "cuda" else "memory (CPU run, host RAM)"
    typer.echo(f"  predicted {where}, at its peak ({plan.breakdown.phase}; model calibrated on GPUs, docs/memory-model.md):")
    for part, gib in plan.breakdown.gib().items():
        typer.echo(f"    {part:<16} {gib:7.2f} GiB")
    verdict = ""
    if plan.budget_gib is not None:
        verdict = f" of {plan.budget_gib:g} GiB ({plan.budget_source}): {'fits' if plan.fits else 'DOES NOT FIT'}"
    elif plan.device == "cpu":
        verdict = " (CPU run: no GPU budget)"
    typer.echo(f"    {'predicted peak':<16} {plan.breakdown.peak_gib:7.2f} GiB{verdict}")
    if plan.speed is not None:
        line = f"  predicted speed {plan.speed.tokens_per_s:,.0f} tokens/s"
        if plan.wall_s is not None:
            line += f"; {plan.steps:,} steps in {_duration(plan.wall_s)}"
        if plan.cost is not None:
            line += f", about {plan.cost:,.2f} at {plan.gpu_hour_price:g}/GPU-hour"
        typer.echo(line)
    for note in plan.notes:
        typer.echo(f"  note: {note}")
    if verbose:
        typer.echo("  settings (where each value came from):")
        from .presets import flatten

        flat = flatten(c.model_dump(mode="json"))
        for key, value in flat.items():
            typer.echo(f"    {key} = {json.dumps(value)}  [{plan.sources.get(key, 'default')}]")


def _duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


@app.command()
@handled
def plan(
    model: Optional[str] = ModelOpt,
    preset: Optional[str] = PresetOpt,
    data: Optional[str] = DataOpt,
    budget: Optional[float] = BudgetOpt,
    out: Optional[Path] = OutOpt,
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
    trust_remote_code: bool = TrustOpt,
    price: Optional[float] = PriceOpt,
    gpus: Optional[str] = GpusOpt,
    nodes: Optional[str] = NodesOpt,
    node_rank: Optional[str] = NodeRankOpt,
    master_addr: Optional[str] = MasterAddrOpt,
    master_port: Optional[str] = MasterPortOpt,
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
) -> None:
    """Predict memory, write the run directory (configs + launch.sh); train nothing."""
    from .plan import require_fit
    from .render import write_run_dir

    launch = _launch_overrides(gpus, nodes, node_rank, master_addr, master_port)
    p = _make_plan(model, preset, data, budget, config, set_, trust_remote_code, price, launch, elsewhere=True)
    require_fit(p)
    run_dir = write_run_dir(p, out or _default_out(p))
    if as_json:
        typer.echo(json.dumps({**p.summary(), "run_dir": str(run_dir)}, indent=2))
        return
    _print_plan(p, verbose=True)
    typer.echo(f"run directory: {run_dir}\nstart it with: vramfit train --resume --out {run_dir}   (or: bash {run_dir}/launch.sh)")


@app.command()
@handled
def train(
    model: Optional[str] = ModelOpt,
    preset: Optional[str] = PresetOpt,
    data: Optional[str] = DataOpt,
    budget: Optional[float] = BudgetOpt,
    out: Optional[Path] = OutOpt,
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
    trust_remote_code: bool = TrustOpt,
    price: Optional[float] = PriceOpt,
    dry_run: bool = typer.Option(False, "--dry-run", help="Plan and write the run directory only."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last checkpoint."),
    probe: bool = typer.Option(
        False, "--probe", help="Train a few steps on the longest examples under the budget, report measured vs predicted, keep nothing."
    ),
    probe_steps: int = typer.Option(4, "--probe-steps", help="Optimizer steps --probe trains."),
    gpus: Optional[str] = GpusOpt,
    nodes: Optional[str] = NodesOpt,
    node_rank: Optional[str] = NodeRankOpt,
    master_addr: Optional[str] = MasterAddrOpt,
    master_port: Optional[str] = MasterPortOpt,
) -> None:
    """Plan, write the run directory, and train."""
    from .launch import execute
    from .plan import require_fit
    from .render import (
        BAD_INPUT_MARK, CHECKPOINTS, CRASH_MARK, METRICS, PLAN_FILE, TRAIN_LOG, plan_differences, read_plan, write_run_dir,
    )

    launch = _launch_overrides(gpus, nodes, node_rank, master_addr, master_port)
    created = False  # whether this command wrote the run directory
    if resume:
        if out is None:
            raise UsageError("--resume needs --out RUN_DIR", "pass the run directory to continue")
        doc = read_plan(out)  # validates it is a run dir
        ignored = set(launch) - {"node_rank"}  # the rank names this machine, not the run: it still applies
        if any(x is not None for x in (model, preset, data, budget, config, price)) or set_ or trust_remote_code or ignored:
            typer.echo("note: --resume continues the run as planned; other options are ignored", err=True)
        run_dir = out.expanduser().resolve()
        if doc.get("device") == "cuda":
            from .hardware import detect as probe

            if not probe().has_gpu:  # a plan made for a card (`vramfit plan --budget`), not trainable here
                raise UsageError(
                    f"{run_dir} was planned for a GPU, and this machine has none",
                    "train it on a machine with an NVIDIA GPU: copy the run directory there and run the same command",
                )
        node_env = {}
        if "node_rank" in launch:
            planned_nodes = int(doc["config"].get("launch", {}).get("nodes", 1))
            if launch["node_rank"] >= planned_nodes:
                raise UsageError(
                    f"--node-rank {launch['node_rank']} must be below the run's launch.nodes {planned_nodes}",
                    f"pass a rank from 0 to {planned_nodes - 1}",
                )
            node_env = {"NODE_RANK": str(launch["node_rank"])}
    else:
        p = _make_plan(model, preset, data, budget, config, set_, trust_remote_code, price, launch)
        node_env = _node_rank_env(p)
        require_fit(p)
        target = (out or _default_out(p)).expanduser().resolve()
        if probe:
            _probe(p, target, probe_steps)
            return
        if (target / PLAN_FILE).is_file():
            # The same command again continues the run (a preempted machine's script
            # just reruns itself); a different plan never overwrites it.
            diffs = plan_differences(read_plan(target), p)
            from .oom import oom_events

            if oom_events(target):  # the batch split an OOM recovery changed is still this run
                diffs = [d for d in diffs if d not in ("train.micro_batch", "train.grad_accum")]
            if diffs:
                raise UsageError(
                    f"{target} holds a different run (differs in {', '.join(diffs[:4])})",
                    "pass --out NEW_DIR for a new run, or --resume to continue that one as planned",
                )
            typer.echo(f"{target} holds this same run: continuing it from its last checkpoint")
            resume, run_dir = True, target
        else:
            run_dir = write_run_dir(p, target)
            created = True
        _print_plan(p, verbose=False)
        typer.echo(f"run directory: {run_dir}")
        if dry_run:
            typer.echo(f"dry run: nothing trained. Start it with: bash {run_dir}/launch.sh")
            return
    log_start = _log_size(run_dir)
    code = execute(run_dir / "launch.sh", ["--resume"] if resume else [], env=node_env)
    from .errors import Preempted, RunLocked
    from .oom import OOM_EXIT, adjust_after_oom, oom_cause

    while code == OOM_EXIT:
        # Half the micro-batch, twice the accumulation, from the last checkpoint (bounded retries).
        e = adjust_after_oom(run_dir)
        _, off = oom_cause(e.get("predicted_peak_gib"), e.get("needed_at_least_gib"))
        typer.echo(
            f"out of memory at step {e['step']}{off}: resuming from the last checkpoint with micro-batch "
            f"{e['micro_batch'][1]} x accumulation {e['grad_accum'][1]} (recorded in {run_dir / 'events.jsonl'})",
            err=True,
        )
        code = execute(run_dir / "launch.sh", ["--resume"], env=node_env)

    if code == UsageError.exit_code and _logged(run_dir, log_start, BAD_INPUT_MARK):
        # The trainer found bad input (the tokenizer, the data as tokenized) and said so on its
        # own error line, with its hint: pass its exit code on, without a second line. A run
        # directory this command wrote for a run that never saved a step is taken back, as if
        # the plan had found the problem.
        if created and not any((run_dir / CHECKPOINTS).glob("checkpoint-*")):
            import shutil

            shutil.rmtree(run_dir, ignore_errors=True)
        from .errors import Reported

        raise Reported(code)
    # A launcher of several ranks exits 1 when its ranks exit 75: the trainer's note says why.
    if code == Preempted.exit_code or (code != 0 and (run_dir / "preempted.json").is_file()):
        saved = any((run_dir / "checkpoints").glob("checkpoint-*"))
        raise Preempted(
            f"training was stopped by a signal; {'the last checkpoint in ' + str(run_dir) + ' is kept' if saved else 'no step had finished, nothing to keep'}",
            "rerun the same command (or `vramfit train --resume --out RUN_DIR`) to continue",
        )
    if code == RunLocked.exit_code:
        raise RunLocked(f"{run_dir} is in use by another training process", "wait for it to finish")
    if code != 0:
        from .errors import TrainingFailed

        where = f", whose traceback is also in {run_dir / TRAIN_LOG}" if _logged(run_dir, log_start, CRASH_MARK) else ""
        raise TrainingFailed(
            f"training exited with code {code}; the run directory {run_dir} is kept",
            f"fix the cause above{where}, then `vramfit train --resume --out {run_dir}` continues from the last checkpoint",
        )
    metrics = run_dir / METRICS
    if metrics.is_file():
        m = json.loads(metrics.read_text())
        final = m.get("final_loss")
        if final is None and m.get("nonfinite_losses"):
            final = "nan"  # metrics.json holds null: JSON has no NaN
        typer.echo(
            f"done: {m.get('steps')} steps, loss {m.get('first_loss')} -> {final}, "
            f"{m.get('tokens_per_s', 0):,.0f} tokens/s"
        )
        if m.get("nonfinite_losses"):
            typer.echo(
                f"warning: {m['nonfinite_losses']} logged steps had a loss of nan or inf: the run diverged "
                f"(see {run_dir / TRAIN_LOG}); lower train.lr or check the data, and train again",
                err=True,
            )
        _report_prediction(m)
    typer.echo(f"next: vramfit merge {run_dir}")


def _node_rank_env(plan) -> dict[str, str]:
    """NODE_RANK for launch.sh, which reads ${NODE_RANK:-rank in plan.yaml}. Every node may run
    the same command into one shared run directory (plan_differences ignores the rank), so
    the rank this command planned must reach launch.sh: an explicit --node-rank (or --set)
    wins over an exported NODE_RANK, which wins over a rank from a preset, file or default."""
    explicit = plan.sources.get("launch.node_rank") in ("flag", "--set")
    if explicit or "NODE_RANK" not in os.environ:
        return {"NODE_RANK": str(plan.config.launch.node_rank)}
    return {}


def _probe(plan, target: Path, steps: int) -> None:
    """Train ``steps`` optimizer steps of ``plan`` in a scratch run directory beside
    ``target``, longest examples first (so the few steps meet the plan's peak), then
    report measured against predicted and delete the scratch directory."""
    import dataclasses
    import shutil
    import tempfile

    from .errors import FitError
    from .launch import execute
    from .oom import OOM_EXIT
    from .render import METRICS, write_run_dir
    from .speed import estimate_speed

    if steps < 1:
        raise UsageError(f"--probe-steps must be at least 1, got {steps}", "e.g. --probe-steps 4")
    c = plan.config
    cfg = c.model_copy(update={"train": c.train.model_copy(update={"max_steps": steps, "save_steps": steps + 10**6})})
    probe_plan = dataclasses.replace(plan, config=cfg)
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".vramfit-probe-", dir=target.parent))
    try:
        run_dir = write_run_dir(probe_plan, scratch / "run")
        _print_plan(plan, verbose=False)
        typer.echo(f"probe: {steps} steps on the longest examples under the plan's budget (nothing is kept)")
        code = execute(run_dir / "launch.sh", [], env={"VRAMFIT_LONGEST_FIRST": "1"})
        m = json.loads((run_dir / METRICS).read_text()) if (run_dir / METRICS).is_file() else {}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if code == OOM_EXIT:
        raise FitError(
            f"the probe ran out of memory under {plan.budget_gib:g} GiB (predicted {plan.breakdown.peak_gib:.2f} GiB)",
            "lower train.micro_batch or data.seq_len, or raise --budget; the memory model missed this plan",
        )
    if code != 0:
        from .errors import TrainingFailed

        raise TrainingFailed(f"the probe's training exited with code {code}", "see the error above")
    # The probe's batches are the longest examples: compare with full-length batches.
    longest = min(c.data.seq_len, plan.lengths.longest) if plan.lengths and not c.data.packing else c.data.seq_len
    full = cfg.model_copy(update={"data": cfg.data.model_copy(update={"seq_len": longest})})
    rate = estimate_speed(plan.shape, full, None, plan.hardware.gpus[0].name).tokens_per_s if plan.device == "cuda" else None
    _report_prediction({**m, "predicted_tokens_per_s": rate}, prefix="probe: ")
    peak = m.get("peak_process_gib")
    if peak and plan.budget_gib and peak > plan.budget_gib:
        raise FitError(f"the probe's peak {peak:.2f} GiB is over the {plan.budget_gib:g} GiB budget", "lower train.micro_batch or data.seq_len")
    typer.echo(f"probe passed: start the run with the same command without --probe (run directory {target})")


def _report_prediction(m: dict, prefix: str = "prediction: ") -> None:
    """Predicted against measured, once a GPU run finishes."""
    pred_peak, peak = m.get("predicted_peak_gib"), m.get("peak_process_gib")
    pred_rate, rate = m.get("predicted_tokens_per_s"), m.get("steady_tokens_per_s")
    parts = []
    if pred_peak and peak:
        parts.append(f"peak {peak:.2f} GiB measured vs {pred_peak:.2f} predicted ({100 * (pred_peak - peak) / peak:+.1f}%)")
    if pred_rate and rate:
        parts.append(f"{rate:,.0f} tokens/s measured vs {pred_rate:,.0f} predicted ({100 * (pred_rate - rate) / rate:+.0f}%)")
    if parts:
        typer.echo(prefix + "; ".join(parts))


# ------------------------------------------------------------------ merge


@app.command()
@handled
def merge(
    run_dir: Path = typer.Argument(..., help="The run directory `vramfit train` wrote."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Where to write the merged model (default: RUN_DIR/merged)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output directory."),
) -> None:
    """Merge the trained adapter into its base model and verify the result."""
    from .merge import merge_run

    result = merge_run(run_dir, out, force=force)
    typer.echo(
        f"merged model: {result.out}\n  verified on {result.prompts} prompts: largest logit difference "
        f"{result.max_abs_diff:.3g} (tolerance {result.tolerance:.3g}; merged in fp32 on {result.device}, saved as {result.dtype})"
    )


def _click_errors() -> tuple[type, type, type | None]:
    """(UsageError, ClickException, NoArgsIsHelpError) of the click typer parses with: its own
    copy from typer 0.2x (typer._click), click itself before. Found from typer's public
    BadParameter, which derives from both."""
    mro = typer.BadParameter.__mro__
    usage = next(c for c in mro if c.__name__ == "UsageError")
    base = next(c for c in mro if c.__name__ == "ClickException")
    return usage, base, getattr(sys.modules[usage.__module__], "NoArgsIsHelpError", None)


def main(argv: list[str] | None = None) -> int:
    """The console script. Typer's own usage errors (an unknown option, a missing argument)
    are a framed box of several lines; here they are one line like every other error, exit 2."""
    usage, base, no_args = _click_errors()
    try:
        rv = app(args=argv, prog_name="vramfit", standalone_mode=False)
    except usage as e:
        if no_args is not None and isinstance(e, no_args):  # bare `vramfit`: its help, exit 2 as before
            e.show()
            return e.exit_code
        where = e.ctx.command_path if e.ctx else "vramfit"
        typer.echo(f"error: {' '.join(e.format_message().split())} (hint: `{where} -h` lists the options)", err=True)
        return 2
    except base as e:
        typer.echo(f"error: {' '.join(e.format_message().split())}", err=True)
        return e.exit_code
    except typer.Abort:  # Ctrl-C while typer itself parses
        typer.echo("interrupted", err=True)
        return 130
    return rv if isinstance(rv, int) else 0


if __name__ == "__main__":
    sys.exit(main())

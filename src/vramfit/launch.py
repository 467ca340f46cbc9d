"""The launch command as data: build (argv, env) with a pure function, run it in one place."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .config import RunConfig


@dataclass(frozen=True)
class Command:
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)

    def shell(self) -> str:
        return " ".join(shlex.quote(a) for a in self.argv)


SHUTDOWN_TIMEOUT_S = 600
LAUNCHER = "vramfit.launcher"


def needs_launcher(cfg: RunConfig) -> bool:
    """Several processes, or DeepSpeed (which wants a distributed environment even alone)."""
    return cfg.world_size > 1 or cfg.deepspeed.stage > 0


def build_command(cfg: RunConfig, run_dir: str = "$RUN_DIR", python: str = "$PYTHON") -> Command:
    """argv for one node. ``run_dir``/``python`` default to launch.sh's variables."""
    env = dict(cfg.launch.env)
    if not needs_launcher(cfg):
        return Command([python, "-m", "vramfit.train", run_dir], env)
    la = cfg.launch
    # A SIGTERM that reaches torch's elastic agent itself (a scheduler signalling every
    # process) is passed to the ranks, which are killed TORCH_ELASTIC_SHUTDOWN_TIMEOUT
    # later: 30 s by default, less than a large ZeRO checkpoint takes to write. Let the
    # scheduler's own deadline be the one that counts (torch 2.13 reads this; 2.11, on our GPU machine, does not, and
    # keeps 30 s: docs/reliability.md).
    env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(SHUTDOWN_TIMEOUT_S))
    # accelerate launch, through vramfit.launcher: a failed rank's exit code comes out as is
    # (2 bad input, 75 preempted), not as exit 1 under the elastic agent's traceback.
    argv = [
        python, "-m", LAUNCHER,
        "--num_processes", str(cfg.world_size),
        "--num_machines", str(la.nodes),
        "--machine_rank", "${NODE_RANK:-%d}" % la.node_rank if python == "$PYTHON" else str(la.node_rank),
        "--main_process_ip", la.master_addr,
        "--main_process_port", str(la.master_port),
        "--mixed_precision", "no",  # TrainingArguments (bf16/fp16) is the single source
        "--dynamo_backend", "no",
        "--module", "vramfit.train", run_dir,
    ]  # fmt: skip
    return Command(argv, env)


def cpu_threads_env(cfg: RunConfig, device: str) -> dict[str, str]:
    """OMP_NUM_THREADS=1 for a GPU run whose CPU does nothing but drive the GPU.

    Left unset, every training process starts one OpenMP thread per core. On an H200 host
    the Qwen2.5-0.5B plans, whose steps wait on the Python thread that launches the kernels,
    trained 6% (checkpointed) and 23% (not) faster with one thread, interleaved runs on one
    machine (docs/benchmarks/speed-checks/13-small-model-spread/); the likely cause, not
    confirmed, is OpenMP's idle threads spinning after the loop's small CPU-side operations
    and taking cycles from that thread. torchrun sets the same for several processes.

    Not set where the CPU computes for the run: on a CPU-only machine, DeepSpeed's CPU Adam
    (optimizer or parameters offloaded; OpenMP-parallel) and the input embeddings kept in
    host RAM (their lookups run on the CPU). A value in launch.env wins."""
    if device != "cuda" or "OMP_NUM_THREADS" in cfg.launch.env:
        return {}
    ds = cfg.deepspeed
    if ds.offload_optimizer or ds.offload_params or cfg.train.offload_embeddings:
        return {}
    return {"OMP_NUM_THREADS": "1"}


def launch_script(cfg: RunConfig, python: str | None = None, extra_env: dict[str, str] | None = None) -> str:
    """launch.sh: usable as-is from a cloud shell script; extra args go to the trainer."""
    cmd = build_command(cfg)
    cmd.env.update(extra_env or {})
    py = python or sys.executable
    lines = [
        "#!/usr/bin/env bash",
        "# Written by vramfit. Starts (or, with --resume, continues) this run.",
        "# Usable as-is from a shell script: exits non-zero when training fails.",
        "set -euo pipefail",
        'RUN_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"',
        f'PYTHON="${{PYTHON:-{py}}}"',
    ]
    if needs_launcher(cfg) and cfg.launch.nodes > 1:
        lines.append("# On node k of a multi-node run: NODE_RANK=k bash launch.sh")
    for k, v in sorted(cmd.env.items()):
        lines.append(f"export {k}={shlex.quote(v)}")
    if not needs_launcher(cfg):
        # One process, one GPU: the first visible. Shown several, the HF Trainer would
        # spread this process over all of them with DataParallel, which the plan does
        # not describe (and which breaks non-reentrant checkpointing's recompute).
        lines.append('export CUDA_VISIBLE_DEVICES="$(printf %s "${CUDA_VISIBLE_DEVICES:-0}" | cut -d, -f1)"')
    # Quote everything except our own shell variables, which must expand.
    parts = []
    for a in cmd.argv:
        if a in ("$PYTHON", "$RUN_DIR") or a.startswith("${NODE_RANK"):
            parts.append(f'"{a}"')
        else:
            parts.append(shlex.quote(a))
    lines.append("exec " + " ".join(parts) + ' "$@"')
    return "\n".join(lines) + "\n"


def child_pids(pid: int) -> list[int]:
    """The direct children of ``pid`` (Linux /proc; empty elsewhere or if it has none)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # "pid (comm) state ppid ...": comm may hold spaces, so split after its ")".
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return sorted(out)


def execute(script: Path, extra_args: list[str] | None = None, env: dict[str, str] | None = None) -> int:
    """Run launch.sh and wait; the trainer checkpoints on SIGTERM/SIGINT and exits 75.

    ``env`` is added to this process's environment (the CLI passes NODE_RANK).
    SIGTERM sent to this process alone (``kill PID``, a container's PID 1) is passed
    on to the trainer. SIGINT is not: Ctrl-C already reaches the whole foreground
    process group, and a second SIGINT tells the trainer to stop without saving.

    Under a launcher (accelerate launch: launch.sh exec's it, its children are the
    ranks) SIGTERM goes to the ranks themselves, not to the launcher: torch's elastic
    agent answers a SIGTERM by killing the ranks 30 s later (fixed in torch 2.11;
    TORCH_ELASTIC_SHUTDOWN_TIMEOUT from 2.13), which a large checkpoint save outlasts. The ranks save and exit 75,
    and the launcher then exits on its own.
    """
    text = Path(script).read_text()
    launcher = f"-m {LAUNCHER} " in text or "accelerate.commands.launch" in text  # (the latter: run dirs written before)
    proc = subprocess.Popen(["bash", str(script), *(extra_args or [])], env={**os.environ, **(env or {})})

    def forward(signum, _frame):
        if signum != signal.SIGTERM:
            return
        # Before the ranks exist (the launcher still starting), the launcher takes it.
        for pid in (child_pids(proc.pid) if launcher else []) or [proc.pid]:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return proc.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)

"""``python -m vramfit.launcher ARGS``: ``accelerate launch ARGS`` for launch.sh's runs of
several ranks, exiting with the ranks' own exit code instead of a traceback.

When a rank fails, torch's elastic agent stops the others and raises ChildFailedError, and
accelerate's launcher lets it end the process: every rank's failure table, a Python
traceback of the launcher itself, exit code 1, where a single process would have printed
one ``error:`` line and exited 2 (bad input) or 75 (preempted, checkpoint saved), and a
shell script could tell which. Here the first rank to fail gives the exit code. Bad input,
which every rank meets alike, is printed once, here, from the line the ranks logged in
train.log; any other failure gets one line naming the rank, under the ranks' own output.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

from .errors import Preempted, UsageError
from .render import BAD_INPUT_MARK, TRAIN_LOG


def exit_code(code: int) -> int:
    """A rank's exit code as a shell reports it: killed by signal N (negative in Python's
    returncode) is 128 + N."""
    return 128 - code if code < 0 else code


def first_failure(error) -> tuple[int, int]:
    """(rank, exit code) of the rank that failed first in a ChildFailedError: the root cause.
    The ranks the agent stopped because of it fail later."""
    rank, failure = error.get_first_failure()
    return rank, exit_code(failure.exitcode)


def bad_input_line(log: Path) -> str | None:
    """The ``error:`` line after the last bad-input mark in a run's train.log (train.main)."""
    try:
        text = log.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    _, mark, after = text.rpartition(BAD_INPUT_MARK + "\n")
    line = after.split("\n", 1)[0]
    return line if mark and line.startswith("error: ") else None


class _NoFailureLines:
    """Drops the elastic agent's own log records about a failure: "failed (exitcode: N)
    local_rank: ..." (main() prints the one line that matters) and "Sending process N closing
    signal SIGTERM" (the agent stopping the other ranks after it)."""

    @staticmethod
    def filter(record) -> bool:
        return not str(record.msg).startswith(("failed (exitcode", "Sending process"))


def main(argv: list[str] | None = None) -> int:
    import logging

    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from .oom import OOM_EXIT

    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(_NoFailureLines())
    args = launch_command_parser().parse_args(argv)
    try:
        launch_command(args)
    except ChildFailedError as e:
        rank, code = first_failure(e)
        if code == UsageError.exit_code:
            # Ranks of a run of several logged their bad-input line instead of each printing it
            # (train.main); one process alone (DeepSpeed on one GPU) printed its own.
            if (args.num_processes or 1) > 1:
                line = bad_input_line(Path(args.training_script_args[0]) / TRAIN_LOG) if args.training_script_args else None
                print(line or f"error: rank {rank} stopped on bad input", file=sys.stderr)
        elif code not in (Preempted.exit_code, OOM_EXIT):
            # Preempted and out of memory (which the CLI retries, oom.py) need no line here:
            # the ranks said everything on theirs (train.main). Anything else: which rank.
            sign = f" (signal {signal.Signals(code - 128).name})" if code > 128 and code - 128 in signal.valid_signals() else ""
            print(f"launcher: rank {rank} failed first, with exit code {code}{sign}; its output is above", file=sys.stderr)
        return code or 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

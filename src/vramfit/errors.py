"""Every user-facing failure is a VramfitError: a message and a hint for what to do.

Library code raises these; only the CLI turns them into a line of text and an exit
code (see ``cli.main``), so the core stays importable and testable without sys.exit.
"""

from __future__ import annotations


class VramfitError(Exception):
    """A failure the user can act on. ``exit_code`` 1 = runtime, 2 = usage."""

    exit_code = 1

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def one_line(self) -> str:
        # Collapse newlines so shell scripts can grep a single line.
        text = " ".join(self.message.split())
        if self.hint:
            text += f" (hint: {' '.join(self.hint.split())})"
        return text


class UsageError(VramfitError):
    """Bad input from the user: flags, config keys, presets, paths."""

    exit_code = 2


class ConfigError(UsageError):
    """A config value or key is invalid."""


class DataError(UsageError):
    """The dataset is missing, malformed or empty."""


class ModelError(UsageError):
    """The model path or config.json cannot be used."""


class FitError(VramfitError):
    """The plan does not fit the memory budget."""

    exit_code = 3


class TrainingFailed(VramfitError):
    """The training process exited with an error."""

    exit_code = 4


class Preempted(VramfitError):
    """Training stopped on SIGTERM/SIGINT after saving a checkpoint; rerun to resume.
    ``every_rank``: every training process agreed on the stop (preempt.py), so they can
    leave together; a signal before training reaches only the process it was sent to."""

    exit_code = 75  # EX_TEMPFAIL: try again later

    def __init__(self, message: str, hint: str = "", every_rank: bool = False) -> None:
        super().__init__(message, hint)
        self.every_rank = every_rank


class RunLocked(VramfitError):
    """Another training process holds the run directory."""

    exit_code = 6


class Reported(VramfitError):
    """A failure the training process has already reported on its own error line, with its
    hint: the CLI passes its exit code on and prints nothing more."""

    def __init__(self, exit_code: int) -> None:
        super().__init__("")
        self.exit_code = exit_code

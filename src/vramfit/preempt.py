"""Preemption: on SIGTERM/SIGINT, finish the optimizer step, checkpoint, exit 75
(``errors.Preempted``, EX_TEMPFAIL: "try again later").

Cloud schedulers send SIGTERM and wait a grace period before SIGKILL. Stopping in
the middle of a gradient-accumulation cycle would leave a state no checkpoint can
describe, so the handler only raises a flag; the callback acts on it at the next
optimizer-step boundary, which bounds the delay by one step plus the save.
"""

from __future__ import annotations

import signal

from transformers import TrainerCallback


class PreemptionCallback(TrainerCallback):
    def __init__(self) -> None:
        self.requested: int | None = None  # the signal number, once one arrives
        self.stopped_at: int | None = None

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, _frame) -> None:
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C means now
        self.requested = signum

    def _agreed(self) -> bool:
        """Every rank must stop at the same step, or the collective save deadlocks."""
        flag = self.requested is not None
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            import torch

            t = torch.tensor([1 if flag else 0], device="cuda" if torch.cuda.is_available() else "cpu")
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t.item())
        return flag

    def on_step_end(self, args, state, control, **kwargs):
        if self._agreed():
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step
        return control

"""The hooks where tests inject faults: checkpoint writes and the end of each training step.

Production code sees only the `Faults` object `active()` returns: the `Trainer` passes its
`pause` to `checkpoint.save` and calls its `after_step` once per step; the default injects
nothing and nothing in chargpt ever changes it. Tests that run chargpt in their own process
install theirs with monkeypatch or `install` (`conftest.ctrl_c_after` stops a run after a given
step, as a user's Ctrl-C does). Tests that cannot reach the process (the kill series runs
`chargpt train` in a subprocess, the elastic test's workers are spawned by torchrun) run it
through a test-owned entry script, `tests/faulty_cli.py`, which calls `install` and then
`cli.main`. chargpt itself reads no variable and no flag for this.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

__all__ = ["EXIT_STATUS", "Faults", "active", "install"]

EXIT_STATUS = 17


@dataclass(frozen=True)
class Faults:
    """The faults this process injects; the default injects none."""

    save_delay: float = 0.0
    """Seconds each checkpoint write pauses at each of its three critical points."""
    exit_at_step: int | None = None
    """Die right after this step, with status EXIT_STATUS, like a lost machine."""
    interrupt_at_step: int | None = None
    """Send this process SIGINT right after this step, as a user's Ctrl-C would."""

    def pause(self) -> None:
        """Called at the critical points of a checkpoint write."""
        if self.save_delay:
            time.sleep(self.save_delay)

    def after_step(self, step: int) -> None:
        """Called by the training loop after every optimizer step."""
        if step == self.exit_at_step:
            os._exit(EXIT_STATUS)  # no cleanup, no flush: a lost machine says nothing
        if step == self.interrupt_at_step:
            signal.raise_signal(signal.SIGINT)  # its handler has run when this returns


_active = Faults()


def install(chosen: Faults) -> None:
    """Make `chosen` this process's faults (called only by tests)."""
    global _active
    _active = chosen


def active() -> Faults:
    """This process's faults: none unless a test installed some."""
    return _active

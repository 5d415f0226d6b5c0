"""The hooks where tests inject faults: named points of a run, and the end of each training step.

Production code sees only the `Faults` object `active()` returns. It calls `reached(PHASE)` at
each named point of `PHASES` (inside `prepare`, at each step of a checkpoint swap, inside an
evaluation and a metrics write) and `after_step(step)` after each optimizer step (the "step"
phase); the default injects nothing and nothing in chargpt ever changes it. Tests that run
chargpt in their own process install theirs with monkeypatch or `install` (`conftest.ctrl_c_after`
stops a run after a given step, as a user's Ctrl-C does). Tests that cannot reach the process (the
kill series runs `chargpt train` in a subprocess, the DDP and elastic tests' workers are spawned
by torchrun) run it through a test-owned entry script, `tests/faulty_cli.py`, which calls
`install` and then `cli.main`. chargpt itself reads no variable and no flag for this.
"""

from __future__ import annotations

import json
import os
import signal
from dataclasses import dataclass, field

__all__ = ["EXIT_STATUS", "PHASES", "Faults", "active", "install"]

EXIT_STATUS = 17

# The named points, in the order a run meets them. A checkpoint save writes its files into
# NAME.tmp, seals them with the manifest, moves NAME aside to NAME.old (when there is one) and
# renames NAME.tmp to NAME; each phase is reached just after its step, before the next.
PHASES = ("prepare", "step", "evaluate", "metrics", "checkpoint.files", "checkpoint.manifest",
          "checkpoint.old", "checkpoint.swapped")


@dataclass
class Faults:
    """The faults this process injects; the default injects none."""

    exit_at_step: int | None = None
    """Die right after this step, with status EXIT_STATUS, like a lost machine."""
    interrupt_at_step: int | None = None
    """Send this process SIGINT right after this step, as a user's Ctrl-C would."""
    kill_at: str | None = None
    """Kill this process (SIGKILL, sent to itself) the `kill_nth` time it reaches this phase."""
    kill_nth: int = 1
    marker: str | None = None
    """A file the kill writes, just before it, naming the phase and the last step taken."""
    reached_count: int = field(default=0, compare=False, repr=False)
    last_step: int | None = field(default=None, compare=False, repr=False)

    def reached(self, phase: str) -> None:
        """Called at each named point of a run (one of PHASES)."""
        if phase != self.kill_at:
            return
        self.reached_count += 1
        if self.reached_count == self.kill_nth:
            self._kill(phase)

    def after_step(self, step: int) -> None:
        """Called by the training loop after every optimizer step."""
        self.last_step = step
        if step == self.exit_at_step:
            os._exit(EXIT_STATUS)  # no cleanup, no flush: a lost machine says nothing
        if step == self.interrupt_at_step:
            signal.raise_signal(signal.SIGINT)  # its handler has run when this returns
        self.reached("step")

    def _kill(self, phase: str) -> None:
        if self.marker is not None:
            with open(self.marker, "w", encoding="utf-8") as f:
                json.dump({"phase": phase, "nth": self.kill_nth, "step": self.last_step}, f)
                f.flush()
                os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)  # as `kill -9`: no handler, no cleanup, no flush


_active = Faults()


def install(chosen: Faults) -> None:
    """Make `chosen` this process's faults (called only by tests)."""
    global _active
    _active = chosen


def active() -> Faults:
    """This process's faults: none unless a test installed some."""
    return _active

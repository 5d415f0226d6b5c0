"""Fault injection for tests that cannot reach the process; read once at start-up, off by default.

Tests that run chargpt in their own process inject faults with monkeypatch and fixtures. Two
cannot: the kill series runs `chargpt train` in a subprocess and kills it at random moments, and
the elastic test's workers are spawned by torchrun. For them `cli.main` calls `load()` once at
start-up, and this is the only module that reads these variables:

- `CHARGPT_TEST_SAVE_DELAY=SECONDS`: every checkpoint write pauses this long after writing its
  files, after writing its manifest and between its two renames, so that a kill lands mid-write.
- `CHARGPT_FAULT_EXIT_AT_STEP=N` with `CHARGPT_FAULT_RANK=R` (default 0): rank R exits at once
  with status 17 right after step N, like a lost machine; on torchrun's first attempt only.

Neither changes any result. Production code sees only a `Faults` object: the `Trainer` passes
its `pause` to `checkpoint.save` and calls its `after_step` once per step.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass

from .errors import ConfigError

__all__ = ["EXIT_STATUS", "Faults", "active", "load"]

EXIT_STATUS = 17


@dataclass(frozen=True)
class Faults:
    """The faults this process injects; the default injects none."""

    save_delay: float = 0.0
    """Seconds each checkpoint write pauses at each of its three critical points."""
    exit_at_step: int | None = None
    """Die right after this step (already narrowed to this rank and attempt)."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Faults:
        try:
            delay = float(environ.get("CHARGPT_TEST_SAVE_DELAY") or 0.0)
            at = environ.get("CHARGPT_FAULT_EXIT_AT_STEP")
            rank = int(environ.get("RANK", "0"))
            fault_rank = int(environ.get("CHARGPT_FAULT_RANK", "0"))
            exit_at = int(at) if at is not None else None
        except ValueError as e:
            raise ConfigError(f"invalid fault-injection variable: {e}") from None
        first_attempt = environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        if not (first_attempt and fault_rank == rank):
            exit_at = None
        return cls(save_delay=delay, exit_at_step=exit_at)

    def pause(self) -> None:
        """Called at the critical points of a checkpoint write."""
        if self.save_delay:
            time.sleep(self.save_delay)

    def after_step(self, step: int) -> None:
        """Called by the training loop after every optimizer step."""
        if step == self.exit_at_step:
            os._exit(EXIT_STATUS)  # no cleanup, no flush: a lost machine says nothing


_active = Faults()


def load(environ: Mapping[str, str] | None = None) -> Faults:
    """Read the variables above (once, at start-up) and make them this process's faults."""
    global _active
    _active = Faults.from_env(os.environ if environ is None else environ)
    return _active


def active() -> Faults:
    """This process's faults: none unless `load()` found some."""
    return _active

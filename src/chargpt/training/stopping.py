"""When a training run stops early: SIGINT/SIGTERM, a wall-clock deadline, agreed by all ranks.

`StopRequest` turns SIGINT and SIGTERM into a flag that the loop checks between steps (a second
Ctrl-C aborts at once), and adds an optional deadline. A single process stops as soon as either
is due; under DDP the ranks only decide at log steps, together (one all-reduce), so no rank
leaves the others waiting in a collective.
"""

from __future__ import annotations

import signal
import threading
import time
from typing import Any

import torch

from chargpt.distributed import DistEnv, broadcast_flag

__all__ = ["StopRequest"]


class StopRequest:
    """A stop flag set by SIGINT/SIGTERM or by `deadline` (a `time.perf_counter()` value)."""

    def __init__(self, env: DistEnv, device: torch.device, deadline: float | None = None):
        self.env, self.device, self.deadline = env, device, deadline
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def due(self, at_log_step: bool) -> bool:
        """Whether to stop now; under DDP only at log steps, where the ranks agree on it."""
        local = self.signum is not None or (
            self.deadline is not None and time.perf_counter() >= self.deadline
        )
        if not self.env.enabled:
            return local
        if not at_log_step:
            return False
        return broadcast_flag(local, self.env, self.device)

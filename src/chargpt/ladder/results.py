"""What the ladder measured: one training run of a rung (`SeedResult`) and a rung's runs with
their summary (`RungResult`), which the runner fills and the report reads."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

from chargpt.ladder.rungs import Rung

__all__ = ["RungResult", "SeedResult"]


@dataclass
class SeedResult:
    """What one training run of a rung measured (losses in nats per character)."""

    seed: int
    steps: int
    seconds: float
    train_loss: float  # full context, on the last train characters (as many as val has)
    val_loss: float  # full context: every prediction sees at least half a block
    val_loss_tiled: float  # back-to-back windows: 1..block_size chars, the lecture's measure
    run_dir: str


@dataclass
class RungResult:
    """A rung's runs and their summary; `status` is 'done', 'skipped: ...' or 'interrupted'."""

    rung: Rung
    params: int
    status: str = "done"
    runs: list[SeedResult] = field(default_factory=list)
    device: str = ""
    reduced: bool = False
    sample: str = ""

    @property
    def ran(self) -> bool:
        return self.status == "done" and bool(self.runs)

    def mean(self, key: str) -> float:
        values = [getattr(r, key) for r in self.runs]
        return statistics.fmean(values) if values else math.nan

    def spread(self, key: str) -> float:
        """Half the range over seeds (0 with one seed)."""
        values = [getattr(r, key) for r in self.runs]
        return (max(values) - min(values)) / 2 if len(values) > 1 else 0.0

    @property
    def bpc(self) -> float:
        return self.mean("val_loss") / math.log(2)

"""Training to a wall-clock budget: parse '90s'/'10m'/'2h' and plan the step count that fits.

`chargpt train --time 10m` does not stop a run when the clock runs out (that would cut off the
schedule's cooldown, and the schedule, not the model, would decide the loss). It measures instead:
the step-0 evaluation and checkpoint give the cost of one evaluation, the first
`CALIBRATION_STEPS` training steps (all inside the learning-rate warmup, whose rates do not
depend on the run's length) give the cost of one step, and `plan_steps` turns the time left
into a step count so that training, every evaluation and the final checkpoint end inside the
budget. The trainer then fixes `max_steps` to that count and records it in the run's
config.json (`planned_steps`), so the rest of the schedule is laid out for the run's real
length, and a resumed run keeps the plan instead of measuring again. This module is pure
arithmetic; trainer.py times and applies.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

__all__ = ["CALIBRATION_STEPS", "Calibration", "Plan", "calibration_steps", "parse_duration",
           "plan_steps"]

CALIBRATION_STEPS = 10  # the first steps, timed from the second (the first one warms up)
MARGIN = 0.04  # of the time left, kept for the step time's drift on a shared machine
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Seconds in a duration such as '90s', '10m', '2h', '1.5h' or '45' (seconds)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([smh]?)\s*", text)
    seconds = float(match.group(1)) * _UNITS[match.group(2) or "s"] if match else math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise ConfigError(f"time budget must be a positive duration such as 90s, 10m or 2h, "
                          f"got {text!r}")
    return seconds


def calibration_steps(warmup_steps: int, schedule_depends_on_length: bool) -> int:
    """How many of the first steps time the step, all with rates that the plan cannot change."""
    if not schedule_depends_on_length:
        return CALIBRATION_STEPS
    return min(CALIBRATION_STEPS, warmup_steps)


@dataclass
class Calibration:
    """The clock of a run that has a time budget and no plan yet: `tick()` after each step."""

    budget: float
    steps: int
    times: list[float] = field(default_factory=list)

    @classmethod
    def of(cls, train: Any) -> Calibration | None:
        """The calibration a `TrainConfig` needs: None without a budget or once planned."""
        if not train.time_budget or train.planned_steps:
            return None
        budget = parse_duration(train.time_budget)
        depends = train.schedule != "constant" and not train.lr_decay_steps
        steps = calibration_steps(train.warmup_steps, depends)
        if steps < 3:
            raise ConfigError(f"a time budget times the first steps inside the warmup, so it "
                              f"needs warmup_steps >= 3, got {train.warmup_steps}")
        return cls(budget, steps)

    def tick(self) -> bool:
        """Note the end of a step; True once enough steps are timed to plan."""
        self.times.append(time.perf_counter())
        return len(self.times) >= self.steps

    def step_seconds(self) -> float:
        """Mean seconds per step, from the end of the first timed step to the last."""
        return (self.times[-1] - self.times[0]) / max(1, len(self.times) - 1)


@dataclass(frozen=True)
class Plan:
    """The step count a budget buys, and the measurements it came from (for the log)."""

    steps: int
    budget: float
    step_seconds: float
    eval_seconds: float
    evals: int
    elapsed: float

    def describe(self) -> str:
        return (f"time budget {self.budget:g}s: {self.steps} steps planned ({self.elapsed:.1f}s "
                f"used so far; {self.step_seconds * 1e3:.1f} ms per step, measured; "
                f"{self.evals} more evaluation(s) with checkpoint at {self.eval_seconds:.2f}s "
                f"each, as the step-0 one took; {MARGIN:.0%} of the time left kept in reserve)")


def plan_steps(*, budget: float, elapsed: float, step: int, step_seconds: float,
               eval_seconds: float, eval_interval: int) -> Plan:
    """The total step count that ends, final evaluation and checkpoint included, by `budget`.

    `step` steps are done after `elapsed` seconds; each further step costs `step_seconds`,
    and every eval_interval-th step and the last one add `eval_seconds`. At least one more
    step is planned even when the budget is already spent.
    """
    left = (budget - elapsed) * (1.0 - MARGIN) - eval_seconds  # the final evaluation
    per_step = step_seconds + eval_seconds / eval_interval  # evaluations spread over the steps
    more = max(1, math.floor(left / per_step)) if per_step > 0 else 1
    total = step + more
    evals = total // eval_interval - step // eval_interval + (total % eval_interval != 0)
    return Plan(total, budget, step_seconds, eval_seconds, evals, elapsed)

"""Training to a wall-clock budget: parse '90s'/'10m'/'2h' and plan the step count that fits.

`chargpt train --time 10m` does not stop a run when the clock runs out (that would cut off the
schedule's cooldown, and the schedule, not the model, would decide the loss). It measures
instead: a `StepClock` times the training steps (evaluations excluded), a few evaluation batches
give the cost of an evaluation, and `plan_steps` turns the time left into a step count so that
training, every evaluation and the final checkpoint end inside the budget (and never past the
run's `step_cap`, which `--size auto` sets on a small corpus). The first plan comes
after `config.values.CALIBRATION_STEPS` steps, all inside the learning-rate warmup, whose rates
do not depend on the run's length. The run plans again every `REPLAN_EVERY` steps, from the
recent step time (`StepClock.step_seconds`), for as long as the schedule lets the length change
without changing a rate already used (`optim.length_free_steps`): to the end for WSD, whose
cooldown, once begun, is re-aimed at each new end (`reaimed`, `optim.cooldown_level`), so a
machine that slows down or speeds up in the cooldown still ends the run on time. Evaluations are
spaced and, in a short budget, shortened so that together they take at most `EVAL_SHARE` of it;
none draws more than `VAL_COVERAGE` times the val split's tokens (a small corpus is then
evaluated more often, so `best/` catches its val loss before it is learnt by heart); a budget
run has no step-0 evaluation. A `Planner` holds a run's clock, what an evaluation costs
and what the log was told, and turns measurements into revised `TrainConfig`s; the trainer
measures (on every rank, averaged, so that all ranks plan alike), applies each plan and records
it (`PLANNED_FIELDS`) in the run's config.json before any checkpoint, so a resumed or re-run run
keeps the plan instead of measuring again.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from chargpt.config.values import check_time_budget, format_cooldown_plan, parse_cooldown_plan
from chargpt.training.optim import cooldown_start, length_free_steps

__all__ = ["EVAL_PROBE_ITERS", "EVAL_SHARE", "PLANNED_FIELDS", "VAL_COVERAGE", "Plan", "Planner",
           "StepClock", "cooled_from", "covering_iters", "keep_history", "plan_steps", "reaimed"]

MARGIN = 0.04  # of the time left, kept for the step time's drift on a shared machine
EVAL_SHARE = 0.05  # of the budget, the most that all evaluations together may take
MIN_EVAL_ITERS = 10  # batches per split: fewer would make an evaluation mostly noise
# an evaluation draws at most this many times the val split's tokens: more only draws the same
# text again, and on a small corpus its time is better spent evaluating more often
VAL_COVERAGE = 2
EVAL_PROBE_ITERS = 4  # batches per split timed to price an evaluation before the first one
REPLAN_EVERY = 10  # steps between plans while the run's length is still free to change
WINDOW = 10  # timed steps per window of the step-time record
RECENT_WINDOWS = 3  # the windows the step time is planned with, once there are as many
# the [train] values a budget's plans set, and the step cap --size auto sets beside them: a
# resumed run keeps them, whatever the command line says
PLANNED_FIELDS = ("max_steps", "planned_steps", "eval_interval", "eval_iters", "cooldown_plan",
                  "plateau_step", "step_cap")


@dataclass
class StepClock:
    """The clock of a run with a time budget: `tick()` after each training step, `exclude()`
    the time of anything else (evaluations, checkpoints), `due(step)` says when to plan."""

    budget: float
    first_plan_after: int
    planned: bool = False
    ticks: int = 0
    excluded: float = 0.0
    first: float | None = None
    last: float = 0.0
    windows: list[float] = dataclasses.field(default_factory=list)
    """Seconds per step of each run of WINDOW timed steps so far."""
    window_start: float = 0.0  # busy seconds when the current window began

    @classmethod
    def of(cls, train: Any) -> StepClock | None:
        """The clock a `TrainConfig` needs: None without a budget or once it is planned."""
        checked = check_time_budget(train)
        return None if checked is None else cls(*checked)

    def tick(self) -> None:
        """Note the end of a training step (the first one only starts the clock: it warms up)."""
        self.last = time.perf_counter()
        if self.first is None:
            self.first, self.excluded = self.last, 0.0
            return
        self.ticks += 1
        if self.ticks % WINDOW == 0:
            busy = self.busy()
            self.windows.append((busy - self.window_start) / WINDOW)
            self.window_start = busy

    def busy(self) -> float:
        """Seconds spent in timed training steps so far (none before the first tick)."""
        if self.first is None:
            return 0.0
        return max(self.last - self.first - self.excluded, 0.0)

    def exclude(self, seconds: float) -> None:
        """Leave `seconds` spent on something other than training steps out of the step time."""
        if self.first is not None:
            self.excluded += seconds

    def step_seconds(self) -> float:
        """Seconds per training step to plan with: the mean over the last RECENT_WINDOWS
        windows of WINDOW steps, or over every step timed while there are fewer. A run plans
        again every REPLAN_EVERY steps to its end, so the recent speed is the one that counts:
        a machine that slows down (or speeds up) halfway is followed within a few windows."""
        if len(self.windows) < RECENT_WINDOWS:
            return self.busy() / max(1, self.ticks)
        return sum(self.windows[-RECENT_WINDOWS:]) / RECENT_WINDOWS

    def due(self, step: int, train: Any) -> bool:
        """Whether to plan after `step`: the first plan once the calibration steps are timed,
        then every REPLAN_EVERY steps while the schedule leaves the length free."""
        if not self.planned:
            return self.ticks + 1 >= self.first_plan_after
        return step % REPLAN_EVERY == 0 and step < length_free_steps(train)


@dataclass(frozen=True)
class Plan:
    """What a budget buys: steps and evaluations, and the measurements they came from."""

    steps: int
    budget: float
    step_seconds: float
    eval_seconds: float  # one evaluation of eval_iters batches per split
    eval_interval: int
    eval_iters: int
    evals: int  # still to come, the final one included
    elapsed: float

    def describe(self, timed_steps: int) -> str:
        where = (f"every {self.eval_interval} steps and at the end"
                 if self.eval_interval < self.steps else "at the end")
        return (f"time budget {self.budget:g}s: {self.steps} steps planned ({self.elapsed:.1f}s "
                f"used so far; {self.step_seconds * 1e3:.1f} ms per step over {timed_steps} "
                f"timed steps; {self.evals} evaluation(s) of {self.eval_iters} batches per "
                f"split, {where}, at {self.eval_seconds:.2f}s each, at most {EVAL_SHARE:.0%} "
                f"of the budget together; {MARGIN:.0%} of the time left kept in reserve)")

    def apply(self, train: Any, step: int) -> Any:
        """`train` (a TrainConfig) with this plan's values, planned after `step` steps; a WSD
        cooldown already begun is re-aimed at the new end (see `reaimed`)."""
        steps, cooldown = reaimed(train, step, self.steps)
        return dataclasses.replace(train, max_steps=steps, planned_steps=steps,
                                   eval_interval=self.eval_interval, eval_iters=self.eval_iters,
                                   cooldown_plan=cooldown)


def reaimed(train: Any, step: int, steps: int) -> tuple[int, str]:
    """The step count and `cooldown_plan` of a run planned after `step` steps to end at
    `steps`: unchanged unless the schedule is WSD and its cooldown has begun, or would begin
    behind `step` with the new length; then the cooldown is re-aimed from `step` at `steps`."""
    if train.schedule != "wsd" or train.lr_decay_steps:
        return steps, train.cooldown_plan
    start = cooldown_start(train)
    if (not parse_cooldown_plan(train.cooldown_plan) and step <= start
            and cooldown_start(dataclasses.replace(train, max_steps=steps)) >= step):
        return steps, ""  # the cooldown is still ahead: the length is free
    return cooled_from(train, step, steps)


def cooled_from(train: Any, step: int, steps: int) -> tuple[int, str]:
    """The step count and `cooldown_plan` of a WSD run whose cooldown runs from `step` (or from
    where it has got to, if it has begun) to min_lr at `steps`, every rate before `step` kept."""
    plan = parse_cooldown_plan(train.cooldown_plan)
    if not plan:
        start = cooldown_start(train)
        plan = ((start, train.max_steps),) if step > start else ()
    at = max(step, train.warmup_steps)
    steps = max(steps, at + 1)
    if plan and plan[-1][1] == steps:
        return steps, train.cooldown_plan  # aimed there already
    return steps, format_cooldown_plan((*plan, (at, steps)))


def plan_steps(*, budget: float, elapsed: float, step: int, step_seconds: float,
               eval_seconds: float, eval_iters: int, eval_interval: int,
               checkpoint_seconds: float = 0.0, most_steps: int = 0) -> Plan:
    """The total step count that ends, final evaluation and checkpoint included, by `budget`,
    and not past `most_steps` (0 = no cap).

    `step` steps are done after `elapsed` seconds; each further step costs `step_seconds`; an
    evaluation of `eval_iters` batches per split costs `eval_seconds`, and the checkpoints and
    plot that follow it `checkpoint_seconds`. Evaluations together take at most EVAL_SHARE of
    the budget: fewer batches (not below MIN_EVAL_ITERS) when one would take more, and an
    interval no shorter than `eval_interval`. At least one more step is planned even when the
    budget is already spent.
    """
    share = EVAL_SHARE * budget
    per_iter = eval_seconds / eval_iters
    iters = eval_iters
    if eval_seconds + checkpoint_seconds > share:
        room = max(share - checkpoint_seconds, 0.0)
        iters = min(eval_iters, max(MIN_EVAL_ITERS, math.floor(room / per_iter)))
    eval_s = per_iter * iters + checkpoint_seconds
    evals_allowed = max(1, math.floor(share / eval_s)) if eval_s > 0 else 1 << 30
    left = (budget - elapsed) * (1.0 - MARGIN) - eval_s  # the final evaluation
    rough = step + (max(1, math.floor(left / step_seconds)) if step_seconds > 0 else 1)
    if most_steps:
        rough = min(rough, max(most_steps, step + 1))
    interval = max(eval_interval, math.ceil(rough / evals_allowed))
    per_step = step_seconds + eval_s / interval  # evaluations spread over the steps
    more = max(1, math.floor(left / per_step)) if per_step > 0 else 1
    total = min(step + more, rough)  # rough: the cap, if there is one, else past step + more
    evals = total // interval - step // interval + (total % interval != 0)
    return Plan(total, budget, step_seconds, eval_s, interval, iters, evals, elapsed)


def covering_iters(val_tokens: int, tokens_per_batch: int) -> int:
    """Evaluation batches per split that draw VAL_COVERAGE times the val split's tokens (and
    not fewer than MIN_EVAL_ITERS): what a budget run's evaluations draw at most."""
    return max(MIN_EVAL_ITERS, math.ceil(VAL_COVERAGE * val_tokens / tokens_per_batch))


def keep_history(plan: Plan, step: int, train: Any) -> Plan:
    """`plan`, lengthened if needed so that no rate of the `step` steps taken changes: a WSD
    run whose new length would put the cooldown's start behind it starts the cooldown now."""
    for steps in range(plan.steps, plan.steps + 10 * step + 10):  # a bound, for cosine runs
        if length_free_steps(dataclasses.replace(train, max_steps=steps)) >= step:
            return plan if steps == plan.steps else dataclasses.replace(plan, steps=steps)
    return plan


@dataclass
class Planner:
    """A budget run's planning state: its clock, the cost of an evaluation (seconds per batch
    per split, and of the checkpoints and plot after it), and the step count the log last
    reported (a revision is logged only when it moves the plan by 5% or more)."""

    clock: StepClock
    most_iters: int  # evaluation batches per split worth drawing (`covering_iters`)
    eval_cost: tuple[float, float] | None = None
    logged_steps: int = 0

    @classmethod
    def of(cls, train: Any, most_iters: int) -> Planner | None:
        """The planner a `TrainConfig` needs: None without a budget or once it is planned."""
        clock = StepClock.of(train)
        return None if clock is None else cls(clock, most_iters)

    def after_step(self, step: int, train: Any) -> bool:
        """Time the step just taken; whether to plan now."""
        self.clock.tick()
        return self.clock.due(step, train)

    def evaluated(self, per_batch: float, fixed: float, total: float) -> None:
        """An evaluation took `per_batch` seconds a batch, then `fixed` for its checkpoints and
        plot, `total` in all: its cost prices the next plan, and its time is not a step's."""
        self.eval_cost = (per_batch, fixed)
        self.clock.exclude(total)

    def plan(self, train: Any, step: int, elapsed: float, *,
             rehearse: Callable[[], tuple[float, float]],
             average: Callable[[list[float]], list[float]]) -> tuple[Any | None, str | None]:
        """`revise` from this process's measurements: seconds per step, per evaluation batch,
        and of an evaluation's checkpoints and plot. `rehearse()` prices an evaluation when none
        has been timed yet (a budget run plans before its first); `average` makes every rank
        plan from the same numbers."""
        if self.eval_cost is None:
            self.eval_cost = rehearse()
        measured = average([self.clock.step_seconds(), *self.eval_cost])
        return self.revise(train, step, elapsed, measured)

    def revise(self, train: Any, step: int, elapsed: float,
               measured: list[float]) -> tuple[Any | None, str | None]:
        """`train` re-planned after `step` steps and `elapsed` seconds from `measured` (see
        `plan`): the new TrainConfig, or None when the plan stands, and a line for the
        log, or None when there is nothing new to say."""
        step_s, batch_s, fixed_s = measured
        iters = min(train.eval_iters, self.most_iters)
        plan = keep_history(plan_steps(
            budget=self.clock.budget, elapsed=elapsed, step=step, step_seconds=step_s,
            eval_seconds=batch_s * iters, eval_iters=iters,
            eval_interval=train.eval_interval, checkpoint_seconds=fixed_s,
            most_steps=train.step_cap), step, train)
        first = not self.clock.planned
        self.clock.planned = True
        planned = plan.apply(train, step)
        if not first and (planned.max_steps, planned.cooldown_plan) == (
                train.max_steps, train.cooldown_plan):
            return None, None
        message = None
        if first or abs(plan.steps - self.logged_steps) >= 0.05 * self.logged_steps:
            message = (plan.describe(self.clock.ticks) if first else
                       f"time budget: plan revised to {plan.steps} steps at step {step} "
                       f"({step_s * 1e3:.1f} ms per step over {self.clock.ticks} timed steps)")
            self.logged_steps = plan.steps
        return planned, message

"""The plateau rule: a run whose val loss has stopped improving ends early, cooled down.

On a small corpus a model learns its training text by heart long before max_steps: the train
loss keeps falling while the val loss stalls and then rises. With `TrainConfig.patience` N, an
evaluation that does not beat the best val loss so far by more than `MARGIN` counts against
the run (`counted`; a clearly better one starts the count again), and the N-th in a row ends
it (`end_early`). Stopping a warmup-stable-decay run at its peak rate would waste the cooldown,
which is where WSD gets its loss, so a WSD run begins its cooldown at once and ends after
`COOLDOWN_SHARE` of the steps it has taken, the cooldown recorded in `cooldown_plan` as a time
budget's plans record theirs (`budget.cooled_from`); any other schedule stops at once. The
trainer writes the revised config (`max_steps`, `planned_steps`, `plateau_step`) to config.json
before the next checkpoint, and the count travels in the checkpoint's `TrainState`, so a
resumed run ends where the uninterrupted one does. `final_word` is the line for a run that
ends with a val loss clearly worse than its best, whatever its patience: best/ keeps the best.
"""

from __future__ import annotations

import dataclasses

from chargpt.config.schema import TrainConfig
from chargpt.training.budget import cooled_from

__all__ = ["COOLDOWN_SHARE", "MARGIN", "counted", "end_early", "final_word"]

MARGIN = 0.002  # relative: a val loss within 0.2% of the best is no improvement
COOLDOWN_SHARE = 0.2  # of the steps taken: the cooldown of a WSD run that ends early


def counted(stale: int, val_loss: float, best: float) -> int:
    """The evaluations in a row without a clearly better val loss, after one of `val_loss`
    against the `best` before it."""
    return 0 if val_loss < best * (1.0 - MARGIN) else stale + 1


def end_early(train: TrainConfig, step: int, stale: int, val_loss: float,
              best: float) -> tuple[TrainConfig, str] | None:
    """The config and log line of a run that ends early after the evaluation at `step` (val
    loss `val_loss`, `stale` in a row without beating `best`); None while it goes on: patience
    off or not yet run out, an end already chosen, the last step, or a warmup not yet over."""
    if (not train.patience or stale < train.patience or train.plateau_step
            or step >= train.max_steps or step < train.warmup_steps):
        return None
    why = (f"plateau at step {step}: val loss {val_loss:.4f}; {stale} evaluation(s) in a row "
           f"have not beaten the best, {best:.4f}, by more than {MARGIN:.1%} (patience "
           f"{train.patience})")
    if train.schedule == "wsd" and not train.lr_decay_steps:
        end = min(train.max_steps, step + max(1, round(COOLDOWN_SHARE * step)))
        steps, plan = cooled_from(train, step, end)
        what = (f"; the cooldown to min_lr runs from here to step {steps} instead of "
                f"{train.max_steps}, and the run ends there" if steps < train.max_steps else
                f"; the run's own end, step {steps}, comes as soon, so it stands")
        decay = train.lr_decay_steps
    else:
        steps, plan = step, train.cooldown_plan
        what = f"; the run stops here instead of at step {train.max_steps}"
        # the decay keeps the length it had, so that the rates already used never change
        decay = train.decay_steps if train.schedule == "cosine" else train.lr_decay_steps
    revised = dataclasses.replace(train, max_steps=steps, planned_steps=steps,
                                  plateau_step=step, cooldown_plan=plan, lr_decay_steps=decay)
    return revised, why + what


def final_word(last: float, best: float) -> str | None:
    """The line for a run that ends with val loss `last` clearly worse than its `best`."""
    if not last > best * (1.0 + MARGIN):
        return None
    return (f"the final val loss, {last:.4f}, is {last / best - 1:.1%} above the best, "
            f"{best:.4f}: best/ keeps the best model, and sample and eval use it")

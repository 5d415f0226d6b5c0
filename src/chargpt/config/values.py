"""Config values that follow a small grammar or name a table: durations ('90s', '10m', '2h'),
the tracker names of `log_to`, how many first steps a time budget times, the re-aimed
cooldown a budget's plans record (`cooldown_plan`), device names and seeds (`check_device`,
`check_seed`: every command's `--device` and `--seed`, the API's and the server's).

They live with the configuration so that validating a config never imports the training code
that later uses these values (`training.budget`, `training.trackers`).
"""

from __future__ import annotations

import functools
import math
import re
from typing import Any

from chargpt.errors import ConfigError

__all__ = ["CALIBRATION_STEPS", "MAX_SEED", "TRACKERS", "calibration_steps", "check_device",
           "check_seed", "check_time_budget", "format_cooldown_plan", "parse_cooldown_plan",
           "parse_duration", "parse_log_to"]

CALIBRATION_STEPS = 10  # the first steps, timed from the second (the first one warms up)
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb"}  # name -> module it needs
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}
# torch seeds a generator with any 64-bit number; chargpt keeps to the signed range, which
# every seeded library (numpy, random, the native loop's noise) and JSON readers share.
MAX_SEED = 2**63 - 1


def check_device(name: object) -> None:
    """Refuse a device name that is not 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', before torch
    sees it: torch takes 'meta' (no data: every result wrong) and turns a typo into a
    traceback. Whether the device is there is `device.pick_device`'s question."""
    named = r"auto|(cpu|cuda|mps)(:(0|[1-9][0-9]{0,3}))?"  # an index as torch reads one
    if not (isinstance(name, str) and re.fullmatch(named, name)):
        raise ConfigError(f"device must be auto, cpu, cuda[:N] or mps, got {name!r}")


def check_seed(seed: object, what: str = "seed") -> None:
    """Refuse a seed that is not a whole number from 0 to MAX_SEED (`what` names it)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"{what} must be a whole number from 0 to 2**63 - 1, got {seed!r}")


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


def check_time_budget(train: Any) -> tuple[float, int] | None:
    """A `TrainConfig`'s budget in seconds and its calibration steps; None without a budget or
    once it is planned. A budget too short to time, or a step cap without one, is a
    ConfigError."""
    if train.step_cap and not train.time_budget:
        raise ConfigError("step_cap caps a time budget's plans; give --time too, or "
                          "--max-steps alone")
    if not train.time_budget or train.planned_steps:
        return None
    budget = parse_duration(train.time_budget)
    depends = train.schedule != "constant" and not train.lr_decay_steps
    steps = calibration_steps(train.warmup_steps, depends)
    if steps < 3:
        raise ConfigError(f"a time budget times the first steps inside the warmup, so it "
                          f"needs warmup_steps >= 3, got {train.warmup_steps}")
    if train.step_cap and train.step_cap <= steps:  # its first plan comes after them
        raise ConfigError(f"step_cap {train.step_cap} is not more than the {steps} steps a "
                          f"time budget times before it plans; give --max-steps "
                          f"{train.step_cap} without --time")
    return budget, steps


def parse_log_to(value: str) -> list[str]:
    """The tracker names in a comma-separated `log_to` value, each once, in order."""
    names = list(dict.fromkeys(n.strip() for n in value.split(",") if n.strip()))
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise ConfigError(f"unknown tracker {unknown[0]!r} in log_to (known: "
                          f"{', '.join(TRACKERS)})")
    return names


@functools.cache
def parse_cooldown_plan(value: str) -> tuple[tuple[int, int], ...]:
    """The (step, end) pairs of a `cooldown_plan` such as '120:400,130:390': steps rising,
    each end past its step."""
    pairs = []
    for item in filter(None, (s.strip() for s in value.split(","))):
        match = re.fullmatch(r"(\d+):(\d+)", item)
        if not match:
            raise ConfigError(f"cooldown_plan must be 'step:end' pairs, got {item!r}")
        step, end = int(match.group(1)), int(match.group(2))
        if end <= step or (pairs and step <= pairs[-1][0]):
            raise ConfigError(f"cooldown_plan {value!r}: each step must rise and end after it")
        pairs.append((step, end))
    return tuple(pairs)


def format_cooldown_plan(pairs: tuple[tuple[int, int], ...]) -> str:
    return ",".join(f"{step}:{end}" for step, end in pairs)

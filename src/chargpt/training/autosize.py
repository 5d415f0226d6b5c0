"""`--size auto`: the model a time budget buys on this machine for this corpus, chosen before
the first step, and `--size NAME`: one size of the ladder by name.

The rule and its forecast are config/sizing.py's; what this module adds is the machine. Each
candidate size is built as the run would build it (the same Trainer, optimizer and batches) and
timed for a few steps here, smallest first; the next size's time is first guessed from the
last one measured and its FLOPs, and the measuring stops at the first size the budget cannot
give `MIN_STEPS` steps, or when timing it would cost more than `MEASURE_SHARE` of the budget.
Then the sizes where the rule's dropout could pay are timed with it (on a CPU a step with
dropout is up to a third slower, which buys fewer tokens), while the share lasts. Under
torchrun every rank times the sizes by itself and the ranks average their times, so all choose
alike. The seconds spent measuring count against the
budget. The choice is applied to the config (the size's values, dropout where the rule
regularises, and a shorter budget when the corpus is too small to use the whole one) and
recorded in it (`TrainConfig.size` names the size, `size_choice` says why), so a resumed run
never chooses again.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time

import torch

from chargpt.config.schema import Config, apply_overrides
from chargpt.config.sizing import (
    MIN_STEPS,
    SHORTEN_BELOW,
    TRAIN_SHARE,
    Choice,
    Size,
    block_params,
    choose,
    load_rule,
)
from chargpt.config.values import CALIBRATION_STEPS, parse_duration
from chargpt.data.prepared import PreparedData
from chargpt.data.stats import CorpusStats, corpus_stats
from chargpt.distributed import DistEnv, all_reduce_mean
from chargpt.errors import ConfigError, warn
from chargpt.model.build import build_model
from chargpt.model.flops import estimate
from chargpt.runs.rundir import RunDir

__all__ = ["MEASURE_SHARE", "apply_size", "auto_size", "block_params_of", "forecast_table",
           "gpu_step_seconds"]

MEASURE_SHARE = 0.03  # of the budget, the most that timing the candidate sizes may take
WARMUP_STEPS, TIMED_STEPS = 2, 5
DROPOUT_SLOWER = 1.5  # a CPU step with dropout against one without, at most (measured 1.3-1.6)


def apply_size(cfg: Config, size: Size, dropout: float | None = None,
               choice: str = "") -> Config:
    """`cfg` with `size`'s values, its name recorded (and why, for an automatic choice)."""
    model = dict(size.model) if dropout is None else {**size.model, "dropout": dropout}
    return apply_overrides(cfg, {"model": model, "train": {
        **size.train, "size": size.name, "size_choice": choice}}, f"size {size.name}")


def _time_size(cfg: Config, rundir: RunDir, data: PreparedData, device: torch.device,
               env: DistEnv) -> float:
    """Seconds per training step of `cfg` here, the median of a few steps timed after a few
    warm-up steps (one slow step on a busy machine must not shrink the model), averaged over
    the ranks so that every rank decides from the same numbers."""
    from chargpt.training.trainer import Trainer  # the class that trains it, built but not run

    trainer = Trainer(cfg, rundir, data, DistEnv(), device, quiet=True)
    trainer.model.train()

    def step() -> float:
        t0 = time.perf_counter()
        trainer.train_step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    for _ in range(WARMUP_STEPS):
        step()
    seconds = statistics.median(step() for _ in range(TIMED_STEPS))
    if env.enabled:
        seconds = all_reduce_mean(torch.tensor([seconds], device=device), env).item()
    return seconds


def block_params_of(cfg: Config) -> dict[str, int]:
    """Block parameters of every size over `cfg` (built on the meta device)."""
    with torch.device("meta"):
        return {size.name: block_params(build_model(apply_size(cfg, size).model))
                for size in load_rule().sizes}


def _measure(cfg: Config, rundir: RunDir, data: PreparedData, env: DistEnv,
             device: torch.device, budget: float, stats: CorpusStats
             ) -> tuple[dict[str, float], dict[str, float], dict[str, int]]:
    """Step seconds (without and with the rule's dropout, where it could pay: on a CPU a step
    with dropout is slower) of each size worth timing, and block parameters of every size.

    Every size the budget can run is timed first, smallest first, then with dropout each size
    whose plain steps would read the corpus often enough for the forecast to prefer it, while
    `MEASURE_SHARE` lasts. A size whose dropout steps it leaves untimed is not offered with
    dropout (their time is infinite): a guess from a smaller size's ratio once planned 366
    steps of 4x192 on wisdom-en where the run took 490, past where that corpus is learnt by
    heart, and a choice with dropout is the one its steps matter most to."""
    body = block_params_of(cfg)
    forecast = load_rule().forecast
    dropout = forecast.dropout if forecast is not None else 0.0
    tokens_per_second = budget * TRAIN_SHARE * max(1, env.world_size)
    epoch = cfg.train.epoch_order
    sizes = {size.name: size for size in load_rule().sizes}

    def could_pay(name: str, seconds: float) -> bool:
        """Whether the steps `seconds` long that the budget buys could make dropout pay."""
        tokens = tokens_per_second / seconds * sizes[name].tokens_per_step
        return bool(dropout) and forecast.dropout_can_pay(
            body[name], tokens, stats, sizes[name].model["block_size"], epoch)

    times, spent = _time_plain(cfg, rundir, data, device, env, budget)
    dropped: dict[str, float] = {}
    for name, seconds in times.items():
        if not could_pay(name, seconds):
            continue
        if spent + DROPOUT_SLOWER * seconds * (WARMUP_STEPS + TIMED_STEPS) > MEASURE_SHARE * budget:
            dropped[name] = math.inf
            continue
        dropped[name] = _time_size(apply_size(cfg, sizes[name], dropout), rundir, data, device,
                                   env)
        spent += dropped[name] * (WARMUP_STEPS + TIMED_STEPS)
    return times, dropped, body


def _time_plain(cfg: Config, rundir: RunDir, data: PreparedData, device: torch.device,
                env: DistEnv, budget: float) -> tuple[dict[str, float], float]:
    """Step seconds of each size, smallest first, up to the first the budget cannot give
    `MIN_STEPS` steps or that timing would take past `MEASURE_SHARE` of it (its time guessed
    from the last size's and their FLOPs), and the seconds the timed steps took."""
    times: dict[str, float] = {}
    last: tuple[float, float] | None = None  # (seconds, FLOPs) of the last size timed
    spent = 0.0
    fits = min(len(data.train), len(data.val)) - 1  # the longest block both splits hold
    for size in load_rule().sizes:
        if size.model["block_size"] > fits:
            break  # the ladder's blocks only grow
        sized = apply_size(cfg, size)
        sketch = estimate(sized)
        if last is not None:
            guess = last[0] * sketch.flops_per_step / last[1]
            too_slow = budget * TRAIN_SHARE / guess < MIN_STEPS
            if too_slow or spent + guess * (WARMUP_STEPS + TIMED_STEPS) > MEASURE_SHARE * budget:
                break
        times[size.name] = _time_size(sized, rundir, data, device, env)
        spent += times[size.name] * (WARMUP_STEPS + TIMED_STEPS)
        last = (times[size.name], sketch.flops_per_step)
    return times, spent


def gpu_step_seconds(cfg: Config, gpu: str, gpus: int, mfu: float) -> dict[str, float]:
    """Seconds per step of every size on `gpus` x `gpu` at `mfu`, from its FLOPs (not timed)."""
    from chargpt.model.flops import PEAK_FLOPS, gpu_named

    peak = PEAK_FLOPS[gpu_named(gpu)] * mfu * gpus
    return {size.name: estimate(apply_size(cfg, size)).flops_per_step / peak
            for size in load_rule().sizes}


def forecast_table(choice: Choice, body: dict[str, int], stats: CorpusStats) -> str:
    """The candidates a choice was made from, as a Markdown table."""
    lines = ["| size | block params | tokens | epochs | dropout | val loss forecast |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, c in choice.candidates.items():
        mark = " (chosen)" if name == choice.size.name else ""
        lines.append(f"| {name}{mark} | {body[name] / 1e6:.2f} M | {c.tokens / 1e6:.1f} M | "
                     f"{c.tokens / stats.train_tokens:.1f} | {c.dropout:g} | "
                     f"{c.loss:.2f} +- {c.spread:.2f} |")
    return "\n".join(lines)


def auto_size(cfg: Config, rundir: RunDir, data: PreparedData, env: DistEnv,
              device: torch.device, step_seconds: dict[str, float] | None = None
              ) -> tuple[Config, Choice, float]:
    """`cfg` with the size `--time` buys here for this corpus (or on the machine whose
    `step_seconds` are given), the choice, and the seconds the choosing took (they count
    against the budget)."""
    if not cfg.train.time_budget:
        raise ConfigError("--size auto chooses for a time budget; give --time too")
    t0 = time.perf_counter()
    budget = parse_duration(cfg.train.time_budget)
    stats = corpus_stats(data)
    times, dropped, body = (_measure(cfg, rundir, data, env, device, budget, stats)
                            if step_seconds is None else (step_seconds, {}, block_params_of(cfg)))
    world = max(1, env.world_size)
    # every step of the job trains world_size batches: as many steps of one batch, each
    # taking 1/world_size of the time
    per_batch = {name: seconds / world for name, seconds in times.items()}
    choice = choose(load_rule(), (budget - (time.perf_counter() - t0)) * TRAIN_SHARE,
                    per_batch, body, stats,
                    {name: seconds / world for name, seconds in dropped.items()},
                    cfg.train.epoch_order)
    choice = dataclasses.replace(choice, steps=choice.steps // world)
    if choice.steps < MIN_STEPS and env.is_main:
        warn(f"--time {cfg.train.time_budget} buys only about {choice.steps} steps of the "
             f"smallest size, {choice.size.name}, here: too few to learn much; give more time")
    chosen = apply_size(cfg, choice.size, choice.dropout,
                        choice.describe(cfg.train.time_budget))
    spent = time.perf_counter() - t0
    if choice.share < SHORTEN_BELOW:  # more passes would overfit: end early, as planned
        # passes, not seconds, learn a corpus by heart: a machine faster than its timing
        # must not buy more of them
        seconds = spent + (budget - spent) * choice.share
        # never below the steps timed before the first plan, nor above a cap the user gave
        cap = max(choice.steps, CALIBRATION_STEPS + 1)
        cap = min(cap, cfg.train.step_cap) if cfg.train.step_cap else cap
        chosen = apply_overrides(chosen, {"train": {"time_budget": f"{math.ceil(seconds)}s",
                                                    "step_cap": cap}},
                                 f"size {choice.size.name}")
    return chosen, choice, spent

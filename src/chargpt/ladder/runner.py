"""Running the ladder: train every requested rung (once per seed), score it, keep the report fresh.

`run_ladder` prepares the text once, then for each rung and seed trains a run directory
(`OUT/<rung>/seed-<n>`), scores the final weights on whole splits with `evaluate_tokens` (the
full-context measure, and the tiled measure the lecture's figures use) and draws one sample.
The report is rewritten after every rung, so an interrupted ladder still leaves the rungs it
finished; Ctrl-C or SIGTERM during a rung stops the ladder after that rung's checkpoint.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from chargpt.errors import ConfigError
from chargpt.ladder.results import RungResult, SeedResult
from chargpt.ladder.rungs import Budget, Rung, count_params, rung_config


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def train_slice(train, n: int):
    """The last `n` training characters, the ones just before the val split.

    Scoring all of a large train split would cost as much as the training itself; a slice as
    long as the val split measures the fit just as well and keeps the two numbers comparable.
    """
    return train[max(0, len(train) - n):]


def run_seed(rung: Rung, budget: Budget, seed: int, out: Path, data_dir: Path,
             vocab_size: int) -> tuple[SeedResult | None, str, str]:
    """Train and score one run; returns (result or None if interrupted, device, run dir)."""
    from chargpt.runs.run import load_run
    from chargpt.training.launch import new_trainer

    cfg = rung_config(rung, budget, seed=seed, out_dir=out, data_dir=data_dir,
                      vocab_size=vocab_size)
    trainer = new_trainer(cfg, quiet=True)
    trained = trainer.run(time_limit=budget.seconds)
    if trained.interrupted_by is not None:  # the trainer saved last/; stop the ladder here
        return None, trainer.device.type, str(trained.run_dir)
    # The final weights, not the best-on-a-few-batches ones: every rung gets its whole budget.
    run = load_run(trained.run_dir, "last", device=str(trainer.device))
    val, train = trainer.data.val, train_slice(trainer.data.train, len(trainer.data.val))
    result = SeedResult(
        seed=seed, steps=trained.step, seconds=trained.elapsed,
        train_loss=run.evaluate_ids(train, batch_size=256),
        val_loss=run.evaluate_ids(val, batch_size=256),
        val_loss_tiled=run.evaluate_ids(val, batch_size=256, tiled=True),
        run_dir=str(trained.run_dir),
    )
    return result, run.device.type, str(trained.run_dir)


def run_rung(rung: Rung, budget: Budget, out: Path, data_dir: Path,
             vocab_size: int) -> RungResult:
    """Every seed of one rung, then a sample from the first seed's model."""
    from chargpt.runs.run import load_run

    result = RungResult(rung, count_params(rung, vocab_size), reduced=budget.reduced(rung))
    for seed in budget.seeds_for(rung):
        run_dir = out / rung.name / f"seed-{seed}"
        seed_result, result.device, _ = run_seed(rung, budget, seed, run_dir, data_dir,
                                                 vocab_size)
        if seed_result is None:
            result.status = f"interrupted (seed {seed})"
            return result
        result.runs.append(seed_result)
    if budget.sample_chars:
        run = load_run(result.runs[0].run_dir, "last", device="cpu")
        # Recomputing the context keeps exactly block_size characters of history per step.
        result.sample = run.generate("\n", budget.sample_chars, seed=budget.seed,
                                     use_cache=False)
    return result


def run_ladder(
    rungs: Sequence[Rung],
    out: str | Path,
    budget: Budget,
    *,
    input: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> list[RungResult]:
    """Train and score `rungs` on one prepared copy of `input`; write the report into `out`."""
    from chargpt.data.datasets import fetch
    from chargpt.data.preparation import prepare
    from chargpt.data.prepared import load_prepared
    from chargpt.ladder.report import write_report

    out = Path(out)
    budget = dataclasses.replace(budget, cuda=_cuda_available())
    taken = [r.name for r in rungs if (out / r.name).exists()]
    if taken:
        raise ConfigError(f"{out} already holds ladder runs ({', '.join(taken)}); "
                          "choose another --out")
    for r in rungs:  # fail on an impossible config before any data or training work
        rung_config(r, budget)
    source = Path(input) if input else fetch("shakespeare", progress=True)
    data_dir = out / "data"
    prepare(source, data_dir)
    data = load_prepared(data_dir)
    log(f"ladder ({budget.recipe} recipe): {len(rungs)} rung(s) on {source} "
        f"({len(data.train):,} train / {len(data.val):,} val chars) -> {out}")
    results: list[RungResult] = []
    for i, rung in enumerate(rungs, 1):
        t0 = time.perf_counter()
        r = run_rung(rung, budget, out, data_dir, data.vocab_size)
        results.append(r)
        log(_progress_line(i, len(rungs), r, time.perf_counter() - t0))
        write_report(results, out, budget=budget, source=str(source))
        if r.status.startswith("interrupted"):
            log(f"stopped: the ladder was interrupted during {r.rung.name}; the report in "
                f"{out} covers the rungs before it")
            return results
    log(f"wrote {out / 'ladder.md'}, ladder.csv, ladder.json, the curves and samples.md")
    return results


def _progress_line(i: int, n: int, r: RungResult, seconds: float) -> str:
    head = f"[{i}/{n}] {r.rung.name:<13}"
    if not r.ran:
        return f"{head} {r.status}"
    seeds = f"{len(r.runs)} seed{'s' * (len(r.runs) > 1)}"
    return (f"{head} {r.params:>10,} params  val {r.mean('val_loss'):.4f} "
            f"(lecture's measure {r.mean('val_loss_tiled'):.4f})  train "
            f"{r.mean('train_loss'):.4f}  {seeds}, {seconds:.0f}s"
            + (f"  (reduced: {r.rung.note})" if r.reduced else ""))

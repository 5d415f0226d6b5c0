"""Which model size a training-time budget buys best: fast-recipe variants raced side by side.

Each variant is fast-cpu with some config values changed (JSON, `{"name": {"model": {...},
"train": {...}}}`). All variants first run a few interleaved steps to time a step; each then
gets `max_steps = budget / its step time`, so that its whole schedule (warmup, stable phase,
cooldown) fits the budget, and all train in one process, a step of whichever is behind on its
own training clock, so they share the machine's load. The final weights are scored on the
whole val split (`evaluate_tokens`). The training clock counts `Trainer.train_step` only; a
variant whose steps ran slower than its probe ends a little past the budget (the table says
by how much), so compare the val column together with the clock column.

    python benchmarks/size_race.py --seconds 27 [--variants '{"3x96": {"model": {...}}}']

The default variants are fast-cpu (4 layers x 128) and the default preset's 3 x 96 shape.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from time_to_loss import SHAKESPEARE, Evaluator, Run, race  # noqa: E402

from chargpt.config.resolve import resolve_config  # noqa: E402
from chargpt.data.preparation import prepare  # noqa: E402
from chargpt.training.launch import new_trainer  # noqa: E402
from chargpt.training.trainer import Trainer  # noqa: E402

VARIANTS = {"4x128 (fast-cpu)": {}, "3x96": {"model": {"n_layer": 3, "n_embd": 96}}}
PROBE_STEPS = 12  # timed per variant, interleaved, after 3 warm-up steps


def make(variant: dict, data_dir: str, out: Path, max_steps: int, seed: int) -> Trainer:
    train = {"out_dir": str(out), "progress": False, "sample_chars": 0, "seed": seed,
             "max_steps": max_steps, **variant.get("train", {})}
    overrides = {"data": {"data_dir": data_dir}, "train": train}
    if "model" in variant:
        overrides["model"] = variant["model"]
    trainer = new_trainer(resolve_config("fast-cpu", overrides=overrides), quiet=True)
    trainer.model.train()
    return trainer


def step_seconds(variants: dict, data_dir: str, tmp: Path, seed: int) -> dict[str, float]:
    """Seconds per training step of each variant, timed interleaved."""
    probes = {name: make(v, data_dir, tmp / f"probe{i}", 10**6, seed)
              for i, (name, v) in enumerate(variants.items())}
    for trainer in probes.values():
        for _ in range(3):
            trainer.train_step()
    spent = dict.fromkeys(probes, 0.0)
    for _ in range(PROBE_STEPS):
        for name, trainer in probes.items():
            t0 = time.perf_counter()
            trainer.train_step()
            spent[name] += time.perf_counter() - t0
    return {name: s / PROBE_STEPS for name, s in spent.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=27.0, help="training clock per variant")
    ap.add_argument("--variants", type=json.loads, default=VARIANTS)
    ap.add_argument("--input", type=Path, default=SHAKESPEARE)
    ap.add_argument("--seed", type=int, default=1337)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        data_dir = str(Path(tmp) / "data")
        prepare(str(args.input), data_dir)
        per_step = step_seconds(args.variants, data_dir, Path(tmp), args.seed)
        runs = [Run(name, make(v, data_dir, Path(tmp) / f"run{i}",
                               max(1, int(args.seconds / per_step[name])), args.seed))
                for i, (name, v) in enumerate(args.variants.items())]
        race(runs, every=float("inf"))  # snapshots at the start and the end only
        evaluate = Evaluator(runs[0].trainer.data.val, runs[0].trainer.device)
        print(f"budget {args.seconds:g} s of training per variant; val = evaluate_tokens over "
              f"all {len(runs[0].trainer.data.val):,} val characters\n")
        print("| variant | params | steps | ms/step | training clock, s | whole-split val |")
        print("|---|---:|---:|---:|---:|---:|")
        for run in runs:
            tr = run.trainer
            print(f"| {run.preset} | {tr.model.num_params() / 1e6:.2f} M | {tr.step} | "
                  f"{run.clock / tr.step * 1e3:.1f} | {run.clock:.1f} | "
                  f"{evaluate(run, len(run.snapshots) - 1):.4f} |")


if __name__ == "__main__":
    main()

"""The plateau rule and dropout on a small corpus: what each buys, by step count.

A corpus of 60-230 K characters (corpora.py: `wisdom-en`, 61 K, or `poems-en`, 233 K, from
Debian's fortunes package) is too small for the default model's 1,500 steps: it passes over the
training text a dozen times or more, and the val loss turns up long before the end. This trains
the default preset on it for 800 steps (enough for wisdom-en's val loss to turn up by step
500), one run after another, in these variants:

- `default`: the preset as it is (no plateau rule: `patience` 0);
- `patience N`: the plateau rule with patience N (`TrainConfig.patience`);
- `dropout D`: dropout D, with or without the plateau rule;
- `wd W`: weight decay W (under Muon it reaches only the AdamW matrices: the output head).

Every run has the same step count, seed and evaluations (every `--eval-interval` steps), so the
results do not depend on the machine's speed or load. The table gives each run's steps, where
the plateau rule ended it, its best and final val loss as training estimated them, and best/
and last/ scored on the whole val split (every character once, with at least half a block of
context). A second table gives the val loss at each evaluation, from which the step a patience
would stop at can be read.

    python benchmarks/earlystop.py [--corpus wisdom-en] [--steps 800] [--eval-interval 50]
                                   [--variants 'default;patience 4;dropout 0.1, patience 2']

The three default variants take about 15 minutes on a loaded 2-core machine (one torch thread
each: OMP_NUM_THREADS=1 is fastest when other processes share the cores), 5 when it is idle.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import corpora  # noqa: E402

from chargpt.config.resolve import resolve_config  # noqa: E402
from chargpt.data.preparation import prepare  # noqa: E402
from chargpt.data.prepared import load_prepared  # noqa: E402
from chargpt.runs.run import load_run  # noqa: E402
from chargpt.runs.rundir import RunDir  # noqa: E402
from chargpt.training.launch import train  # noqa: E402

VARIANTS = ("default", "patience 2", "dropout 0.1")


def overrides_of(variant: str) -> dict[str, dict[str, float]]:
    """'dropout 0.1, patience 2' -> {"model": {"dropout": 0.1}, "train": {"patience": 2}}."""
    out: dict[str, dict[str, float]] = {"model": {}, "train": {}}
    for part in filter(None, (p.strip() for p in variant.split(","))):
        if part == "default":
            continue
        key, value = part.split()
        if key == "dropout":
            out["model"]["dropout"] = float(value)
        elif key == "patience":
            out["train"]["patience"] = int(value)
        elif key == "wd":
            out["train"]["weight_decay"] = float(value)
        else:
            raise SystemExit(f"unknown variant part {part!r} (dropout, patience, wd)")
    return out


def run_variant(variant: str, data_dir: Path, out: Path, args: argparse.Namespace) -> dict:
    changes = overrides_of(variant)
    cfg = resolve_config(overrides={
        "data": {"data_dir": str(data_dir)},
        "model": changes["model"],
        "train": {"out_dir": str(out), "max_steps": args.steps, "seed": args.seed,
                  "eval_interval": args.eval_interval, "eval_iters": args.eval_iters,
                  "progress": False, "sample_chars": 0, **changes["train"]},
    })
    t0 = time.perf_counter()
    result = train(cfg, quiet=True)
    seconds = time.perf_counter() - t0
    rundir = RunDir(out)
    evals = [r for r in rundir.read_metrics() if r.get("kind") == "eval"]
    best = min(evals, key=lambda r: r["val_loss"])
    val = load_prepared(data_dir).val
    whole = {name: load_run(out, name, device="cpu").evaluate_ids(val, batch_size=256)
             for name in ("best", "last")}
    return {"variant": variant, "steps": result.step,
            "plateau": rundir.read_config().train.plateau_step, "best": best["val_loss"],
            "best_step": best["step"], "final": evals[-1]["val_loss"],
            "final_train": evals[-1]["train_loss"], "whole_best": whole["best"],
            "whole_last": whole["last"], "seconds": seconds,
            "curve": {r["step"]: r["val_loss"] for r in evals}}


def print_tables(rows: list[dict], corpus: Path, args: argparse.Namespace) -> None:
    text = corpus.read_text(encoding="utf-8")
    print(f"corpus {args.corpus}: {len(text):,} characters; the default preset, "
          f"{args.steps} steps, an evaluation of {args.eval_iters} batches per split every "
          f"{args.eval_interval} steps, seed {args.seed}; "
          f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC\n")
    print("| variant | steps | plateau at | best val (step) | final val | final train | "
          "whole-split best/ | whole-split last/ | seconds |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['variant']} | {r['steps']} | {r['plateau'] or '-'} | "
              f"{r['best']:.4f} ({r['best_step']}) | {r['final']:.4f} | {r['final_train']:.4f} | "
              f"{r['whole_best']:.4f} | {r['whole_last']:.4f} | {r['seconds']:.0f} |")
    steps = sorted({s for r in rows for s in r["curve"]})
    print("\nval loss at each evaluation\n")
    print("| step | " + " | ".join(r["variant"] for r in rows) + " |")
    print("|---:|" + "---:|" * len(rows))
    for s in steps:
        cells = [f"{r['curve'][s]:.4f}" if s in r["curve"] else "" for r in rows]
        print(f"| {s} | " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default="wisdom-en", choices=sorted(corpora.CORPORA))
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--eval-interval", type=int, default=50)
    parser.add_argument("--eval-iters", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--variants", default=";".join(VARIANTS),
                        help="variants separated by ';', e.g. 'default;patience 2'")
    args = parser.parse_args(argv)
    corpus = corpora.fetch(args.corpus)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "data"
        prepare(corpus, data_dir)
        rows = []
        for i, variant in enumerate(v.strip() for v in args.variants.split(";")):
            rows.append(run_variant(variant, data_dir, Path(tmp) / f"run{i}", args))
            print(f"# {variant}: {rows[-1]['seconds']:.0f} s", file=sys.stderr, flush=True)
        print_tables(rows, corpus, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Fine-tuning against training from scratch, on a small corpus, at the same time budgets.

The source is the default run on Tiny Shakespeare (`chargpt train`, 1,500 steps). The target
is `poems-en` (English songs and poems, 233 K characters, from Debian's fortunes package; see
corpora.py). For each budget this trains, one after another on an idle machine:

- `scratch`: `chargpt train --input poems-en.txt --time B` (the default preset);
- `ft xS`: `chargpt train --init-from SOURCE --input poems-en.txt --time B` with the preset's
  learning rates times S (S = 0.3 is what `--init-from` uses unless rates are given);
- `ft zero rows`: the same at S = 0.3, with the new characters' rows started at zero
  instead of the mean of the old rows;
- `ft frozen emb`: the same at S = 0.3, with the token embeddings frozen.

Every model is scored on the whole val split of poems-en (chargpt's sliding-window measure:
every character predicted once, with at least half a block of context), and the fine-tunes also
on the whole val split of Tiny Shakespeare (what was forgotten). Val-loss curves go to
`--plot`.

    python benchmarks/finetune.py [--budgets 30s,2m] [--scales 1,0.3,0.1] [--out DIR]
                                  [--no-variants] [--plot PNG]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import corpora  # noqa: E402

from chargpt.config.resolve import resolve_config  # noqa: E402
from chargpt.config.schema import apply_overrides  # noqa: E402
from chargpt.runs.run import load_run  # noqa: E402
from chargpt.runs.rundir import RunDir  # noqa: E402
from chargpt.training import finetune  # noqa: E402
from chargpt.training.launch import train  # noqa: E402

QUIET = {"progress": False, "sample_chars": 0}


def source_run(out: Path) -> Path:
    """The default run on Tiny Shakespeare (trained once, then reused)."""
    run = out / "source"
    if not (run / "best").is_dir():
        cfg = resolve_config(None, None, {"train": {"out_dir": str(run), **QUIET}})
        finished(train(cfg, quiet=True))
    return run


def finished(result):
    """`result`, unless its run was interrupted (then the benchmark stops: no half-run rows)."""
    if result.interrupted_by is not None:
        raise SystemExit(f"{result.run_dir} was interrupted (signal {result.interrupted_by})")
    return result


def finetune_cfg(source: Path, corpus: Path, run: Path, budget: str, scale: float):
    given = {"train": {"init_from": str(source)}}
    cfg = resolve_config(None, None, {"data": {"input": str(corpus)}, "train": {
        "out_dir": str(run), "time_budget": budget, "init_from": str(source), **QUIET}})
    with finetune.source(source) as src:
        cfg = finetune.finetune_config(cfg, src.config, source, given)
    rates = {k: getattr(cfg.train, k) / finetune.LR_SCALE * scale for k in finetune.LR_FIELDS}
    return apply_overrides(cfg, {"train": rates}, "benchmark")


def zero_rows(weights, shapes, old_vocab):
    out = REAL_GROWN(weights, shapes, old_vocab)
    for name, w in out.items():
        if w.shape[0] > old_vocab and weights[name].shape[0] == old_vocab:
            w[old_vocab:] = 0
    return out


def frozen_embeddings(model, src):
    REAL_LOAD(model, src)
    model.transformer.wte.weight.requires_grad_(False)


REAL_GROWN, REAL_LOAD = finetune.grown, finetune.load_source_weights


def patched(name: str, replacement: Callable) -> Callable[[Callable], Callable]:
    """Run the wrapped call with `finetune.<name>` replaced (a benchmark variant)."""
    def wrap(fn: Callable) -> Callable:
        def run(*args, **kwargs):
            setattr(finetune, name, replacement)
            try:
                return fn(*args, **kwargs)
            finally:
                setattr(finetune, name, {"grown": REAL_GROWN,
                                         "load_source_weights": REAL_LOAD}[name])
        return run
    return wrap


def score(run: Path, ids) -> float:
    model = load_run(run, device="cpu")
    return model.evaluate_ids(ids, batch_size=256)


def loss_curve(run: Path) -> list[tuple[float, float]]:
    """(seconds, training loss on the new text) at each log step: a budget run evaluates only
    a few times, so its val loss is too sparse to draw."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["elapsed"], r["loss"]) for r in rows if r.get("kind") == "train"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", default="30s,2m")
    parser.add_argument("--scales", default="1,0.3,0.1")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=Path("docs/images/finetune_curves.png"))
    parser.add_argument("--no-variants", action="store_true",
                        help="only scratch and the learning-rate scales (no zero rows, frozen)")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="chargpt-finetune-"))
    torch.manual_seed(0)
    source = source_run(out)
    corpus = corpora.fetch("poems-en")
    shakespeare = RunDir(source).load_data(RunDir(source).read_config())
    src_model = load_run(source, device="cpu")
    old_before = src_model.evaluate_ids(shakespeare.val, batch_size=256)
    print(f"source: {source} | Tiny Shakespeare val {old_before:.4f} | target {corpus}")
    print("| budget | run | seconds | poems-en val | Shakespeare val (source "
          f"{old_before:.4f}) |\n|---|---|---|---|---|")
    curves = {}
    for budget in args.budgets.split(","):
        variants: list[tuple[str, Callable[[], object]]] = []
        scratch = out / f"{budget}-scratch"
        variants.append(("scratch", lambda run=scratch, b=budget: train(resolve_config(
            None, None, {"data": {"input": str(corpus)},
                         "train": {"out_dir": str(run), "time_budget": b, **QUIET}}),
            quiet=True)))
        for s in map(float, args.scales.split(",")):
            run = out / f"{budget}-ft-{s}"
            variants.append((f"ft x{s:g}", lambda run=run, b=budget, s=s: train(
                finetune_cfg(source, corpus, run, b, s), quiet=True)))
        extras = () if args.no_variants else (
            ("ft zero rows", "grown", zero_rows),
            ("ft frozen emb", "load_source_weights", frozen_embeddings))
        for name, patch, fn in extras:
            run = out / f"{budget}-{name.replace(' ', '-')}"
            variants.append((name, patched(patch, fn)(
                lambda run=run, b=budget: train(finetune_cfg(source, corpus, run, b, 0.3),
                                                quiet=True))))
        for name, go in variants:
            t0 = time.perf_counter()
            result = finished(go())
            seconds = time.perf_counter() - t0
            run = result.run_dir
            data = RunDir(run).load_data(RunDir(run).read_config())
            new = score(run, data.val)
            old = "" if name == "scratch" else f"{score(run, shakespeare.val):.4f}"
            print(f"| {budget} | {name} | {result.elapsed:.1f} ({seconds:.0f} wall) | "
                  f"{new:.4f} | {old} |", flush=True)
            curves[f"{budget} {name}"] = loss_curve(run)
    plot(curves, args.plot)
    print(f"curves: {args.plot}; runs: {out}")
    return 0


def plot(curves: dict[str, list[tuple[float, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = sorted({k.split(" ", 1)[0] for k in curves})
    fig, axes = plt.subplots(1, len(budgets), figsize=(6 * len(budgets), 4), squeeze=False)
    for ax, budget in zip(axes[0], budgets, strict=True):
        for key, points in curves.items():
            if key.startswith(budget + " ") and points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, marker=".", label=key.split(" ", 1)[1])
        ax.set(title=f"poems-en, --time {budget}", xlabel="seconds of training",
               ylabel="training loss (nats/char, mean of 10 steps)")
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    sys.exit(main())

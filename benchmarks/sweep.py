"""The sizing sweep: each model size of `config/sizing.json` trained on several corpora for
several token counts, the measurements the automatic model choice is fitted to.

Every run is the fast recipe at one of the package's sizes, trained to a STEP count (a whole
WSD schedule ending at `tokens / (batch * block)` steps), so its loss does not depend on how
busy the machine was: a time budget is turned into tokens later, per machine, from the step
times measured there (config/sizing.py). Each run appends one JSON line to `--out`: the corpus
(characters, training tokens, vocabulary, lzma bits per character), the size (parameters,
batch, block), the steps and tokens, the best and final val loss (chargpt's training estimate:
the mean over every position of `eval_iters` random val blocks, as nanoGPT scores), the final
train loss, and the wall time (informative only: the machine may have been shared). A run
already in `--out` is skipped, so the sweep can be stopped and continued.

    python benchmarks/sweep.py --corpus shakespeare wisdom-en --sizes 3x96 4x128 \\
        --tokens 0.5M 2M [--max-minutes 6] [--dropout 0 0.1] [--block 128]

Corpora: `shakespeare` is Tiny Shakespeare (../shared/data/tinyshakespeare.txt, or the copy in
chargpt's cache, or downloaded); the others are benchmarks/corpora.py's Debian packages.
`--data-order random` draws the batches as random windows instead of the recipe's epoch order
(the line records the order; lines without one, from before 2026-12-05 21:00, were random).
`--max-minutes` skips a run whose expected time (from a probe of its step time) is longer.
`--block` trains the sizes at another block size than their own (the line records it), which
separates what a longer context is worth from what a larger model is; `--batch` with it keeps
the tokens of a step (a longer block at half the batch), so the runs take as many steps.
Then `python benchmarks/fit_sizing.py` fits the forecast and writes it into the package.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from corpora import CORPORA, fetch  # noqa: E402

from chargpt.config.resolve import resolve_config  # noqa: E402
from chargpt.config.sizing import block_params, load_rule  # noqa: E402
from chargpt.data.preparation import prepare  # noqa: E402
from chargpt.data.prepared import load_prepared  # noqa: E402
from chargpt.data.stats import corpus_stats  # noqa: E402
from chargpt.training.launch import new_trainer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EVALS = 4  # evaluations per run, the last at its last step
EVAL_ITERS = 20


def corpus_path(name: str) -> Path:
    if name != "shakespeare":
        return fetch(name)
    from chargpt.data.datasets import cache_dir
    from chargpt.data.datasets import fetch as fetch_named

    for path in (ROOT.parent / "shared/data/tinyshakespeare.txt",
                 cache_dir() / "tinyshakespeare.txt"):
        if path.is_file():
            return path
    return fetch_named("shakespeare")


def parse_tokens(text: str) -> int:
    scale = {"K": 1e3, "M": 1e6, "G": 1e9}.get(text[-1:].upper(), 1)
    return int(float(text[:-1] if scale != 1 else text) * scale)


def config(size, data_dir: str, out: Path, steps: int, dropout: float, dtype: str = "auto",
           order: str = ""):
    train = {**size.train, "out_dir": str(out), "progress": False, "sample_chars": 0,
             "dtype": dtype, **({"data_order": order} if order else {}),
             "max_steps": steps, "eval_interval": max(1, steps // EVALS),
             "eval_iters": EVAL_ITERS, "warmup_steps": min(50, steps // 10)}
    return resolve_config(size.base_preset, overrides={
        "data": {"data_dir": data_dir}, "model": {**size.model, "dropout": dropout},
        "train": train})


def probe_seconds(size, data_dir: str, tmp: Path) -> float:
    """Seconds per step of `size` here, from 4 steps after 2 warm-up steps."""
    trainer = new_trainer(config(size, data_dir, tmp / f"probe-{size.name}", 10**6, 0.0),
                          quiet=True)
    trainer.model.train()
    for _ in range(2):
        trainer.train_step()
    t0 = time.perf_counter()
    for _ in range(4):
        trainer.train_step()
    return (time.perf_counter() - t0) / 4


def one_run(size, corpus: dict, data_dir: str, out: Path, tokens: int, dropout: float,
            dtype: str = "auto", order: str = "") -> dict:
    per_step = size.train["batch_size"] * size.model["block_size"]
    steps = max(20, round(tokens / per_step))
    t0 = time.perf_counter()
    trainer = new_trainer(config(size, data_dir, out, steps, dropout, dtype, order),
                          quiet=True)
    result = trainer.run()
    seconds = time.perf_counter() - t0
    if result.interrupted_by is not None or result.step != steps:
        raise SystemExit(f"{out.name} stopped at step {result.step} of {steps}; not recorded")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "val_loss" in r]
    return {**corpus, "size": size.name, "params": trainer.model.num_params(),
            "body_params": block_params(trainer.model), "batch": size.train["batch_size"],
            "block": size.model["block_size"], "dropout": dropout, "steps": steps,
            "dtype": trainer.cfg.train.dtype, "data_order": trainer.cfg.train.data_order,
            "tokens": steps * per_step, "best_val": result.best_val_loss,
            "final_val": result.last_val_loss, "final_train": evals[-1].get("train_loss"),
            "seconds": round(seconds, 1), "date": datetime.date.today().isoformat(),
            "torch": torch.__version__, "machine": platform.processor() or platform.machine()}


def with_block(size, block: int, batch: int = 0):
    """`size` reading blocks of `block` characters, `batch` of them a step (its own when 0)."""
    if block:
        size = dataclasses.replace(size, model={**size.model, "block_size": block})
    if batch:
        size = dataclasses.replace(size, train={**size.train, "batch_size": batch})
    return size


def main() -> int:
    rule = load_rule()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", nargs="+", default=["shakespeare"],
                    choices=["shakespeare", *CORPORA])
    ap.add_argument("--sizes", nargs="+", default=[s.name for s in rule.sizes[:5]],
                    choices=[s.name for s in rule.sizes])
    ap.add_argument("--tokens", nargs="+", default=["0.5M", "2M"], help="e.g. 500K 2M 8M")
    ap.add_argument("--dropout", nargs="+", type=float, default=[0.0])
    ap.add_argument("--max-minutes", type=float, default=12.0)
    ap.add_argument("--block", type=int, default=0,
                    help="train every size at this block size (0: each size's own)")
    ap.add_argument("--batch", type=int, default=0,
                    help="and this many blocks a step (0: each size's own)")
    ap.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16"],
                    help="training precision; most of the fitted runs are float32")
    ap.add_argument("--data-order", default="", choices=["", "random", "epoch"],
                    help="the batches' order (default: the recipe's, the sizes' base preset's)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/sweep.jsonl")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads (0: torch's default); 1 on a shared machine, where "
                         "threads that wait for each other at every operation stall")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    done = set()
    if args.out.exists():
        for line in args.out.read_text().splitlines():
            r = json.loads(line)
            done.add((r["corpus"], r["size"], r["block"], r["batch"], r["tokens"], r["dropout"],
                      r.get("data_order", "random")))  # rows before 2026-12-05 21:00: random
    sizes = {s.name: with_block(s, args.block, args.batch) for s in rule.sizes}
    for name in args.corpus:
        with tempfile.TemporaryDirectory() as tmp:
            data_dir = str(Path(tmp) / "data")
            prepare(str(corpus_path(name)), data_dir)
            data = load_prepared(data_dir)
            stats = corpus_stats(data)
            corpus = {"corpus": name, "train_tokens": stats.train_tokens,
                      "val_tokens": len(data.val), "vocab": stats.vocab_size,
                      "lzma_bpc": round(stats.bits_per_char, 4)}
            for size_name in args.sizes:
                size = sizes[size_name]
                per_step = size.train["batch_size"] * size.model["block_size"]
                todo = [(parse_tokens(t), d) for t in args.tokens for d in args.dropout]
                order = args.data_order or resolve_config(size.base_preset).train.data_order
                todo = [(t, d) for t, d in todo
                        if (name, size_name, size.model["block_size"], size.train["batch_size"],
                            max(20, round(t / per_step)) * per_step, d, order) not in done]
                if not todo:
                    continue
                step_s = probe_seconds(size, data_dir, Path(tmp))
                for tokens, dropout in todo:
                    expected = tokens / per_step * step_s / 60
                    if expected > args.max_minutes:
                        print(f"skip {name} {size_name} {tokens:,} tokens: ~{expected:.0f} min",
                              flush=True)
                        continue
                    out = Path(tmp) / f"run-{size_name}-{per_step}-{tokens}-{dropout}"
                    record = one_run(size, corpus, data_dir, out, tokens, dropout, args.dtype,
                                     args.data_order)
                    with args.out.open("a") as f:
                        f.write(json.dumps(record) + "\n")
                    print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

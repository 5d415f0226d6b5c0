"""Does a corpus's repeats within reach tell what a longer block is worth on it?

`benchmarks/results/context.jsonl` holds runs of a size at blocks of 128 and batches of 8
against the same size at 64 x 16 (same tokens a step, same steps; the 64 x 16 runs are in
`context.jsonl` or the sweep's `sweep.jsonl`): on de the longer block gains 0.06, on Tiny
Shakespeare it costs 0.03. A longer block lets a model copy what it read a little further
back, so this script measures, for every corpus of those runs, how many more of its characters
a model could copy at blocks of 128 than at 64: the share of positions whose last `k`
characters (the predicted one among them) occurred before within the characters a position of
the block sees, averaged over the block's positions. It prints that share, on the training
split (twenty 50 K-character pieces spread through it, what a forecast could afford to read)
and on the val split (what the runs were scored on), beside each corpus's measured difference,
and the rank correlation of each column with it:

    python benchmarks/context_worth.py              # the corpora benchmarks/corpora.py fetches

The corpora are fetched as `benchmarks/corpora.py` fetches them, Tiny Shakespeare from
chargpt's cache (`chargpt train` downloads it).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
from sweep import corpus_path

from chargpt.data.preparation import prepare
from chargpt.data.prepared import load_prepared

RESULTS = Path(__file__).resolve().parent / "results"
PILOT_STEPS = 200  # runs shorter than this are the 195-step pilot, not a corpus's measure
PIECES, PIECE = 20, 50_000  # the training split's sample: pieces spread through it


def reachable(text: str, k: int, block: int) -> float:
    """The share of positions of `text` whose `k`-gram ending there (the predicted character
    its last) occurred, whole, among the characters before it that a position of a block of
    `block` sees, averaged over the block's positions (a position at offset c sees c
    characters)."""
    last: dict[str, int] = {}
    total = 0.0
    for t in range(k - 1, len(text)):
        gram = text[t - k + 1:t + 1]
        start = last.get(gram)  # its latest occurrence ends before t: t - start >= k
        if start is not None:
            total += max(0, block - (t - start)) / block  # offsets c >= t - start reach it
        last[gram] = t - k + 1
    return total / max(1, len(text) - k + 1)


def gained(text: str, k: int, block: int = 128, reference: int = 64) -> float:
    """How much more of `text` is within reach at blocks of `block` than of `reference`."""
    return reachable(text, k, block) - reachable(text, k, reference)


def spread_sample(text: str) -> list[str]:
    """`PIECES` pieces of `PIECE` characters spread evenly through `text` (all of it if
    shorter): fortune files join collections of different kinds, so the first 50 K
    characters can be unlike the rest."""
    if len(text) <= PIECES * PIECE:
        return [text]
    step = (len(text) - PIECE) // (PIECES - 1)
    return [text[i * step:i * step + PIECE] for i in range(PIECES)]


def differences() -> dict[str, tuple[float, float, float]]:
    """Per corpus, the 4x128 pair read the fewest times past the pilot: (passes, best val at
    64 x 16, best val at 128 x 8 minus it)."""
    rows = [json.loads(line) for name in ("sweep.jsonl", "context.jsonl")
            for line in (RESULTS / name).read_text().splitlines() if line.strip()]
    plain = [r for r in rows if r.get("data_order", "random") == "random" and not r["dropout"]]
    pairs: dict[str, tuple[float, float, float]] = {}
    for long in (r for r in plain if (r["block"], r["batch"]) == (128, 8)):
        if long["size"] != "4x128" or long["steps"] < PILOT_STEPS:
            continue
        short = next((r for r in plain if (r["block"], r["batch"]) == (64, 16)
                      and (r["corpus"], r["size"], r["tokens"])
                      == (long["corpus"], long["size"], long["tokens"])), None)
        passes = long["tokens"] / long["train_tokens"]
        if short and (long["corpus"] not in pairs or passes < pairs[long["corpus"]][0]):
            pairs[long["corpus"]] = (passes, short["best_val"],
                                     long["best_val"] - short["best_val"])
    return pairs


def splits(corpus: str) -> tuple[str, str]:
    """The corpus's training and val splits, as `chargpt prepare` splits it."""
    with tempfile.TemporaryDirectory() as tmp:
        prepare(str(corpus_path(corpus)), Path(tmp) / "data")
        data = load_prepared(Path(tmp) / "data")
        return (data.tokenizer.decode(data.train.tolist()),
                data.tokenizer.decode(data.val.tolist()))


def ranks(values: list[float]) -> np.ndarray:
    return np.argsort(np.argsort(values)).astype(float)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grams", type=int, nargs="+", default=[8, 16],
                        help="lengths k of the repeats counted")
    args = parser.parse_args()
    pairs = differences()
    print("| corpus | passes | best val, 64 x 16 | 128 x 8 - 64 x 16 | "
          + " | ".join(f"k={k} train | k={k} val | k={k} val x loss" for k in args.grams) + " |")
    print("|---|---:|---:|---:|" + "---:|---:|---:|" * len(args.grams))
    columns: dict[str, list[float]] = {}
    order = sorted(pairs, key=lambda c: pairs[c][2])
    for corpus in order:
        passes, loss, diff = pairs[corpus]
        train, val = splits(corpus)
        cells = []
        for k in args.grams:
            on_train = float(np.mean([gained(p, k) for p in spread_sample(train)]))
            on_val = gained(val, k)
            for name, value in ((f"k={k} train", on_train), (f"k={k} val", on_val),
                                (f"k={k} val x loss", on_val * loss)):
                columns.setdefault(name, []).append(value)
                cells.append(f"{value:.4f}")
        print(f"| {corpus} | {passes:.1f} | {loss:.4f} | {diff:+.4f} | " + " | ".join(cells)
              + " |", flush=True)
    measured = [pairs[c][2] for c in order]
    print("\nrank correlation with 128 x 8 - 64 x 16 (all corpora; without zh):")
    keep = [i for i, c in enumerate(order) if c != "zh"]
    for name, values in columns.items():
        every = np.corrcoef(ranks(values), ranks(measured))[0, 1]
        some = np.corrcoef(ranks([values[i] for i in keep]),
                           ranks([measured[i] for i in keep]))[0, 1]
        print(f"  {name}: {every:+.2f}; {some:+.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

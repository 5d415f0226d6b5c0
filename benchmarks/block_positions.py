"""What the val estimate gives a longer block: a model at two blocks, scored three ways.

chargpt's training estimate (and the sweep's) is the mean loss over every position of random
val blocks. Two models of one size at the same tokens a step and the same steps, one at blocks
of 128 and batches of 8, one at 64 x 16, differ by that estimate in two ways that are not
what the longer block is worth: the windows drawn differ (`--redraws` measures how much a
20-batch estimate moves with them), and half the positions of a block of 128 see more than
63 characters, which no position of a block of 64 does. So each pair is also scored position
by position on the same val characters (past position 63 the block-64 model gets the most it
takes, a window of 64 ending there) and on every character of the val split once
(whole-split, the same characters for both). After the two spreads, the first column is the
128 x 8 model at its positions 64-127 less at its 0-63; the rest are the 128 x 8 model less
the 64 x 16 one:

    python benchmarks/block_positions.py --corpus de shakespeare es pl --steps 781
    python benchmarks/block_positions.py --corpus de --steps 1953 --windows 1024

Each model is `chargpt train --size SIZE --block-size B --batch-size b --max-steps STEPS
--data-order random`, kept in `--runs` so a second call scores without training again. The
corpora are fetched as `benchmarks/corpora.py` fetches them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from sweep import corpus_path

from chargpt.cli import main as chargpt
from chargpt.data.prepared import load_prepared
from chargpt.runs.run import Run, load_run

SHAPES = ((64, 16), (128, 8))  # (block, batch): the same tokens a step
EVAL_ITERS = 20  # the sweep's estimate: batches per evaluation


def trained(corpus: str, size: str, block: int, batch: int, steps: int, runs: Path) -> Path:
    """The run directory of `size` at `block` x `batch` for `steps` on `corpus`, trained if
    `runs` does not hold it yet."""
    out = runs / f"{corpus}-{size}-{block}x{batch}-{steps}"
    if not (out / "best").is_dir():
        code = chargpt(["train", "--input", str(corpus_path(corpus)), "--size", size,
                        "--block-size", str(block), "--batch-size", str(batch),
                        "--max-steps", str(steps), "--data-order", "random",
                        "--sample-chars", "0", "--seed", "1337", "--out", str(out)])
        if code:
            raise SystemExit(code)
    return out


def losses(run: Run, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy (N, T) of `run`'s model at every position of windows `x` (N, T)."""
    with torch.inference_mode():
        logits, _ = run.model(x)  # (N, T, vocab)
        return F.cross_entropy(logits.float().transpose(1, 2), y, reduction="none")


def redrawn_spread(run: Run, val: torch.Tensor, block: int, batch: int, redraws: int) -> float:
    """The standard deviation of a 20-batch estimate over `redraws` draws of its windows."""
    g = torch.Generator().manual_seed(0)
    means = []
    for _ in range(redraws):
        starts = torch.randint(0, len(val) - block - 1, (EVAL_ITERS * batch,), generator=g)
        x = torch.stack([val[s:s + block] for s in starts])  # (N, block)
        y = torch.stack([val[s + 1:s + block + 1] for s in starts])
        means.append(losses(run, x, y).mean().item())
    return torch.tensor(means).std().item()


def by_position(short: Run, long: Run, val: torch.Tensor, windows: int) -> dict[str, float]:
    """Both models on the same `windows` val windows: the long model at its positions 64-127
    less at its 0-63 (what its mean over positions gains from the later ones), and the long
    model less the short one at positions 0-63 (the same context), at 64-127 (against the
    short model's 63 characters), and as each model's mean over its own block's positions."""
    s, b = SHAPES[0][0], SHAPES[1][0]
    g = torch.Generator().manual_seed(0)
    starts = torch.randint(s, len(val) - b - 1, (windows,), generator=g)
    win = torch.stack([val[t - s:t + b + 1] for t in starts])  # (N, s + b + 1): history first
    full = losses(long, win[:, s:s + b], win[:, s + 1:s + b + 1])  # (N, b)
    first = losses(short, win[:, s:2 * s], win[:, s + 1:2 * s + 1])  # (N, s)
    late = torch.stack([losses(short, win[:, p + 1:p + s + 1], win[:, p + 2:p + s + 2])[:, -1]
                        for p in range(s, b)], 1)  # (N, b - s): a window of s ending at p
    return {"own late - early": (full[:, s:].mean() - full[:, :s].mean()).item(),
            "same context": (full[:, :s].mean() - first.mean()).item(),
            "past 63": (full[:, s:].mean() - late.mean()).item(),
            "position mean": (full.mean() - first.mean()).item()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", nargs="+", default=["de", "shakespeare", "es", "pl"])
    parser.add_argument("--size", default="4x128")
    parser.add_argument("--steps", type=int, default=781)
    parser.add_argument("--windows", type=int, default=256)
    parser.add_argument("--redraws", type=int, default=40)
    parser.add_argument("--runs", type=Path, default=Path("runs/block_positions"))
    args = parser.parse_args()
    print("| corpus | steps | 20-batch sd, 64 x 16 | 20-batch sd, 128 x 8 | 128 x 8's 64-127 "
          "less 0-63 | positions 0-63 | positions 64-127 | position mean | whole-split |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for corpus in args.corpus:
        dirs = [trained(corpus, args.size, block, batch, args.steps, args.runs)
                for block, batch in SHAPES]
        runs = [load_run(d, device="cpu") for d in dirs]
        val = torch.as_tensor(load_prepared(dirs[0] / "data").val[:].astype("int64"))
        spread = [redrawn_spread(r, val, block, batch, args.redraws)
                  for r, (block, batch) in zip(runs, SHAPES, strict=True)]
        diff = by_position(runs[0], runs[1], val, args.windows)
        whole = runs[1].evaluate_ids(val.numpy()) - runs[0].evaluate_ids(val.numpy())
        print(f"| {corpus} | {args.steps} | {spread[0]:.3f} | {spread[1]:.3f} | "
              f"{diff['own late - early']:+.3f} | {diff['same context']:+.3f} | "
              f"{diff['past 63']:+.3f} | "
              f"{diff['position mean']:+.3f} | {whole:+.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

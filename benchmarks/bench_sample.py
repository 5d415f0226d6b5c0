"""Sampling speed with and without the KV cache, on randomly initialised GPTs.

Generates a fixed number of characters from a one-character prompt for each model size, once
with `use_cache=True` and once with full recomputation, and prints a Markdown table of
characters per second. Random weights sample as fast as trained ones, so no checkpoint is
needed. Run: `python benchmarks/bench_sample.py [--model small|large|both] [--chars N]`.
"""

from __future__ import annotations

import argparse
import time

import torch

from chargpt.config import ModelConfig
from chargpt.model import build_model
from chargpt.sampling import generate

MODELS = {
    "small": ModelConfig(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128),
    "large": ModelConfig(vocab_size=65, block_size=256, n_layer=6, n_head=6, n_embd=384),
}


def chars_per_second(model: torch.nn.Module, n_chars: int, use_cache: bool, seed: int) -> float:
    idx = torch.zeros(1, 1, dtype=torch.long)
    generate(model, idx, 8, use_cache=use_cache)  # warm-up: first-call allocations
    rng = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    generate(model, idx, n_chars, use_cache=use_cache, generator=rng)
    return n_chars / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=[*MODELS, "both"], default="both")
    parser.add_argument("--chars", type=int, default=2000, help="characters to generate")
    parser.add_argument("--seed", type=int, default=1337)
    args = parser.parse_args(argv)

    names = list(MODELS) if args.model == "both" else [args.model]
    rows = []
    for name in names:
        torch.manual_seed(args.seed)
        model = build_model(MODELS[name])
        cached = chars_per_second(model, args.chars, True, args.seed)
        recompute = chars_per_second(model, args.chars, False, args.seed)
        cfg = model.config
        label = f"{name} ({cfg.n_layer}L {cfg.n_head}H {cfg.n_embd}d, {model.num_params():,} p)"
        rows.append((label, cfg.block_size, cached, recompute))

    print(f"{args.chars} characters, batch 1, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}\n")
    print("| model | block_size | chars/s cached | chars/s recompute | speedup |")
    print("|---|---:|---:|---:|---:|")
    for label, block_size, cached, recompute in rows:
        print(f"| {label} | {block_size} | {cached:,.0f} | {recompute:,.0f} | "
              f"{cached / recompute:.1f}x |")


if __name__ == "__main__":
    main()

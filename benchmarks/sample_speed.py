"""Sampling speed with the KV cache and with full recomputation, on randomly initialised GPTs.

Generates `--chars` characters (default 2,000) from a one-character prompt, batch 1, for a
block-64 model (the default size) and a block-256 model (the lecture's size), each once with
`use_cache=True` and once recomputing the last block_size characters every step, and prints
a Markdown table of characters per second. Both models are rotary (`pos_emb = "rope"`, the
fast recipe), whose cache rolls; `--pos-emb learned` measures the classic models, whose
cache is refilled from half a block when full. Random weights sample as fast as trained ones.

    python benchmarks/sample_speed.py [--model small|large|both] [--chars 2000] [--compile]
                                      [--no-native] [--weights bfloat16]

The cached rate is the native C loop's (the default, with `--weights` as `chargpt sample`
takes it), or with `--no-native` the torch step's.

benchmarks/speed.py puts these rates next to the machine's limits.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from chargpt.config.schema import ModelConfig
from chargpt.generation.loop import generate
from chargpt.model.build import build_model

MODELS = {
    "small": ModelConfig(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128),
    "large": ModelConfig(vocab_size=65, block_size=256, n_layer=6, n_head=6, n_embd=384),
}


def chars_per_second(model: torch.nn.Module, n_chars: int, use_cache: bool, seed: int,
                     batch_size: int = 1, compile: bool = False, native: bool = True,
                     weight_format: str = "float32") -> float:
    """New characters per second (all sequences of the batch counted) for one `generate`."""
    idx = torch.zeros(batch_size, 1, dtype=torch.long)
    options = dict(use_cache=use_cache, compile=compile, native=native)
    if use_cache and native:
        options["weight_format"] = weight_format
    # warm-up: first-call allocations, the build of the native loop, a compiled step's compiling
    generate(model, idx, 8, **options)
    rng = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    generate(model, idx, n_chars, generator=rng, **options)
    return batch_size * n_chars / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=[*MODELS, "both"], default="both")
    parser.add_argument("--chars", type=int, default=2000, help="characters to generate")
    parser.add_argument("--pos-emb", choices=["rope", "learned"], default="rope")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--compile", action="store_true", help="the compiled torch step")
    parser.add_argument("--no-native", action="store_true",
                        help="the torch step instead of the native C loop")
    parser.add_argument("--weights", dest="weight_format", default="float32", metavar="KIND",
                        help="precision of the native loop's weight matrices (or bfloat16)")
    args = parser.parse_args(argv)

    names = list(MODELS) if args.model == "both" else [args.model]
    rows = []
    for name in names:
        torch.manual_seed(args.seed)
        cfg = dataclasses.replace(MODELS[name], pos_emb=args.pos_emb)
        model = build_model(cfg)
        cached = chars_per_second(model, args.chars, True, args.seed, args.batch_size,
                                  args.compile, not args.no_native, args.weight_format)
        recompute = chars_per_second(model, args.chars, False, args.seed, args.batch_size)
        label = (f"{name} ({cfg.n_layer}L {cfg.n_head}H {cfg.n_embd}d, {cfg.pos_emb}, "
                 f"{model.num_params():,} p)")
        rows.append((label, cfg.block_size, cached, recompute))

    print(f"{args.chars} characters, batch {args.batch_size}, {torch.get_num_threads()} "
          f"threads, torch {torch.__version__}\n")
    print("| model | block_size | chars/s cached | chars/s recompute | speedup |")
    print("|---|---:|---:|---:|---:|")
    for label, block_size, cached, recompute in rows:
        print(f"| {label} | {block_size} | {cached:,.0f} | {recompute:,.0f} | "
              f"{cached / recompute:.1f}x |")


if __name__ == "__main__":
    main()

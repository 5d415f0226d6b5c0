"""Superseded by sample_speed.py; kept so that `from bench_sample import MODELS,
chars_per_second` (and `python benchmarks/bench_sample.py`) go on working."""

from __future__ import annotations

from sample_speed import MODELS, chars_per_second, main

__all__ = ["MODELS", "chars_per_second", "main"]

if __name__ == "__main__":
    main()

"""Training speed of a preset: ms per optimizer step and tokens per second, on the real loop.

Prepares Tiny Shakespeare (from ../shared/data, or --input) in a temporary directory, builds the
`Trainer` exactly as `chargpt train` does, runs warm-up steps, then times steps. Prints a
Markdown table. Usage: python benchmarks/bench_train.py [--preset shakespeare-cpu] [--steps 200]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from chargpt.config.schema import resolve_config
from chargpt.training.launch import new_trainer

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def measure_train(preset: str, steps: int, input_path: Path, repeats: int = 3) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = resolve_config(preset, overrides={
            "data": {"input": str(input_path)},
            "train": {"out_dir": str(Path(tmp) / "run"), "progress": False},
        })
        trainer = new_trainer(cfg, quiet=True)
        trainer.model.train()
        for _ in range(10):  # warm-up: allocator, kernels, compile if enabled
            trainer.train_step()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(steps):
                loss = trainer.train_step()
            loss.item()  # one sync so queued GPU work is counted
            times.append((time.perf_counter() - t0) / steps)
        per_step = statistics.median(times)
        return {
            "preset": preset,
            "params_m": trainer.model.num_params() / 1e6,
            "device": trainer.device.type,
            "ms_per_step": per_step * 1e3,
            "tok_per_s": trainer.tokens_per_step() / per_step,
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="shakespeare-cpu")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--input", type=Path, default=SHAKESPEARE)
    args = ap.parse_args()
    r = measure_train(args.preset, args.steps, args.input)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| preset | params | device | ms/step | tokens/s |")
    print("|---|---:|---|---:|---:|")
    print(f"| {r['preset']} | {r['params_m']:.2f} M | {r['device']} | {r['ms_per_step']:.1f} | "
          f"{r['tok_per_s']:,.0f} |")


if __name__ == "__main__":
    main()

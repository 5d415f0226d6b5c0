"""Training speed of a preset: ms per optimizer step and tokens per second, on the real loop.

Prepares Tiny Shakespeare (from ../shared/data, or --input) in a temporary directory, builds the
`Trainer` exactly as `chargpt train` does, runs warm-up steps, then times steps. Prints a
Markdown table. Usage: python benchmarks/bench_train.py [--preset shakespeare-cpu] [--steps 200]

`--variants 'dtype=float32;dtype=bfloat16;dtype=bfloat16,compile=true'` races [train] settings
over the preset instead: one trainer per variant in this process, stepped in turn (`--steps`
each, `--rounds` times), so every variant shares the machine's minutes; the table gives each
one's median and its speed relative to the first. `--model n_layer=4,n_embd=192` sizes them.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from chargpt.config.resolve import resolve_config
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


def _settings(text: str) -> dict[str, object]:
    """'dtype=bfloat16,compile=true' as a dict of TOML-like values."""
    out: dict[str, object] = {}
    for item in filter(None, text.split(",")):
        key, value = item.split("=")
        out[key] = {"true": True, "false": False}.get(value, int(value) if value.isdigit()
                                                      else value)
    return out


def race_settings(preset: str, steps: int, rounds: int, variants: list[str], model: str,
                  input_path: Path) -> list[dict]:
    """Median ms per step of each variant's trainer, stepped in turn in one process."""
    with tempfile.TemporaryDirectory() as tmp:
        trainers = []
        for i, variant in enumerate(variants):
            cfg = resolve_config(preset, overrides={
                "data": {"input": str(input_path)}, "model": _settings(model),
                "train": {**_settings(variant), "out_dir": str(Path(tmp) / f"run{i}"),
                          "progress": False},
            })
            trainer = new_trainer(cfg, quiet=True)
            trainer.model.train()
            for _ in range(10):  # warm-up: allocator, kernels, compile if enabled
                trainer.train_step()
            trainers.append(trainer)
        times: list[list[float]] = [[] for _ in variants]
        for _ in range(rounds):
            for trainer, seen in zip(trainers, times, strict=True):
                t0 = time.perf_counter()
                for _ in range(steps):
                    loss = trainer.train_step()
                loss.item()
                seen.append((time.perf_counter() - t0) / steps)
        return [{"variant": v or "(preset)", "dtype": t.cfg.train.dtype,
                 "params_m": t.model.num_params() / 1e6,
                 "ms_per_step": statistics.median(seen) * 1e3}
                for v, t, seen in zip(variants, trainers, times, strict=True)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="shakespeare-cpu")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--input", type=Path, default=SHAKESPEARE)
    ap.add_argument("--variants", help="';'-separated [train] settings to race, e.g. "
                    "'dtype=float32;dtype=bfloat16'")
    ap.add_argument("--model", default="", help="[model] settings for every variant")
    ap.add_argument("--rounds", type=int, default=8)
    args = ap.parse_args()
    if args.variants:
        rows = race_settings(args.preset, args.steps, args.rounds, args.variants.split(";"),
                             args.model, args.input)
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.preset} "
              f"{args.model}, {args.rounds} rounds of {args.steps} steps each")
        print("| variant | precision | params | ms/step | speed |")
        print("|---|---|---:|---:|---:|")
        for r in rows:
            print(f"| {r['variant']} | {r['dtype']} | {r['params_m']:.2f} M | "
                  f"{r['ms_per_step']:.1f} | {rows[0]['ms_per_step'] / r['ms_per_step']:.2f}x |")
        return
    r = measure_train(args.preset, args.steps, args.input)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| preset | params | device | ms/step | tokens/s |")
    print("|---|---:|---|---:|---:|")
    print(f"| {r['preset']} | {r['params_m']:.2f} M | {r['device']} | {r['ms_per_step']:.1f} | "
          f"{r['tok_per_s']:,.0f} |")


if __name__ == "__main__":
    main()

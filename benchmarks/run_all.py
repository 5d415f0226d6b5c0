"""The README's benchmark table: data preparation, training and sampling speed in one run.

Runs, one after the other on this machine: `prepare` on a 100 MB corpus (Tiny Shakespeare
repeated) in a child process, the training step of the default preset (the fast recipe at
3 x 96), of fast-cpu and of classic-cpu (both 4 x 128) on Tiny Shakespeare, and sampling 2,000
characters with and without the KV cache from a 4 x 128 rotary model. Prints one Markdown table.
Usage: python benchmarks/run_all.py [--mb 100] [--steps 100]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from bench_prepare import measure_prepare  # noqa: E402
from bench_train import SHAKESPEARE, measure_train  # noqa: E402
from sample_speed import MODELS, chars_per_second  # noqa: E402

from chargpt.model.build import build_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=100.0)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--chars", type=int, default=2000)
    ap.add_argument("--mb-large", type=float, default=0.0,
                    help="also prepare a corpus of this many MB (e.g. 1000), for the scale row")
    args = ap.parse_args()

    prep = measure_prepare(args.mb)
    large = measure_prepare(args.mb_large) if args.mb_large else None
    gpu = gpu_section(args.steps)
    trains = [measure_train(p, args.steps, SHAKESPEARE)
              for p in ("shakespeare-cpu", "fast-cpu", "classic-cpu")]
    torch.manual_seed(0)
    model = build_model(MODELS["small"])
    cached = chars_per_second(model, args.chars, True, seed=0)
    recompute = chars_per_second(model, args.chars, False, seed=0)

    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| what | measure | value |")
    print("|---|---|---:|")
    print(f"| prepare {prep['mb']:.0f} MB (Tiny Shakespeare repeated) | MB/s | "
          f"{prep['mb_per_s']:.0f} |")
    print(f"| prepare {prep['mb']:.0f} MB | peak RSS of the process, MB | "
          f"{prep['peak_rss_mb']:.0f} |")
    if large:
        print(f"| prepare {large['mb']:.0f} MB | MB/s | {large['mb_per_s']:.0f} |")
        print(f"| prepare {large['mb']:.0f} MB | peak RSS of the process, MB | "
              f"{large['peak_rss_mb']:.0f} |")
    for tr in trains:
        print(f"| train {tr['preset']} ({tr['params_m']:.2f} M params, {tr['device']}) | "
              f"ms/step | {tr['ms_per_step']:.1f} |")
        print(f"| train {tr['preset']} | tokens/s | {tr['tok_per_s']:,.0f} |")
    print(f"| sample {args.chars} chars, 4x4x128 rotary model | chars/s, KV cache, native loop | "
          f"{cached:,.0f} |")
    print(f"| sample {args.chars} chars | chars/s recomputing the context | {recompute:,.0f} |")
    print()
    print(gpu)


def gpu_section(steps: int) -> str:
    """shakespeare-gpu's tokens/s and MFU on a CUDA device, or a plain statement that none is."""
    if not torch.cuda.is_available():
        return "GPU: not measured - no CUDA device on this machine."
    from chargpt.config.resolve import resolve_config
    from chargpt.model.flops import estimate, match_gpu, mfu

    r = measure_train("shakespeare-gpu", steps, SHAKESPEARE)
    device = torch.device("cuda")
    cfg = resolve_config("shakespeare-gpu", overrides={"model": {"vocab_size": 65}})
    util = mfu(estimate(cfg).flops_per_token, r["tok_per_s"], device)
    name = torch.cuda.get_device_name(device)
    mfu_text = f"{util:.1%}" if util is not None else f"unknown ({name} not in chargpt.model.flops)"
    return (f"| GPU | preset | ms/step | tokens/s | MFU |\n|---|---|---:|---:|---:|\n"
            f"| {name} ({match_gpu(name) or '?'}) | shakespeare-gpu | {r['ms_per_step']:.1f} | "
            f"{r['tok_per_s']:,.0f} | {mfu_text} |")


if __name__ == "__main__":
    main()

"""Resume speed: how long `resume_trainer` takes to continue a run from its `last/` checkpoint.

Trains a small run of a preset (default: the default preset, on Tiny Shakespeare) for a few
steps in a temporary directory, then times `resume_trainer` on it several times: verifying and
loading the checkpoint, restoring optimizer, RNG and sampler state, and loading the prepared
data. Prints a Markdown table. `make_run` is shared with bench_serve.py.

    python benchmarks/bench_resume.py [--preset shakespeare-cpu] [--repeats 20]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from chargpt.config.resolve import resolve_config
from chargpt.training.launch import resume_trainer, train

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def make_run(root: Path, preset: str = "shakespeare-cpu", steps: int = 20,
             input_path: Path = SHAKESPEARE) -> Path:
    """A finished run of `steps` steps in `root/run`, with best/ and last/ checkpoints."""
    run_dir = root / "run"
    cfg = resolve_config(preset, overrides={
        "data": {"input": str(input_path)},
        "train": {"out_dir": str(run_dir), "max_steps": steps, "eval_interval": steps,
                  "eval_iters": 2, "progress": False, "sample_chars": 0},
    })
    train(cfg, quiet=True)
    return run_dir


def measure_resume(preset: str, repeats: int, input_path: Path = SHAKESPEARE) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = make_run(Path(tmp), preset, input_path=input_path)
        resume_trainer(run_dir, quiet=True)  # warm-up: imports, page cache
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            trainer = resume_trainer(run_dir, quiet=True)
            times.append(time.perf_counter() - t0)
        return {"preset": preset, "step": trainer.step, "ms": statistics.median(times) * 1e3,
                "min_ms": min(times) * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="shakespeare-cpu")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--input", type=Path, default=SHAKESPEARE)
    args = ap.parse_args()
    r = measure_resume(args.preset, args.repeats, args.input)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| preset | resumed at step | median ms | min ms |")
    print("|---|---:|---:|---:|")
    print(f"| {r['preset']} | {r['step']} | {r['ms']:.1f} | {r['min_ms']:.1f} |")


if __name__ == "__main__":
    main()

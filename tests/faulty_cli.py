"""`chargpt` with faults injected, for tests that cannot reach the process they test.

    python tests/faulty_cli.py [--save-delay S] [--exit-at-step N] [--exit-rank R] -- ARGS...

runs `chargpt ARGS...` after installing the faults: every checkpoint write pauses S seconds at
each critical point (so that a kill lands mid-write), and rank R (default 0) exits with status
17 right after step N, on torchrun's first attempt only (a restarted group runs undisturbed).
This file belongs to the tests: chargpt itself never reads a fault from anywhere.
"""

from __future__ import annotations

import argparse
import os
import sys

from chargpt import faults
from chargpt.cli.commands import main


def chosen_faults(argv: list[str], environ: dict[str, str]) -> faults.Faults:
    """The faults this process injects: the options, narrowed to one rank and first attempt."""
    parser = argparse.ArgumentParser(prog="faulty_cli")
    parser.add_argument("--save-delay", type=float, default=0.0)
    parser.add_argument("--exit-at-step", type=int, default=None)
    parser.add_argument("--exit-rank", type=int, default=0)
    opts = parser.parse_args(argv)
    rank = int(environ.get("RANK", "0"))
    first_attempt = environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    exit_at = opts.exit_at_step if first_attempt and rank == opts.exit_rank else None
    return faults.Faults(save_delay=opts.save_delay, exit_at_step=exit_at)


def run(argv: list[str]) -> int:
    split = argv.index("--")
    faults.install(chosen_faults(argv[:split], dict(os.environ)))
    return main(argv[split + 1:])


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))

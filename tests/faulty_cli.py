"""`chargpt` with faults injected, for tests that cannot reach the process they test.

    python tests/faulty_cli.py [--kill-at PHASE [--nth N] [--marker FILE]]
                               [--exit-at-step N] [--interrupt-at-step N] [--rank R] -- ARGS...

runs `chargpt ARGS...` after installing the faults: the N-th time (default 1) this process
reaches PHASE (one of `faults.PHASES`) it writes FILE (the phase and the last step taken) and
sends itself SIGKILL; rank R (default 0) exits with status 17 right after step N, or is sent
SIGINT right after step N, on torchrun's first attempt only (a restarted group runs
undisturbed). This file belongs to the tests: chargpt itself never reads a fault from anywhere.
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
    parser.add_argument("--kill-at", choices=faults.PHASES, default=None)
    parser.add_argument("--nth", type=int, default=1)
    parser.add_argument("--marker", default=None)
    parser.add_argument("--exit-at-step", type=int, default=None)
    parser.add_argument("--interrupt-at-step", type=int, default=None)
    parser.add_argument("--rank", type=int, default=0)
    opts = parser.parse_args(argv)
    rank = int(environ.get("RANK", "0"))
    if environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0" or rank != opts.rank:
        return faults.Faults()
    return faults.Faults(exit_at_step=opts.exit_at_step, interrupt_at_step=opts.interrupt_at_step,
                         kill_at=opts.kill_at, kill_nth=opts.nth, marker=opts.marker)


def run(argv: list[str]) -> int:
    split = argv.index("--")
    faults.install(chosen_faults(argv[:split], dict(os.environ)))
    return main(argv[split + 1:])


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))

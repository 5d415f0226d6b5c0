"""Two commits side by side: the same benchmarks run alternately on each, in one session.

A noisy machine drifts by 2x within minutes, so a speed comparison is only fair when both
sides share the same minutes. This script checks out `--base` (default: HEAD~1) in a temporary
git worktree and runs each benchmark command on the base and on the working tree in turn,
`--rounds` times (base, work, base, work, ...), each side with its own `src/` first on
PYTHONPATH and its own copy of the benchmark script. It reads every Markdown table the commands
print and reports, per cell that holds a number, the median on each side and their ratio.

    python benchmarks/ab.py --base 98d4f5e --rounds 3 \\
        "bench_train.py --steps 60" "sample_speed.py --model small" "bench_serve.py"

A command is a script in benchmarks/ with its arguments. Numbers are compared as printed
(higher is not always better: read the column's unit).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NUMBER = re.compile(r"^[-+]?[\d,]*\.?\d+(?:e[-+]?\d+)?(?=\s*(?:[a-zA-Z/%x]*)?$)")


def cells(output: str) -> dict[tuple[str, str, str], float]:
    """(table header, row label, column) -> number, for every numeric cell of every table."""
    found: dict[tuple[str, str, str], float] = {}
    header: list[str] = []
    for line in output.splitlines():
        if not line.startswith("|"):
            header = []
            continue
        row = [c.strip() for c in line.strip().strip("|").split("|")]
        if set("".join(row)) <= set("-: "):
            continue
        if not header:
            header = row
            continue
        for column, cell in zip(header[1:], row[1:], strict=False):
            match = NUMBER.match(cell)
            if match:
                found[(header[0], row[0], column)] = float(match.group(0).replace(",", ""))
    return found


def run(tree: Path, command: str) -> str:
    script, *args = shlex.split(command)
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    done = subprocess.run([sys.executable, str(tree / "benchmarks" / script), *args],
                          cwd=tree, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{command} failed in {tree}:\n{done.stderr[-2000:]}")
    return done.stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("commands", nargs="+", help="benchmark scripts with their arguments")
    parser.add_argument("--base", default="HEAD~1", help="the commit to compare against")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="chargpt-ab-")) / "base"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(base),
                    args.base], check=True)
    values: dict[tuple[str, tuple[str, str, str]], dict[str, list[float]]] = defaultdict(
        lambda: {"base": [], "work": []})
    try:
        for i in range(args.rounds):
            for command in args.commands:
                for side, tree in (("base", base), ("work", ROOT)):
                    print(f"round {i + 1}: {side}: {command}", file=sys.stderr, flush=True)
                    for key, value in cells(run(tree, command)).items():
                        values[(command, key)][side].append(value)
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)])
    print(f"base {args.base} vs the working tree, {args.rounds} rounds, medians\n")
    print("| benchmark | row | column | base | work | work / base |\n|---|---|---|---|---|---|")
    for (command, (_, row, column)), sides in values.items():
        if sides["base"] and sides["work"]:
            b, w = statistics.median(sides["base"]), statistics.median(sides["work"])
            ratio = f"{w / b:.2f}" if b else ""
            print(f"| {command} | {row} | {column} | {b:g} | {w:g} | {ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

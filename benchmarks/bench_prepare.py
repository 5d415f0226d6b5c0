"""Benchmark `chargpt.data.preparation.prepare`: throughput and peak memory on a large corpus.

Builds a corpus of `--mb` megabytes by repeating Tiny Shakespeare (or synthetic ASCII text if
the file is absent) in a temporary directory, runs `prepare` on it in a child process and prints
a Markdown table of corpus size, wall time, throughput and the child's peak resident memory
(VmHWM of the child, which includes the interpreter and NumPy themselves; the "extra" column
is the child's VmHWM after `prepare` minus its VmHWM right before). "seconds" is the wall time of
`prepare` alone, "CPU s" its user + system time (less sensitive to other load on the machine).

    python benchmarks/bench_prepare.py --mb 100
    python benchmarks/bench_prepare.py --mb 1000
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"

CHILD = """
import json, os, sys, time
from chargpt.data.preparation import prepare

def hwm_kb():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        return 0

base = hwm_kb()
t0, c0 = time.perf_counter(), os.times()
meta = prepare(sys.argv[1], sys.argv[2])
elapsed, c1 = time.perf_counter() - t0, os.times()
cpu = (c1.user - c0.user) + (c1.system - c0.system)
print(json.dumps({"seconds": elapsed, "cpu": cpu, "base_kb": base, "hwm_kb": hwm_kb(),
                  "tokens": meta["total_chars"], "vocab": meta["vocab_size"]}))
"""


def build_corpus(path: Path, mb: float) -> int:
    if SHAKESPEARE.is_file():
        unit = SHAKESPEARE.read_bytes()
    else:
        unit = b"".join(b"line %d of some synthetic ASCII text.\n" % i for i in range(30000))
    target = int(mb * 1_000_000)
    written = 0
    with open(path, "wb") as f:
        while written < target:
            piece = unit[: target - written]
            f.write(piece)
            written += len(piece)
    return written


def measure_prepare(mb: float, keep: bool = False) -> dict:
    """Prepare a corpus of `mb` MB in a child process; time it and read its peak memory."""
    tmp = Path(tempfile.mkdtemp(prefix="chargpt-bench-"))
    try:
        corpus = tmp / "corpus.txt"
        size = build_corpus(corpus, mb)
        wall0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, str(corpus), str(tmp / "prepared")],
            capture_output=True,
            text=True,
        )
        wall = time.perf_counter() - wall0
        if proc.returncode != 0:
            sys.exit(f"prepare failed:\n{proc.stderr}")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        return {
            "mb": size / 1e6,
            "seconds": result["seconds"],
            "mb_per_s": size / 1e6 / result["seconds"],
            "cpu": result["cpu"],
            # VmHWM of the child: the whole process (interpreter + numpy), not just prepare
            "peak_rss_mb": result["hwm_kb"] / 1024,
            "extra_rss_mb": (result["hwm_kb"] - result["base_kb"]) / 1024,
            "wall": wall,
            "tmp": str(tmp) if keep else None,
        }
    finally:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=100.0, help="corpus size in MB (1e6 bytes)")
    parser.add_argument("--keep", action="store_true", help="print the temp dir and keep it")
    args = parser.parse_args(argv)
    r = measure_prepare(args.mb, keep=args.keep)
    print("| corpus MB | seconds | MB/s | CPU s | peak RSS MB | extra RSS MB | child wall s |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    print(
        f"| {r['mb']:.0f} | {r['seconds']:.2f} | {r['mb_per_s']:.0f} "
        f"| {r['cpu']:.2f} | {r['peak_rss_mb']:.0f} | {r['extra_rss_mb']:.0f} | {r['wall']:.2f} |"
    )
    if r["tmp"]:
        print(f"kept {r['tmp']}")


if __name__ == "__main__":
    main()

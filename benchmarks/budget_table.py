"""Issue 21's tables: at each time budget, `--size auto` against a hand sweep of the ladder.

For each corpus and budget this trains, one run after another, `--time T --size auto` (what
`chargpt train --time T` does by itself) and then `--time T --size NAME` for each hand-picked
size, all with the same seed. Each run appends a JSON line to `--out`: what auto chose and its
forecast (from the line it logged), the steps, the best val loss as training estimated it (the
mean over every position of random val blocks, nanoGPT's way) and best/ scored on the whole
val split (every character once, at least half a block of context) and tiled (every position
of back-to-back val blocks, nanoGPT's way), and the wall time from
the call to `train()` to its return against the budget. Then a table per corpus and budget:
auto's size and loss, its forecast and miss, the best hand-picked size and how far auto is from
it, and every run's end against its budget (min and max), from the latest run of each size
in each cell. A second table holds every run's
forecast made afterwards from the steps it took (for a hand-picked size chargpt forecasts
nothing beforehand): how far the rule's forecast is from each cell, not only from auto's.

Budget runs measure time, so run this on an otherwise idle machine; its wall time is the sum
of the budgets (six 2-minute runs: 12 minutes per corpus).

    python benchmarks/budget_table.py --corpus shakespeare wisdom-en --budgets 2m 10m \\
        [--sizes 2x64 3x96 4x128 4x192 6x256] [--no-hand | --no-auto]

`--set train.data_order=epoch --set model.n_head=2` tries a lever: every run of the call gets
those settings (JSON values; a bare word is a string), its rows record them under "set", and
they are kept out of the auto-against-hand table and shown in a table of their own beside the
plain run of each size.

Each row records the code it ran (`code`: the git tree of src/, "+dirty" when src/ had
changes). `--resume` skips every run `--out` already holds from this same code, so one
benchmark run of several hours can stop and go on later, and the tables say which code their
rows come from:

    python benchmarks/budget_table.py --out benchmarks/results/final.jsonl --resume \
        --corpus shakespeare wisdom-en de poems-en --budgets 2m 10m

Corpora as in sweep.py: `shakespeare` is Tiny Shakespeare, the others benchmarks/corpora.py's.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from corpora import CORPORA  # noqa: E402
from sweep import corpus_path  # noqa: E402

from chargpt.config.resolve import resolve_config  # noqa: E402
from chargpt.config.sizing import load_rule  # noqa: E402
from chargpt.config.values import parse_duration  # noqa: E402
from chargpt.data.preparation import prepare  # noqa: E402
from chargpt.data.prepared import load_prepared  # noqa: E402
from chargpt.data.stats import corpus_stats  # noqa: E402
from chargpt.runs.run import load_run  # noqa: E402
from chargpt.runs.rundir import RunDir  # noqa: E402
from chargpt.training.autosize import block_params_of  # noqa: E402
from chargpt.training.launch import train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FORECAST = re.compile(r"val loss forecast ([\d.]+) \(([\d.]+)-([\d.]+)\)")


def parse_set(items: list[str]) -> dict[str, dict]:
    """['train.data_order=epoch', 'model.n_head=2'] as {'train': {...}, 'model': {...}}."""
    out: dict[str, dict] = {}
    for item in items:
        key, sep, value = item.partition("=")
        section, dot, field = key.partition(".")
        if not (sep and dot and field):
            raise SystemExit(f"--set {item!r}: expected SECTION.FIELD=VALUE")
        try:
            parsed = json.loads(value)  # 2, 0.05, true
        except json.JSONDecodeError:
            parsed = value  # a bare word: a string
        out.setdefault(section, {})[field] = parsed
    return out


def code_version() -> str:
    """The git tree of src/ (what a run ran), "+dirty" when src/ has uncommitted changes."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()

    try:
        dirty = "+dirty" if git("status", "--porcelain", "--", "src") else ""
        return git("rev-parse", "HEAD:src")[:12] + dirty
    except (OSError, subprocess.CalledProcessError):
        return "unknown+dirty"  # not a git checkout: nothing says what ran


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def row_key(r: dict) -> tuple:
    """A cell's run: corpus, budget, auto or the size (and its block), the lever."""
    own = {size.name: size.model["block_size"] for size in load_rule().sizes}
    return (r["corpus"], r["budget"], "auto" if r["auto"] else r["size"],
            r.get("block", own.get(r["size"])) if not r["auto"] else 0,
            json.dumps(r.get("set", {}), sort_keys=True))


def one_run(corpus: str, budget: str, size: str, data_dir: Path, out: Path, seed: int,
            compile_: bool = False, block: int = 0, lever: dict | None = None) -> dict:
    lever = lever or {}
    model = {"block_size": block} if block and size != "auto" else {}
    cfg = resolve_config(overrides={
        "data": {"data_dir": str(data_dir), **lever.get("data", {})},
        "model": {**model, **lever.get("model", {})},
        "train": {"out_dir": str(out), "time_budget": budget, "size": size, "seed": seed,
                  "progress": False, "sample_chars": 0, "compile": compile_,
                  **lever.get("train", {})}})
    t0 = time.perf_counter()
    result = train(cfg, quiet=True)
    seconds = time.perf_counter() - t0
    if result.interrupted_by is not None:
        raise SystemExit(f"{out.name} was interrupted; not recorded")
    saved = RunDir(out).read_config()
    match = FORECAST.search(saved.train.size_choice)
    val = load_prepared(data_dir).val
    best = load_run(out, "best", device="cpu")
    whole = best.evaluate_ids(val, batch_size=256)
    tiled = best.evaluate_ids(val, batch_size=256, tiled=True)
    return {"corpus": corpus, "budget": budget, "auto": size == "auto",
            "size": saved.train.size, "time_budget": saved.train.time_budget,
            "step_cap": saved.train.step_cap,
            "dropout": saved.model.dropout, "dtype": saved.train.dtype,
            "block": saved.model.block_size,
            "compile": saved.train.compile, "data_order": saved.train.data_order,
            "forecast": float(match.group(1)) if match else None,
            "steps": result.step, "best_val": result.best_val_loss, "whole_best": whole,
            "tiled_best": tiled,
            "seconds": round(seconds, 2), "budget_seconds": parse_duration(budget),
            "choice": saved.train.size_choice, "date": datetime.date.today().isoformat(),
            "code": code_version(), **({"set": lever} if lever else {})}


def order_of(row: dict) -> str:
    """The order a run drew its batches in: recorded since 2026-12-05 21:00, random before
    (unless a --set said otherwise)."""
    given = (row.get("set") or {}).get("train", {}).get("data_order", "random")
    return row.get("data_order", given)


def forecasts_afterwards(rows: list[dict]) -> dict[int, float]:
    """The rule's forecast of each run (by index in `rows`) at the tokens it trained: its
    size's block parameters, steps x batch x block tokens, its corpus (prepared again here),
    dropout as the run had it."""
    rule, out = load_rule(), {}
    sizes = {size.name: size for size in rule.sizes}
    for corpus in dict.fromkeys(r["corpus"] for r in rows):
        with tempfile.TemporaryDirectory() as tmp:
            data_dir = Path(tmp) / "data"
            prepare(str(corpus_path(corpus)), data_dir)
            data = load_prepared(data_dir)
            stats = corpus_stats(data)
            cfg = resolve_config(overrides={"data": {"data_dir": str(data_dir)},
                                            "model": {"vocab_size": data.tokenizer.vocab_size}})
            body = block_params_of(cfg)
        for i, r in enumerate(rows):
            if r["corpus"] == corpus and r["size"] in sizes:
                size = sizes[r["size"]]
                dropout = r.get("dropout", 0.0) > 0  # rows before 2026-12-04 13:00: none had it
                block = r.get("block", size.model["block_size"])  # --block: not the size's
                out[i] = rule.forecast.lowest(body[size.name], r["steps"],
                                              size.train["batch_size"] * block, stats, dropout,
                                              block, order_of(r) == "epoch")[0]
    return out


def print_misses(rows: list[dict]) -> None:
    """Every run's loss against the forecast made afterwards from its steps."""
    after = forecasts_afterwards(rows)
    print("\n| corpus | budget | size | steps | val | forecast from its steps | miss |")
    print("|---|---|---|---:|---:|---:|---:|")
    misses = []
    for i, r in enumerate(rows):
        if i in after:
            misses.append(after[i] - r["best_val"])
            print(f"| {r['corpus']} | {r['budget']} | {r['size']}{' (auto)' * r['auto']} | "
                  f"{r['steps']} | {r['best_val']:.4f} | {after[i]:.3f} | {misses[-1]:+.3f} |")
    if misses:
        print(f"\nforecast misses from -{max(0, -min(misses)):.3f} to +{max(0, max(misses)):.3f}"
              f" over {len(misses)} runs; {sum(abs(m) <= 0.05 for m in misses)} within 0.05")


def print_levers(rows: list[dict]) -> None:
    """Each run made with --set beside the latest plain run of its size in its cell."""
    levers = [r for r in rows if r.get("set")]
    if not levers:
        return
    plain = {(r["corpus"], r["budget"], r["size"], r["auto"]): r for r in rows
             if not r.get("set")}
    print("\n| corpus | budget | size | --set | steps | val | tiled | whole-split | "
          "val - plain run's |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|")
    for r in levers:
        sets = " ".join(f"{s}.{k}={v}" for s, kv in r["set"].items() for k, v in kv.items())
        base = plain.get((r["corpus"], r["budget"], r["size"], r["auto"]))
        gap = f"{r['best_val'] - base['best_val']:+.4f}" if base else "-"
        print(f"| {r['corpus']} | {r['budget']} | {r['size']}{' (auto)' * r['auto']} | "
              f"{sets} | {r['steps']} | {r['best_val']:.4f} | {r['tiled_best']:.4f} | "
              f"{r['whole_best']:.4f} | {gap} |")


def print_table(all_rows: list[dict]) -> None:
    rows = [r for r in all_rows if not r.get("set")]
    print("| corpus | budget | auto | auto val | forecast | miss | best hand size | its val | "
          "auto - best | auto whole-split |")
    print("|---|---|---|---:|---:|---:|---|---:|---:|---:|")
    own = {size.name: size.model["block_size"] for size in load_rule().sizes}
    for corpus, budget in dict.fromkeys((r["corpus"], r["budget"]) for r in rows):
        cell = [r for r in rows if (r["corpus"], r["budget"]) == (corpus, budget)]
        auto = [r for r in cell if r["auto"]]
        hand = [r for r in cell if not r["auto"]]
        if not auto:
            continue
        a = auto[-1]
        forecast = miss = hand_size = hand_val = gap = "-"
        if a["forecast"] is not None:
            forecast, miss = f"{a['forecast']:.2f}", f"{a['forecast'] - a['best_val']:+.3f}"
        if hand:
            best = min(hand, key=lambda r: r["best_val"])
            hand_size, hand_val = best["size"], f"{best['best_val']:.4f}"
            if best.get("block", own[best["size"]]) != own[best["size"]]:
                hand_size += f", block {best['block']}"
            if order_of(best) != order_of(a):
                hand_size += f", {order_of(best)} order"
            gap = f"{a['best_val'] - best['best_val']:+.4f}"
        print(f"| {corpus} | {budget} | {a['size']} | {a['best_val']:.4f} | {forecast} | "
              f"{miss} | {hand_size} | {hand_val} | {gap} | {a['whole_best']:.4f} |")
    capped = [r for r in rows if r.get("step_cap") and r["steps"] >= r["step_cap"]]
    ends = [r["seconds"] / parse_duration(r["time_budget"]) - 1 for r in rows
            if r not in capped]
    if ends:
        print(f"\nruns' ends against their budgets: {min(ends):+.1%} to {max(ends):+.1%} "
              f"({len(ends)} runs; a budget auto shortened is counted against the shorter one)")
    if capped:
        early = [r["seconds"] / parse_duration(r["time_budget"]) - 1 for r in capped]
        print(f"runs that ended at the step cap auto set them: {len(capped)}, "
              f"{min(early):+.1%} to {max(early):+.1%} of their (shortened) budgets")


def run_all(args: argparse.Namespace, lever: dict) -> None:
    """Every run the arguments ask for, one after another, each appended to `args.out` (with
    `args.resume`, all but those it holds from this code already)."""
    args.out.parent.mkdir(parents=True, exist_ok=True)
    code = code_version()
    done = set()
    if args.resume and args.out.exists():
        if code.endswith("+dirty"):
            raise SystemExit("--resume: src/ has uncommitted changes; commit them first")
        done = {row_key(r) for r in read_rows(args.out) if r.get("code") == code}
    for corpus in args.corpus:
        with tempfile.TemporaryDirectory() as tmp:
            data_dir = Path(tmp) / "data"
            prepare(str(corpus_path(corpus)), data_dir)
            for budget in args.budgets:
                sizes = ([] if args.no_auto else ["auto"]) + ([] if args.no_hand else
                                                               args.sizes)
                for size in sizes:
                    block = args.block if args.block and size != "auto" else None
                    key = row_key({"corpus": corpus, "budget": budget, "auto": size == "auto",
                                   "size": size, **({"block": block} if block else {}),
                                   **({"set": lever} if lever else {})})
                    if key in done:
                        continue
                    out = Path(tmp) / f"run-{budget}-{size}"
                    record = one_run(corpus, budget, size, data_dir, out, args.seed,
                                     args.compile, args.block, lever)
                    with args.out.open("a") as f:
                        f.write(json.dumps(record) + "\n")
                    print(json.dumps(record), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", nargs="+", default=["shakespeare"],
                    choices=["shakespeare", *CORPORA])
    ap.add_argument("--budgets", nargs="+", default=["2m", "10m"])
    ap.add_argument("--sizes", nargs="+", default=["2x64", "3x96", "4x128", "4x192", "6x256"])
    ap.add_argument("--no-hand", action="store_true", help="only the automatic choice")
    ap.add_argument("--no-auto", action="store_true", help="only the sizes named by hand")
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--compile", action="store_true", help="every run with --compile")
    ap.add_argument("--block", type=int, default=0,
                    help="the sizes named by hand at this block (0: each size's own)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                    help="a setting for every run of this call (repeatable): a lever to try")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/budget.jsonl")
    ap.add_argument("--resume", action="store_true",
                    help="skip the runs --out holds already from this code")
    ap.add_argument("--table", action="store_true", help="print the table of --out and stop")
    ap.add_argument("--misses", action="store_true",
                    help="also every run's forecast made afterwards from its steps, and its miss")
    args = ap.parse_args()
    lever = parse_set(args.set)
    if not args.table:
        run_all(args, lever)
    rows = read_rows(args.out)
    if not rows:
        raise SystemExit(f"{args.out} holds no runs")
    # the latest run of each size (auto apart) in each cell: a cell run again replaces its rows
    # (rows before 2026-12-05 record no block: theirs was the size's own)
    rows = list({row_key(r): r for r in rows}.values())
    codes = sorted({r.get("code", "unrecorded") for r in rows})
    dates = sorted({r["date"] for r in rows})
    print(f"{len(rows)} runs, {dates[0]} to {dates[-1]}, code {', '.join(codes)}\n")
    print_table(rows)
    print_levers(rows)
    if args.misses:
        print_misses(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The ladder's report: tables per part, CSV, JSON, curves and samples, written atomically.

The lecture's part of the table puts chargpt's number beside the lecture's: its quoted figure
and what its scripts printed on a CPU like ours. Both are random-batch estimates over windows
of 1 to block_size characters, so the column they are compared with is the tiled whole-split
measure; the full-context column (every prediction with at least half a block of history) is
the number to quote for a trained model. Past the lecture each rung is compared with its
parent. Every file is replaced atomically, so a reader never sees half a report.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from chargpt.fileio import atomic_write_text
from chargpt.ladder.results import RungResult
from chargpt.ladder.rungs import MODERN_TRAIN, RECIPES, Budget


def _num(x: float | None, fmt: str = ".4f") -> str:
    return format(x, fmt) if x is not None and math.isfinite(x) else ""


def _loss(r: RungResult, key: str) -> str:
    text = _num(r.mean(key))
    return f"{text} ± {_num(r.spread(key), '.3f')}" if len(r.runs) > 1 else text


def _cells(r: RungResult) -> list[str]:
    steps = sorted({s.steps for s in r.runs})
    steps_text = "/".join(f"{s:,}" for s in steps) + (" (reduced)" if r.reduced else "")
    return [f"{r.params:,}", str(len(r.runs)), steps_text]


def lecture_table(results: Sequence[RungResult]) -> str:
    lines = [
        "| rung | idea | parameters | seeds | steps | val, lecture's measure | lecture says "
        "| lecture's code here | val, full context | bits/char | train | seconds |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        rung = r.rung
        quote = f"{rung.quote:g} ({rung.quote_source})" if rung.quote is not None else ""
        if not r.ran:
            lines.append(f"| {rung.name} | {rung.idea} | {r.params:,} | | | {r.status} | "
                         f"{quote} | {_num(rung.reference, '.3f')} | | | | |")
            continue
        lines.append(
            f"| {rung.name} | {rung.idea} | " + " | ".join(_cells(r)) + " | "
            f"{_loss(r, 'val_loss_tiled')} | {quote} | {_num(rung.reference, '.3f')} | "
            f"{_loss(r, 'val_loss')} | {_num(r.bpc, '.3f')} | {_num(r.mean('train_loss'))} | "
            f"{_num(r.mean('seconds'), '.0f')} |")
    return "\n".join(lines) + "\n"


def modern_table(results: Sequence[RungResult]) -> str:
    by_name = {r.rung.name: r for r in results}
    lines = [
        "| rung | idea | parameters | seeds | steps | val loss | vs parent | bits/char | train "
        "| seconds |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        rung = r.rung
        if not r.ran:
            lines.append(f"| {rung.name} | {rung.idea} | {r.params:,} | | | {r.status} "
                         "| | | | |")
            continue
        parent = by_name.get(rung.parent or "")
        delta = ""
        if parent is not None and parent.ran:
            delta = f"{r.mean('val_loss') - parent.mean('val_loss'):+.4f} ({parent.rung.name})"
        lines.append(
            f"| {rung.name} | {rung.idea} | " + " | ".join(_cells(r)) + " | "
            f"{_loss(r, 'val_loss')} | {delta} | {_num(r.bpc, '.3f')} | "
            f"{_num(r.mean('train_loss'))} | {_num(r.mean('seconds'), '.0f')} |")
    return "\n".join(lines) + "\n"


def notes(results: Sequence[RungResult]) -> str:
    """The rungs' own notes (a recipe exception, a reduced budget), one bullet each."""
    lines = [f"- {r.rung.name}: {r.rung.note}" for r in results
             if r.ran and r.rung.note and (r.reduced or r.rung.cpu_max_steps is None)]
    return "\n".join(lines) + "\n" if lines else ""


def format_markdown(results: Sequence[RungResult], budget: Budget, source: str) -> str:
    lecture = [r for r in results if r.rung.part == "lecture"]
    modern = [r for r in results if r.rung.part == "modern"]
    parts = [f"Ladder on {source}, {budget.recipe} recipe ({RECIPES[budget.recipe]}). Losses "
             "are nats per character of each run's final weights, the mean over seeds (± half "
             "the range). 'Lecture's measure' scores the whole val split in back-to-back "
             "windows (contexts of 1 to block_size characters, what the lecture's estimate "
             "averages); 'full context' gives every prediction at least half a block of "
             "history; train is the last train characters, as many as val has.\n"]
    override = _override_text(budget)
    if override:
        parts.append(override)
    if lecture:
        parts += ["## The lecture\n", lecture_table(lecture)]
        if notes(lecture):
            parts.append(notes(lecture))
    if modern:
        parts += ["## Past the lecture\n",
                  f"Every rung: {MODERN_TRAIN['max_steps']:,} steps of "
                  f"{MODERN_TRAIN['batch_size']} sequences unless overridden, warmup and "
                  "cosine decay (until the wsd rung), the same under both recipes.\n",
                  modern_table(modern)]
        if notes(modern):
            parts.append(notes(modern))
    return "\n".join(parts)


def _override_text(budget: Budget) -> str:
    bits = []
    if budget.max_steps is not None:
        bits.append(f"{budget.max_steps:,} steps for every rung")
    if budget.seconds is not None:
        bits.append(f"{budget.seconds:g} s for every rung")
    if budget.batch_size is not None:
        bits.append(f"batch {budget.batch_size} for every rung")
    return f"Budget overridden: {', '.join(bits)}.\n" if bits else ""


CSV_COLUMNS = ("rung", "part", "idea", "parameters", "seeds", "steps", "train_loss",
               "val_loss", "val_loss_tiled", "val_spread", "lecture_quote",
               "lecture_reference", "bits_per_char", "seconds", "device", "status")


def format_csv(results: Sequence[RungResult]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for r in results:
        w.writerow([r.rung.name, r.rung.part, r.rung.idea, r.params, len(r.runs),
                     max((s.steps for s in r.runs), default=0), _num(r.mean("train_loss")),
                     _num(r.mean("val_loss")), _num(r.mean("val_loss_tiled")),
                     _num(r.spread("val_loss")) if r.ran else "",
                     _num(r.rung.quote, "g"), _num(r.rung.reference, "g"),
                     _num(r.bpc), _num(r.mean("seconds"), ".1f"), r.device,
                     r.status + (" (reduced)" if r.reduced else "")])
    return buf.getvalue()


def _finite(x: Any) -> Any:
    """JSON has no NaN: unmeasured numbers become null, text is never touched."""
    return None if isinstance(x, float) and not math.isfinite(x) else x


def format_json(results: Sequence[RungResult], budget: Budget) -> str:
    rows = []
    for r in results:
        rows.append({
            "rung": r.rung.name, "part": r.rung.part, "idea": r.rung.idea,
            "parent": r.rung.parent, "parameters": r.params, "status": r.status,
            "reduced": r.reduced, "device": r.device,
            "lecture_quote": r.rung.quote, "lecture_reference": r.rung.reference,
            "val_loss": _finite(r.mean("val_loss")),
            "val_loss_tiled": _finite(r.mean("val_loss_tiled")),
            "train_loss": _finite(r.mean("train_loss")), "bits_per_char": _finite(r.bpc),
            "runs": [{k: _finite(v) for k, v in vars(s).items()} for s in r.runs],
            "sample": r.sample,
        })
    doc = {"recipe": budget.recipe, "budget": {k: _finite(v) for k, v in vars(budget).items()},
           "rungs": rows}
    return json.dumps(doc, indent=2, allow_nan=False, ensure_ascii=False) + "\n"


def format_samples(results: Sequence[RungResult]) -> str:
    out = []
    for r in results:
        body = f"```\n{r.sample.strip(chr(10))}\n```" if r.ran else f"({r.status})"
        out.append(f"### {r.rung.name}\n\n{body}\n")
    return "\n".join(out)


def write_report(results: Sequence[RungResult], out: Path, *, budget: Budget,
                 source: str) -> None:
    """Rewrite ladder.md, ladder.csv, ladder.json, samples.md and the curve plots in `out`."""
    from chargpt.plots import plot_ladder_curves
    from chargpt.runs.rundir import RunDir

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "ladder.md", format_markdown(results, budget, source))
    atomic_write_text(out / "ladder.csv", format_csv(results))
    atomic_write_text(out / "ladder.json", format_json(results, budget))
    atomic_write_text(out / "samples.md", format_samples(results))
    for part, name, title in (("lecture", "ladder.png", "the lecture's rungs"),
                              ("modern", "ladder_modern.png", "past the lecture")):
        curves = {r.rung.name: RunDir(Path(r.runs[0].run_dir)).read_metrics()
                  for r in results if r.rung.part == part and r.runs}
        if curves:
            plot_ladder_curves(curves, out / name,
                               title=f"val loss during training, {title} (first seed)")

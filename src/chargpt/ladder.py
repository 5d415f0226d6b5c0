"""The lecture's ladder: each idea of "build GPT from scratch" as one preset, trained and scored.

The lecture grows its model one idea at a time (bigram, one attention head, several heads, an
MLP, more blocks, residual connections, a wider MLP, LayerNorm, dropout, a bigger network) and
quotes a loss after each. Here every rung is data, a `Step` naming the config switches it flips
on the one `GPT` class, and `run_ladder` trains all requested rungs with the same data, seed,
batch and step budget, then scores each on the whole validation split with `evaluate_tokens`.
That makes the differences between rungs measurements rather than single-batch anecdotes.

Steps are cumulative: a step's config is `BASE`, then the changes of every step on its chain of
parents, then its own changes. Where chargpt's GPT differs from the lecture's code at a rung
(it always has an attention output projection, and its MLP always projects back to n_embd),
the step's `note` says so.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import Config, apply_overrides
from .errors import ConfigError

Overrides = dict[str, dict[str, Any]]

DEFAULT_MAX_STEPS = 2000
DEFAULT_BATCH_SIZE = 32
DEFAULT_SEED = 1337
DEFAULT_EVALS = 20
SAMPLE_CHARS = 240
# Seconds mode cannot know in advance how many steps fit, so the cosine schedule is stretched
# over this many steps; within any practical time limit the learning rate barely decays.
SECONDS_MODE_MAX_STEPS = 10_000_000

# The lecture's small model: 32-wide embeddings, 8 characters of context, ReLU, no dropout.
# Everything the later rungs add is switched off here. The optimiser recipe is chargpt's own
# (AdamW, warmup then cosine decay, gradient clipping), the same for every rung.
BASE: Overrides = {
    "model": {
        "arch": "gpt", "vocab_size": 0, "block_size": 8, "n_layer": 1, "n_head": 1,
        "n_embd": 32, "dropout": 0.0, "bias": True, "norm": "none", "residual": False,
        "mlp": False, "mlp_ratio": 1, "activation": "relu", "tie_weights": False,
    },
    "train": {
        "lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 100, "weight_decay": 0.1,
        "grad_clip": 1.0, "grad_accum": 1, "device": "auto", "dtype": "auto",
    },
}

# Budget keys belong to the ladder as a whole: a step may not give itself more training.
_BUDGET_KEYS = {"max_steps", "batch_size", "seed", "grad_accum"}


@dataclass(frozen=True)
class Step:
    """One rung: a name, the idea in a few words, and the switches it changes."""

    name: str
    idea: str
    changes: Overrides
    parent: str | None = None
    needs_cuda: bool = False
    note: str = ""


STEPS: tuple[Step, ...] = (
    Step("bigram", "next char from the current char alone (a lookup table)",
         {"model": {"arch": "bigram"}, "train": {"lr": 1e-2, "min_lr": 1e-3}},
         note="lr 1e-2 as in the lecture: a lone table learns slowly at 1e-3"),
    Step("one-head", "one masked self-attention head over the last 8 chars",
         {"model": {"n_layer": 1, "n_head": 1}},
         note="chargpt's attention keeps its output projection (the lecture has none here)"),
    Step("multi-head", "4 heads of size 8 instead of one of size 32",
         {"model": {"n_head": 4}}, parent="one-head"),
    Step("mlp", "a feed-forward layer after attention (n_embd wide, ReLU)",
         {"model": {"mlp": True}}, parent="multi-head",
         note="chargpt's MLP projects back to n_embd (the lecture's is Linear + ReLU only)"),
    Step("three-blocks", "stack 3 attention + MLP blocks, no residuals",
         {"model": {"n_layer": 3}}, parent="mlp"),
    Step("residual", "add each sub-layer's output to its input",
         {"model": {"residual": True}}, parent="three-blocks"),
    Step("mlp-4x", "MLP hidden layer 4x wider than the stream",
         {"model": {"mlp_ratio": 4}}, parent="residual"),
    Step("post-ln", "LayerNorm after each residual add (2017 Transformer)",
         {"model": {"norm": "post"}}, parent="mlp-4x"),
    Step("pre-ln", "LayerNorm before each sub-layer (GPT-2)",
         {"model": {"norm": "pre"}}, parent="mlp-4x"),
    Step("dropout", "dropout 0.2 on attention, residual branches, embeddings",
         {"model": {"dropout": 0.2}}, parent="pre-ln"),
    Step("bigger", "4 layers, 4 heads, 128 wide, 64 chars of context",
         {"model": {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 64}},
         parent="dropout",
         note="a CPU-sized scale-up; the lecture's is 6 layers, 6 heads, 384 wide, 256 context"),
    Step("gpu", "the lecture's full size (6x6x384, 256 context) on a CUDA GPU",
         {"model": {"n_layer": 6, "n_head": 6, "n_embd": 384, "block_size": 256},
          "train": {"lr": 3e-4, "min_lr": 3e-5, "device": "cuda"}},
         parent="bigger", needs_cuda=True,
         note="runs only when CUDA is available; never run on CPU, so no number is claimed"),
)

STEP_NAMES: tuple[str, ...] = tuple(s.name for s in STEPS)
_BY_NAME = {s.name: s for s in STEPS}


def get_step(name: str) -> Step:
    if name not in _BY_NAME:
        raise ConfigError(f"unknown ladder step {name!r} (available: {', '.join(STEP_NAMES)})")
    return _BY_NAME[name]


def parse_steps(spec: str) -> list[Step]:
    """'all' or comma-separated step names, returned in ladder order without duplicates."""
    spec = spec.strip()
    if spec == "all":
        return list(STEPS)
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise ConfigError(f"--steps needs 'all' or step names (available: {', '.join(STEP_NAMES)})")
    wanted = {get_step(n).name for n in names}
    return [s for s in STEPS if s.name in wanted]


def _merge(into: Overrides, changes: Overrides) -> None:
    for section, values in changes.items():
        into.setdefault(section, {}).update(values)


def step_overrides(step: Step | str) -> Overrides:
    """BASE plus the changes of the step's parents (oldest first) and of the step itself."""
    step = get_step(step) if isinstance(step, str) else step
    chain = [step]
    while chain[-1].parent is not None:
        chain.append(get_step(chain[-1].parent))
    merged: Overrides = {section: dict(values) for section, values in BASE.items()}
    for s in reversed(chain):
        leaked = _BUDGET_KEYS & set(s.changes.get("train", {}))
        if leaked:  # a bug in STEPS, not user input
            raise AssertionError(f"step {s.name} changes the shared budget: {sorted(leaked)}")
        _merge(merged, s.changes)
    return merged


def step_config(
    step: Step | str,
    *,
    max_steps: int | None = DEFAULT_MAX_STEPS,
    seconds: float | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = DEFAULT_SEED,
    out_dir: str | Path = "",
    data_dir: str | Path = "",
    vocab_size: int = 0,
    evals: int = DEFAULT_EVALS,
) -> Config:
    """The full config of one step under the ladder's shared budget.

    `evals` is how many points each val curve gets (with a step budget): the training-time
    estimates that draw the curves, not the whole-split scores in the table.
    """
    overrides = step_overrides(step)
    if evals < 1:
        raise ConfigError(f"--evals must be >= 1, got {evals}")
    if seconds is not None:
        steps, eval_interval = SECONDS_MODE_MAX_STEPS, 250
    else:
        if max_steps is None or max_steps < 1:
            raise ConfigError(f"--max-steps must be >= 1, got {max_steps}")
        steps, eval_interval = max_steps, max(1, max_steps // evals)
    _merge(overrides, {
        "model": {"vocab_size": vocab_size},
        "data": {"data_dir": str(data_dir)},
        "train": {
            "max_steps": steps, "batch_size": batch_size, "seed": seed,
            "eval_interval": eval_interval, "eval_iters": 50, "log_interval": 50,
            "warmup_steps": min(overrides["train"]["warmup_steps"], max(steps // 10, 1)),
            "out_dir": str(out_dir), "sample_chars": 0, "progress": False,
        },
    })
    name = step if isinstance(step, str) else step.name
    return apply_overrides(Config(), overrides, f"ladder step {name}")


def count_params(step: Step | str, vocab_size: int = 65) -> int:
    """Parameters of the step's model at `vocab_size`, counted without allocating weights."""
    import torch

    from .model import build_model

    cfg = step_config(step, vocab_size=vocab_size)
    with torch.device("meta"):
        return int(build_model(cfg.model).num_params())


def format_list(vocab_size: int = 65) -> str:
    """The `chargpt ladder --list` text: one line per step."""
    lines = [f"{'step':<13} {'params':>10}  idea (parameters at vocab {vocab_size})"]
    for s in STEPS:
        extra = "  [needs CUDA]" if s.needs_cuda else ""
        lines.append(f"{s.name:<13} {count_params(s, vocab_size):>10,}  {s.idea}{extra}")
    return "\n".join(lines)


# --- running ------------------------------------------------------------------------------------


@dataclass
class StepResult:
    """What one step measured (losses in nats per character over whole splits)."""

    name: str
    idea: str
    params: int
    status: str = "done"  # or "skipped: <reason>"
    steps: int = 0
    train_loss: float = math.nan
    val_loss: float = math.nan
    seconds: float = math.nan
    device: str = ""
    run_dir: str = ""
    sample: str = ""
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def bpc(self) -> float:
        return self.val_loss / math.log(2)

    @property
    def ran(self) -> bool:
        return self.status == "done"


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def train_slice(train: Any, n: int) -> Any:
    """The last `n` training characters, the ones just before the val split.

    Scoring all of a large train split would cost as much as the training itself; a slice as
    long as the val split measures the fit just as well and keeps the two numbers comparable.
    """
    return train[max(0, len(train) - n):]


def run_step(
    step: Step,
    out: Path,
    data_dir: Path,
    *,
    max_steps: int | None,
    seconds: float | None,
    batch_size: int,
    seed: int,
    vocab_size: int,
    sample_chars: int = SAMPLE_CHARS,
    evals: int = DEFAULT_EVALS,
    eval_batch_size: int = 256,
) -> StepResult:
    """Train one step in `out/<name>`, then score both whole splits and draw a sample."""
    from .launch import new_trainer
    from .run import load_run

    result = StepResult(step.name, step.idea, count_params(step, vocab_size), note=step.note)
    if step.needs_cuda and not _cuda_available():
        result.status = "skipped: needs a CUDA GPU, none available"
        return result
    cfg = step_config(step, max_steps=max_steps, seconds=seconds, batch_size=batch_size,
                      seed=seed, out_dir=out / step.name, data_dir=data_dir, evals=evals)
    trainer = new_trainer(cfg, quiet=True)
    trained = trainer.run(time_limit=seconds)
    if trained.interrupted_by is not None:
        # Ctrl-C or SIGTERM: the trainer saved last/; report the rung as unfinished and stop.
        result.status = f"interrupted at step {trained.step}"
        result.steps, result.run_dir = trained.step, str(trained.run_dir)
        return result
    # The final weights, not the best-on-a-few-batches ones: every step gets the same budget.
    run = load_run(trained.run_dir, "last", device=str(trainer.device))
    data = trainer.data
    result.steps = trained.step
    result.seconds = trained.elapsed
    result.device = run.device.type
    result.run_dir = str(trained.run_dir)
    result.val_loss = run.evaluate_ids(data.val, batch_size=eval_batch_size)
    result.train_loss = run.evaluate_ids(train_slice(data.train, len(data.val)),
                                         batch_size=eval_batch_size)
    if sample_chars:
        # Recomputing the context keeps exactly block_size characters of history per step.
        result.sample = run.generate("\n", sample_chars, seed=seed, use_cache=False)
    return result


def run_ladder(
    steps: Sequence[Step],
    out: str | Path,
    *,
    input: str | Path | None = None,
    max_steps: int | None = DEFAULT_MAX_STEPS,
    seconds: float | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = DEFAULT_SEED,
    sample_chars: int = SAMPLE_CHARS,
    evals: int = DEFAULT_EVALS,
    log: Callable[[str], None] = print,
) -> list[StepResult]:
    """Train and score `steps` on one prepared copy of `input`; write the report into `out`.

    The report (ladder.md, ladder.csv, ladder.json, ladder.png, samples.md) is rewritten after
    every step, so an interrupted ladder still leaves the rungs it finished.
    """
    from .datasets import fetch
    from .preparation import prepare
    from .prepared import load_prepared

    if (max_steps is None) == (seconds is None):
        raise ConfigError("give the ladder a budget of either max_steps or seconds")
    if seconds is not None and not (math.isfinite(seconds) and seconds > 0):
        raise ConfigError(f"--seconds must be > 0, got {seconds}")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    out = Path(out)
    taken = [s.name for s in steps if (out / s.name / "config.json").exists()]
    if taken:
        raise ConfigError(f"{out} already holds ladder runs ({', '.join(taken)}); "
                          "choose another --out")
    for s in steps:  # fail on an impossible config before any data or training work
        step_config(s, max_steps=max_steps, seconds=seconds, batch_size=batch_size, seed=seed,
                    evals=evals)
    source = Path(input) if input else fetch("shakespeare", progress=True)
    data_dir = out / "data"
    prepare(source, data_dir)
    data = load_prepared(data_dir)
    budget = f"{max_steps} steps" if seconds is None else f"{seconds:g} s"
    log(f"ladder: {len(steps)} step(s), {budget} each at batch {batch_size}, seed {seed}, "
        f"on {source} ({len(data.train):,} train / {len(data.val):,} val chars) -> {out}")
    results: list[StepResult] = []
    for i, step in enumerate(steps, 1):
        t0 = time.perf_counter()
        r = run_step(step, out, data_dir, max_steps=max_steps, seconds=seconds,
                     batch_size=batch_size, seed=seed, vocab_size=data.vocab_size,
                     sample_chars=sample_chars, evals=evals)
        results.append(r)
        if r.ran:
            log(f"[{i}/{len(steps)}] {r.name:<13} {r.params:>10,} params  train {r.train_loss:.4f}"
                f"  val {r.val_loss:.4f}  {r.bpc:.3f} bits/char  {r.seconds:.0f}s train "
                f"({time.perf_counter() - t0:.0f}s with scoring)")
        else:
            log(f"[{i}/{len(steps)}] {r.name:<13} {r.status}")
        write_report(results, out, budget=budget, batch_size=batch_size, seed=seed,
                     source=str(source))
        if r.status.startswith("interrupted"):
            log(f"stopped: the ladder was interrupted during {r.name}; the report in {out} "
                "covers the steps before it")
            return results
    log(f"wrote {out / 'ladder.md'}, ladder.csv, ladder.png and samples.md")
    return results


# --- the report ---------------------------------------------------------------------------------


def _num(x: float, fmt: str) -> str:
    return format(x, fmt) if math.isfinite(x) else ""


def format_markdown_table(results: Sequence[StepResult]) -> str:
    lines = [
        "| step | idea | parameters | train loss | val loss | bits/char | seconds |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if r.ran:
            cells = [f"{r.params:,}", _num(r.train_loss, ".4f"), _num(r.val_loss, ".4f"),
                     _num(r.bpc, ".3f"), _num(r.seconds, ".0f")]
            idea = r.idea
        else:
            cells = [f"{r.params:,}", "not run", "", "", ""]
            idea = f"{r.idea} ({r.status.removeprefix('skipped: ')})"
        lines.append(f"| {r.name} | {idea} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


CSV_COLUMNS = ("step", "idea", "parameters", "train_loss", "val_loss", "bits_per_char",
               "seconds", "steps", "device", "status")


def write_csv(results: Sequence[StepResult], path: Path) -> None:
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        for r in results:
            w.writerow([r.name, r.idea, r.params, _num(r.train_loss, ".4f"),
                        _num(r.val_loss, ".4f"), _num(r.bpc, ".4f"), _num(r.seconds, ".1f"),
                        r.steps, r.device, r.status])


def write_report(
    results: Sequence[StepResult], out: Path, *, budget: str, batch_size: int, seed: int,
    source: str,
) -> None:
    from .plots import plot_ladder_curves
    from .rundir import RunDir

    out.mkdir(parents=True, exist_ok=True)
    header = (f"Each step trained for {budget} at batch {batch_size}, seed {seed}, on {source}. "
              "Losses are nats per character of the final weights: val over the whole val "
              "split, train over the last train characters (as many as val has).\n\n")
    (out / "ladder.md").write_text(header + format_markdown_table(results), encoding="utf-8")
    write_csv(results, out / "ladder.csv")
    rows = [{**{k: v for k, v in vars(r).items() if k != "extra"}, "bits_per_char": r.bpc}
            for r in results]
    (out / "ladder.json").write_text(
        json.dumps(rows, indent=2, default=str).replace("NaN", "null") + "\n", encoding="utf-8")
    samples = []
    for r in results:
        body = f"```\n{r.sample.strip(chr(10))}\n```" if r.ran else f"({r.status})"
        samples.append(f"### {r.name}\n\n{body}\n")
    (out / "samples.md").write_text("\n".join(samples), encoding="utf-8")
    curves = {r.name: RunDir(Path(r.run_dir)).read_metrics() for r in results if r.run_dir}
    plot_ladder_curves(curves, out / "ladder.png",
                       title=f"val loss per ladder step ({budget}, batch {batch_size})")

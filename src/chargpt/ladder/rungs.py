"""The ladder: the lecture's model built up one idea at a time, then what came after it, as data.

"Build GPT from scratch" grows its model rung by rung (a bigram table, one attention head,
several heads, a feed-forward layer, blocks, residual connections, LayerNorm, the scaled-up
network) and quotes a validation loss after each. Every rung here is a `Rung`: the config
switches it flips on the one `GPT` class, cumulative along its chain of parents. The lecture's
part of the ladder uses the lecture's own modules (PyTorch-default initialisation, heads
concatenated without a projection, a one-layer feed-forward net, ...); the part past the
lecture starts from the lecture's model at laptop size and adds what small-model training
learned since, one idea a rung. A `Recipe` says how each rung is trained: `lecture` with the
hyperparameters the lecture's code uses at that rung (so its figures can be checked), `fair`
with one shared budget for every lecture rung (so the rungs can be compared). The rungs past
the lecture share one budget under both recipes. `Budget` holds what a user may change for a
whole ladder run, validated once. Running is ladder_run.py; the report is ladder_report.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from chargpt.config.schema import Config, apply_overrides
from chargpt.config.values import MAX_SEED, check_seed
from chargpt.errors import ConfigError

Overrides = dict[str, dict[str, Any]]
Part = Literal["lecture", "modern"]

# The lecture's first attention model: 32-wide embeddings, 8 characters of context, one head,
# PyTorch's default initialisation, the lecture's module shapes. Later rungs switch parts on.
BASE_MODEL: dict[str, Any] = {
    "arch": "gpt", "vocab_size": 0, "block_size": 8, "n_layer": 1, "n_head": 1,
    "n_embd": 32, "dropout": 0.0, "bias": True, "norm": "none", "norm_type": "layernorm",
    "residual": False, "mlp": False, "mlp_ratio": 1, "mlp_proj": False, "activation": "relu",
    "tie_weights": False, "pos_emb": "learned", "qk_norm": False, "zero_init_proj": False,
    "init": "torch", "attn_proj": False, "qkv_bias": False, "head_bias": True,
    "attn_scale": "embd", "emb_dropout": False, "value_embeds": False, "logit_softcap": 0.0,
}

# The lecture's training loop: AdamW with PyTorch's defaults (weight decay 0.01, betas 0.9 and
# 0.999), a constant learning rate, no warmup and no clipping, 5,000 steps of 32 sequences.
LECTURE_TRAIN: dict[str, Any] = {
    "optimizer": "adamw", "lr": 1e-3, "min_lr": 1e-3, "schedule": "constant",
    "warmup_steps": 0, "weight_decay": 0.01, "beta1": 0.9, "beta2": 0.999, "grad_clip": 0.0,
    "max_steps": 5000, "batch_size": 32,
}

# One budget for every lecture rung: the same steps, batch and schedule (warmup, cosine decay,
# clipping), so that differences between rungs come from the models alone.
FAIR_TRAIN: dict[str, Any] = {
    "optimizer": "adamw", "lr": 1e-3, "min_lr": 1e-4, "schedule": "cosine",
    "warmup_steps": 100, "weight_decay": 0.1, "beta1": 0.9, "beta2": 0.99, "grad_clip": 1.0,
    "max_steps": 5000, "batch_size": 32,
}

# Past the lecture, under both recipes: the fair recipe's schedule at laptop size, 2,000 steps
# of 16 sequences of 64 characters (two passes over Tiny Shakespeare).
MODERN_TRAIN: dict[str, Any] = {**FAIR_TRAIN, "max_steps": 2000, "batch_size": 16}

RECIPES: dict[str, str] = {
    "lecture": "each lecture rung with the hyperparameters the lecture's code uses for it",
    "fair": "every lecture rung with one budget: 5,000 steps of 32, warmup and cosine decay",
}

# Training-time estimates draw the curves only; cap their cost at about this many characters
# per split (the lecture's 200 batches of 32 x 8), so that evaluation never dominates.
EVAL_CHARS = 51_200
LECTURE_EVAL_ITERS = 200  # the lecture's eval_iters


@dataclass(frozen=True)
class Rung:
    """One idea: its switches, where it sits, and what the lecture says it scores.

    `changes` are inherited by every rung whose chain of parents passes through this one;
    `lecture_train` and `fair_train` apply to this rung alone under that recipe. `quote` is the
    lecture's own figure (val loss), `quote_source` where it is said, and `reference` what the
    lecture's scripts printed on a 2-core CPU like ours (their random-batch estimate).
    """

    name: str
    idea: str
    part: Part
    changes: Overrides = field(default_factory=dict)
    parent: str | None = None
    lecture_train: dict[str, Any] = field(default_factory=dict)
    fair_train: dict[str, Any] = field(default_factory=dict)
    quote: float | None = None
    quote_source: str = ""
    reference: float | None = None
    cpu_max_steps: int | None = None
    note: str = ""


def _m(**switches: Any) -> Overrides:
    return {"model": switches}


RUNGS: tuple[Rung, ...] = (
    Rung("bigram", "next char from the current char alone (a lookup table)", "lecture",
         _m(arch="bigram"), lecture_train={"lr": 1e-2, "min_lr": 1e-2, "max_steps": 3000},
         fair_train={"lr": 1e-2, "min_lr": 1e-3}, quote=2.49, quote_source="video",
         reference=2.491, note="learning rate 1e-2 under both recipes, as in the lecture: a "
         "table started at PyTorch's N(0, 1) does not converge at 1e-3 (2.78 after 5,000 "
         "steps, measured)"),
    Rung("one-head", "one masked self-attention head (size 32) over the last 8 chars",
         "lecture", quote=2.4, quote_source="video; commit: 2.5", reference=2.408),
    Rung("multi-head", "4 heads of size 8, concatenated", "lecture", _m(n_head=4),
         "one-head", quote=2.28, quote_source="commit", reference=2.286),
    Rung("feed-forward", "a Linear + ReLU layer after attention", "lecture", _m(mlp=True),
         "multi-head", quote=2.24, quote_source="commit", reference=2.241),
    Rung("blocks", "3 blocks of attention + feed-forward, no residuals", "lecture",
         _m(n_layer=3), "feed-forward"),
    Rung("residual", "residual connections, projections, a 4x wider feed-forward", "lecture",
         _m(residual=True, attn_proj=True, mlp_proj=True, mlp_ratio=4), "blocks",
         quote=2.08, quote_source="video", reference=2.081),
    Rung("layernorm", "LayerNorm before each sub-layer and before the head", "lecture",
         _m(norm="pre"), "residual", quote=2.06, quote_source="commit", reference=2.059),
    Rung("scaled-up", "6 layers, 6 heads, 384 wide, 256 chars, dropout 0.2", "lecture",
         _m(n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.2), "layernorm",
         lecture_train={"lr": 3e-4, "min_lr": 3e-4, "batch_size": 64},
         quote=1.48, quote_source="video", cpu_max_steps=40,
         note="on a CPU only the first 40 steps (a step takes ~20 s on 2 cores; the "
         "lecture's 5,000 would take more than a day)"),
    Rung("laptop", "the lecture's model at laptop size: 4 layers, 4 heads, 128 wide, "
         "64 chars", "modern", _m(n_layer=4, n_head=4, n_embd=128, block_size=64),
         "layernorm"),
    Rung("gpt2", "GPT-2's conventions: std-0.02 init, GELU, tied head, scale by head size",
         "modern", _m(init="gpt2", activation="gelu", tie_weights=True, head_bias=False,
                      qkv_bias=True, attn_scale="head"), "laptop"),
    Rung("rope", "rotary position embeddings instead of learned ones", "modern",
         _m(pos_emb="rope"), "gpt2"),
    Rung("rmsnorm", "RMSNorm instead of LayerNorm", "modern", _m(norm_type="rmsnorm"),
         "rope"),
    Rung("relu2", "ReLU squared instead of GELU", "modern", _m(activation="relu2"), "rmsnorm"),
    Rung("qk-norm", "RMS-normalised queries and keys", "modern", _m(qk_norm=True), "relu2"),
    Rung("zero-init", "projections into the residual stream start at zero", "modern",
         _m(zero_init_proj=True), "qk-norm"),
    Rung("no-bias", "no biases anywhere", "modern", _m(bias=False), "zero-init"),
    Rung("untied", "separate input embedding and output head", "modern",
         _m(tie_weights=False), "no-bias"),
    Rung("muon", "Muon (orthogonalised momentum) for the blocks' matrices", "modern",
         {"train": {"optimizer": "muon", "muon_lr": 0.02, "muon_momentum": 0.95}}, "untied"),
    Rung("wsd", "warmup-stable-decay: full rate, then a linear cooldown", "modern",
         {"train": {"schedule": "wsd", "cooldown_frac": 0.5}}, "muon"),
    Rung("value-embeds", "a per-block token table added to the attention values", "modern",
         _m(value_embeds=True), "wsd"),
    Rung("softcap", "logits soft-capped at 15 with tanh", "modern", _m(logit_softcap=15.0),
         "value-embeds"),
)

RUNG_NAMES: tuple[str, ...] = tuple(r.name for r in RUNGS)
_BY_NAME = {r.name: r for r in RUNGS}
PARTS: dict[str, Part] = {"lecture": "lecture", "modern": "modern"}
DEFAULT_SEEDS: dict[Part, int] = {"lecture": 3, "modern": 1}


def get_rung(name: str) -> Rung:
    if name not in _BY_NAME:
        raise ConfigError(f"unknown ladder rung {name!r} (available: {', '.join(RUNG_NAMES)})")
    return _BY_NAME[name]


def parse_rungs(spec: str) -> list[Rung]:
    """'all', 'lecture', 'modern' or comma-separated names, in ladder order, no duplicates."""
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise ConfigError("--rungs needs 'all', 'lecture', 'modern' or rung names "
                          f"(available: {', '.join(RUNG_NAMES)})")
    wanted: set[str] = set()
    for n in names:
        if n == "all":
            wanted.update(RUNG_NAMES)
        elif n in PARTS:
            wanted.update(r.name for r in RUNGS if r.part == n)
        else:
            wanted.add(get_rung(n).name)
    return [r for r in RUNGS if r.name in wanted]


@dataclass(frozen=True)
class Budget:
    """How a whole ladder run is trained; anything left None comes from the recipe."""

    recipe: str = "lecture"
    seeds: int | None = None  # runs per rung; None: 3 for lecture rungs, 1 past the lecture
    seed: int = 1337  # the first seed; further runs use seed + 1, seed + 2, ...
    max_steps: int | None = None  # every rung trains this many steps instead
    seconds: float | None = None  # every rung trains this long instead
    batch_size: int | None = None
    evals: int = 20  # points on each training curve
    sample_chars: int = 240
    cuda: bool = False  # whether rungs run on a CUDA GPU (then nothing is cut short)

    def __post_init__(self) -> None:
        def check(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        check(self.recipe in RECIPES,
              f"unknown recipe {self.recipe!r} (available: {', '.join(RECIPES)})")
        check(self.seeds is None or self.seeds >= 1, f"--seeds must be >= 1, got {self.seeds}")
        check(self.max_steps is None or self.max_steps >= 1,
              f"--max-steps must be >= 1, got {self.max_steps}")
        check(self.max_steps is None or self.seconds is None,
              "give the ladder either --max-steps or --seconds, not both")
        check(self.seconds is None or (math.isfinite(self.seconds) and self.seconds > 0),
              f"--seconds must be a finite number > 0, got {self.seconds}")
        check_seed(self.seed, "--seed")
        n = self.seeds or max(DEFAULT_SEEDS.values())
        check(self.seed + n - 1 <= MAX_SEED, f"--seed must be at most 2**63 - {n} for {n} "
              f"seeds (runs are seeded seed, seed + 1, ...), got {self.seed}")
        check(self.batch_size is None or self.batch_size >= 1,
              f"--batch-size must be >= 1, got {self.batch_size}")
        check(self.evals >= 1, f"--evals must be >= 1, got {self.evals}")
        check(self.sample_chars >= 0, f"sample_chars must be >= 0, got {self.sample_chars}")

    def seeds_for(self, rung: Rung) -> list[int]:
        n = self.seeds if self.seeds is not None else DEFAULT_SEEDS[rung.part]
        if rung.cpu_max_steps is not None and self.reduced(rung) and self.seeds is None:
            n = 1  # a reduced run of the big model is a glimpse, not a measurement
        return [self.seed + i for i in range(n)]

    def reduced(self, rung: Rung) -> bool:
        """Whether the rung is cut to its CPU budget (no CUDA, and no budget of the user's)."""
        return (rung.cpu_max_steps is not None and not self.cuda
                and self.max_steps is None and self.seconds is None)


# Seconds mode cannot know in advance how many steps fit, so schedules are stretched over
# this many steps; within any practical time limit a decaying rate barely moves.
SECONDS_MODE_MAX_STEPS = 10_000_000


def _chain(rung: Rung) -> list[Rung]:
    chain = [rung]
    while chain[-1].parent is not None:
        chain.append(get_rung(chain[-1].parent))
    return chain[::-1]  # oldest first


def _merge(into: Overrides, changes: Overrides) -> None:
    for section, values in changes.items():
        into.setdefault(section, {}).update(values)


def rung_train(rung: Rung, budget: Budget) -> dict[str, Any]:
    """The rung's [train] settings under the budget's recipe, before the budget's overrides."""
    if rung.part == "modern":
        return dict(MODERN_TRAIN)
    if budget.recipe == "lecture":
        return {**LECTURE_TRAIN, **rung.lecture_train}
    return {**FAIR_TRAIN, **rung.fair_train}


def rung_config(
    rung: Rung | str,
    budget: Budget,
    *,
    seed: int | None = None,
    out_dir: str | Path = "",
    data_dir: str | Path = "",
    vocab_size: int = 0,
) -> Config:
    """The full config of one run of `rung` under `budget`."""
    rung = get_rung(rung) if isinstance(rung, str) else rung
    overrides: Overrides = {"model": dict(BASE_MODEL), "train": rung_train(rung, budget)}
    for r in _chain(rung):
        _merge(overrides, r.changes)
    train = overrides["train"]
    if budget.batch_size is not None:
        train["batch_size"] = budget.batch_size
    if budget.seconds is not None:
        train["max_steps"] = SECONDS_MODE_MAX_STEPS
    elif budget.max_steps is not None:
        train["max_steps"] = budget.max_steps
    elif budget.reduced(rung):
        train["max_steps"] = rung.cpu_max_steps
    steps = train["max_steps"]
    block = overrides["model"]["block_size"]
    iters = min(LECTURE_EVAL_ITERS, max(1, EVAL_CHARS // (train["batch_size"] * block)))
    _merge(overrides, {
        "model": {"vocab_size": vocab_size},
        "data": {"data_dir": str(data_dir)},
        "train": {
            "seed": budget.seed if seed is None else seed, "grad_accum": 1,
            "eval_interval": 250 if budget.seconds is not None else max(1, steps // budget.evals),
            "eval_iters": iters, "log_interval": 50, "out_dir": str(out_dir),
            "warmup_steps": min(train["warmup_steps"], max(steps // 10, 0)),
            "sample_chars": 0, "progress": False, "device": "auto", "dtype": "auto",
        },
    })
    return apply_overrides(Config(), overrides, f"ladder rung {rung.name}")


def count_params(rung: Rung | str, vocab_size: int = 65) -> int:
    """Parameters of the rung's model at `vocab_size`, counted without allocating weights."""
    import torch

    from chargpt.model.build import build_model

    cfg = rung_config(rung, Budget(), vocab_size=vocab_size)
    with torch.device("meta"):
        return int(build_model(cfg.model).num_params())


def format_list(vocab_size: int = 65) -> str:
    """The `chargpt ladder --list` text: one line per rung."""
    lines = [f"{'rung':<13} {'part':<8} {'params':>10}  idea (parameters at vocab {vocab_size})"]
    for r in RUNGS:
        lines.append(f"{r.name:<13} {r.part:<8} {count_params(r, vocab_size):>10,}  {r.idea}")
    return "\n".join(lines)

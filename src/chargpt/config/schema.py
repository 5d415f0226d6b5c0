"""Typed run configuration: the dataclasses, their validation, and how overrides apply.

A run is described by one `Config` made of three sections (`model`, `data`, `train`). Every
field has a type, a default and a docstring; the docstring is the field's `--help` text. Values
are layered by config/resolve.py (defaults, a preset, a named size, a TOML file, CLI flags).
Unknown keys and impossible values raise `ConfigError` with a one-line message, so a typo never
silently trains the wrong model.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from chargpt.config.fields import coerce, field_types
from chargpt.config.sizing import load_rule
from chargpt.config.values import (
    check_device,
    check_time_budget,
    parse_cooldown_plan,
    parse_log_to,
)
from chargpt.errors import ConfigError


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass
class ModelConfig:
    """The network: which model, how big, and which parts of the Transformer are switched on."""

    arch: Literal["gpt", "bigram"] = "gpt"
    """Model family: 'gpt' (decoder-only Transformer) or 'bigram' (the lecture's baseline)."""
    vocab_size: int = 0
    """Number of distinct characters; taken from the prepared data (0 = not known yet)."""
    block_size: int = 64
    """Context length in characters: the most the model looks back."""
    n_layer: int = 4
    """Number of Transformer blocks."""
    n_head: int = 4
    """Attention heads per block; must divide n_embd."""
    n_embd: int = 128
    """Width of the residual stream (embedding size)."""
    dropout: float = 0.0
    """Dropout probability on attention weights, residual branches and embeddings."""
    bias: bool = True
    """Use biases in Linear layers and LayerNorms."""
    norm: Literal["pre", "post", "none"] = "pre"
    """LayerNorm placement: 'pre' (GPT-2), 'post' (original Transformer) or 'none'."""
    residual: bool = True
    """Add each sub-layer's output to its input (residual connections)."""
    mlp: bool = True
    """Include the feed-forward MLP in each block."""
    mlp_ratio: int = 4
    """Hidden width of the MLP as a multiple of n_embd."""
    activation: Literal["gelu", "relu", "relu2"] = "gelu"
    """Non-linearity inside the MLP: 'gelu', 'relu' or 'relu2' (ReLU squared)."""
    tie_weights: bool = False
    """Share the token-embedding matrix with the output head."""
    pos_emb: Literal["learned", "rope", "none"] = "learned"
    """Positions: 'learned' absolute embeddings, 'rope' (rotary, relative) or 'none'."""
    rope_base: float = 10000.0
    """Base of the rotary frequencies (pos_emb 'rope' only)."""
    qk_norm: bool = False
    """RMS-normalise each head's queries and keys before attention (QK-norm)."""
    zero_init_proj: bool = False
    """Initialise the projections into the residual stream to zero (blocks start as identity)."""
    norm_type: Literal["layernorm", "rmsnorm"] = "layernorm"
    """Normalisation layer used where `norm` places one: 'layernorm' or 'rmsnorm'."""
    init: Literal["gpt2", "torch"] = "gpt2"
    """Initial weights: 'gpt2' (normal, std 0.02, residual projections scaled down with depth)
    or 'torch' (PyTorch's per-layer defaults, as the lecture's code uses)."""
    attn_proj: bool = True
    """Mix the concatenated heads with an output projection (the lecture adds it together
    with residual connections)."""
    mlp_proj: bool = True
    """Project the MLP's hidden layer back to n_embd; off, the MLP is a single Linear plus
    the activation, the lecture's first feed-forward layer (needs mlp_ratio 1)."""
    qkv_bias: bool = True
    """Biases on the query, key and value projections when `bias` is on (the lecture's heads
    have none)."""
    head_bias: bool = False
    """A bias on the output head (the lecture's lm_head has one; GPT-2's has none)."""
    attn_scale: Literal["head", "embd"] = "head"
    """Divide attention scores by sqrt(head size), or by sqrt(n_embd) as the lecture's code
    does (a slip its video corrects; it only differs with more than one head)."""
    emb_dropout: bool = True
    """Apply dropout to the summed embeddings too (GPT-2 does; the lecture's code does not)."""
    value_embeds: bool = False
    """Give each block a token-indexed table added to its attention values (value
    embeddings, from the speedrun community); zero-initialised, so training switches it on."""
    logit_softcap: float = 0.0
    """Squash the output logits smoothly into (-cap, cap) with cap * tanh(logits / cap)
    (0 = off)."""

    def __post_init__(self) -> None:
        _check(self.vocab_size >= 0, f"vocab_size must be >= 0, got {self.vocab_size}")
        _check(self.block_size >= 1, f"block_size must be >= 1, got {self.block_size}")
        if self.arch == "gpt":
            _check(self.n_layer >= 1, f"n_layer must be >= 1, got {self.n_layer}")
            _check(self.n_head >= 1, f"n_head must be >= 1, got {self.n_head}")
            _check(self.n_embd >= 1, f"n_embd must be >= 1, got {self.n_embd}")
            _check(
                self.n_embd % self.n_head == 0,
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})",
            )
            _check(self.mlp_ratio >= 1, f"mlp_ratio must be >= 1, got {self.mlp_ratio}")
            _check(
                self.mlp_proj or self.mlp_ratio == 1,
                f"mlp_proj off makes the MLP one n_embd-wide layer; it needs mlp_ratio 1, "
                f"got {self.mlp_ratio}",
            )
            _check(
                self.pos_emb != "rope" or self.head_dim % 2 == 0,
                f"pos_emb 'rope' needs an even head size, got n_embd/n_head = {self.head_dim}",
            )
        _check(
            math.isfinite(self.rope_base) and self.rope_base > 1.0,
            f"rope_base must be > 1, got {self.rope_base}",
        )
        _check(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        _check(
            math.isfinite(self.logit_softcap) and self.logit_softcap >= 0.0,
            f"logit_softcap must be >= 0, got {self.logit_softcap}",
        )

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


@dataclass
class DataConfig:
    """Where the text comes from and how it is split."""

    input: str = ""
    """A UTF-8 text file, folder of .txt files or glob to prepare (default: Tiny Shakespeare)."""
    data_dir: str = ""
    """A directory made by `chargpt prepare`; used instead of --input."""
    dataset: str = "shakespeare"
    """Named corpus downloaded on first use when neither --input nor --data-dir is given:
    shakespeare, or the benchmarks enwik8 and text8 with their standard split."""
    val_fraction: float = 0.1
    """Fraction of the text (taken from the end) held out for validation."""
    test_fraction: float = 0.0
    """Fraction held out after val, at the very end, as a test split for `chargpt eval --split
    test` (0 = none). A benchmark dataset (enwik8, text8) uses its standard split instead."""
    unit: Literal["char", "byte"] = "char"
    """What one token is: 'char' (a Unicode code point) or 'byte' (one byte of the UTF-8 text,
    the unit enwik8 results are reported in)."""

    def __post_init__(self) -> None:
        _check(
            0.0 < self.val_fraction < 1.0,
            f"val_fraction must be in (0, 1), got {self.val_fraction}",
        )
        _check(
            0.0 <= self.test_fraction < 1.0 and self.val_fraction + self.test_fraction < 1.0,
            f"test_fraction must be in [0, 1) and leave text to train on with val_fraction "
            f"{self.val_fraction}, got {self.test_fraction}",
        )

        from chargpt.data.datasets import dataset  # where the names live

        dataset(self.dataset)
        _check(
            not (self.input and self.data_dir),
            "give either --input or --data-dir, not both",
        )


@dataclass
class TrainConfig:
    """Optimisation, evaluation, logging and hardware."""

    out_dir: str = ""
    """Run directory for config, metrics, checkpoints and plots (default: runs/<timestamp>)."""
    max_steps: int = 2000
    """Number of optimizer steps. With time_budget the plan sets it: give one of the two
    (step_cap caps a budget's steps)."""
    time_budget: str = ""
    """Train for a wall-clock time instead of max_steps, e.g. '90s', '10m', '2h': the steps are
    timed and max_steps is set so the whole schedule, every evaluation and the final checkpoint
    fit in it; evaluations are spaced (never closer than eval_interval) and, in a short budget,
    shortened to take at most 5% of it (see budget.py). Not with max_steps, which the plan sets:
    step_cap caps it."""
    step_cap: int = 0
    """With time_budget: the most steps its plans may give the run (0 = no cap; more than the
    steps a budget times before its first plan: 10, or warmup_steps if fewer). --size auto sets
    it, lower than yours if need be, where more passes over a small corpus would be learnt by
    heart."""
    planned_steps: int = 0
    """The step count a run planned for itself: a time_budget's plan, or the end the plateau
    rule chose (0 = not planned); recorded in config.json so that a resumed run keeps it."""
    batch_size: int = 12
    """Sequences per micro-batch."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    lr: float = 1e-3
    """Peak learning rate."""
    min_lr: float = 1e-4
    """Learning rate at the end of the cosine decay."""
    warmup_steps: int = 100
    """Steps of linear warmup from 0 to lr."""
    lr_decay_steps: int = 0
    """Step at which the cosine decay reaches min_lr (0 = max_steps)."""
    weight_decay: float = 0.1
    """AdamW weight decay, applied to matrices only (not biases, norms or embeddings)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.99
    """AdamW beta2."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 = off)."""
    optimizer: Literal["adamw", "muon"] = "adamw"
    """'adamw' for every parameter, or 'muon' for the blocks' matrices plus AdamW for the rest."""
    muon_lr: float = 0.02
    """Peak learning rate of Muon's matrices; it follows the same schedule as lr."""
    muon_momentum: float = 0.95
    """Muon's (Nesterov) momentum."""
    muon_ns_steps: int = 5
    """Newton-Schulz iterations Muon uses to orthogonalise each update."""
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    """After warmup: 'cosine' decay to min_lr, 'wsd' (stable at lr, then a linear cooldown)
    or 'constant' (lr throughout, as in the lecture)."""
    cooldown_frac: float = 0.2
    """Fraction of the decay steps spent in the linear cooldown to min_lr (schedule 'wsd')."""
    eval_interval: int = 250
    """Evaluate train and val loss every this many steps (and at the last step)."""
    eval_iters: int = 100
    """Batches averaged per split at each evaluation."""
    log_interval: int = 10
    """Record the running training loss every this many steps."""
    seed: int = 1337
    """Seed for weights, batches and dropout; the same seed gives the same run on CPU."""
    device: str = "auto"
    """Device: 'auto' (cuda, then mps, then cpu), 'cpu', 'cuda', 'cuda:1', 'mps'."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Autocast precision: 'auto' is bfloat16 where its matmuls are fast, else float32."""
    compile: bool = False
    """Compile the model with torch.compile (faster on GPU after a warm-up)."""
    nonfinite: Literal["stop", "skip"] = "stop"
    """On a NaN/inf loss: 'stop' (checked at log steps, no extra sync; last good checkpoint
    kept) or 'skip' the update (checked every step, one host sync per step)."""
    data_order: Literal["random", "epoch"] = "random"
    """Batch windows: 'random' (uniform, with replacement) or 'epoch' (each token once a pass)."""
    sample_chars: int = 300
    """Characters to sample at the end of training (0 = none)."""
    progress: bool = True
    """Show a progress bar when writing to a terminal."""
    log_to: str = ""
    """Experiment trackers mirroring metrics.jsonl: 'tensorboard', 'wandb' or both, comma-separated
    or repeated (extras: pip install 'chargpt[tensorboard]' / 'chargpt[wandb]')."""
    cooldown_plan: str = ""
    """Set by a time budget's plans, not by hand: where a WSD run's cooldown was re-aimed, as
    'step:end' pairs. From each step the rate falls in a straight line from where it is toward
    min_lr at that end, so a plan may move max_steps during the cooldown without changing a
    rate already used. Empty: the schedule's own cooldown."""
    size: str = ""
    """The model's size from the sizing rule (config/sizing.json), over the preset's recipe:
    'auto' chooses the size a time budget buys on this machine for this corpus, timing the
    candidates first (the default of `chargpt train --time` without --preset, --config or model
    flags); a size's name ('3x96', '4x192', ...) takes that one; empty keeps the preset's."""
    size_choice: str = ""
    """Set by --size, not by hand: what auto chose and why, or a named size's forecast."""
    patience: int = 0
    """End the run early once this many evaluations in a row have not beaten the best val loss
    by more than 0.2% (0 = off, train to max_steps). A WSD run then cools down over the next
    fifth of the steps taken and ends; any other schedule stops at once. best/ keeps the best
    model either way. Off by default: it saves time, not the model (docs/fast.md); try 2 on a
    small corpus."""
    plateau_step: int = 0
    """Set by the plateau rule (`patience`), not by hand: the step at which the val loss had
    stopped improving and the run chose to end early (0 = it did not); max_steps and
    cooldown_plan record the end it chose."""
    init_from: str = ""
    """Start this new run from a trained model: a chargpt run or checkpoint directory, a Hugging
    Face folder chargpt exported, or nanoGPT's ckpt.pt (only read). The model's shape is the
    source's; characters new to it are added to its vocabulary; the learning rates default to a
    fraction of the preset's."""

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "grad_accum", "eval_interval", "eval_iters",
                     "log_interval"):
            value = getattr(self, name)
            _check(value >= 1, f"{name} must be >= 1, got {value}")
        for name in ("warmup_steps", "lr_decay_steps", "sample_chars", "patience",
                     "plateau_step", "step_cap"):
            value = getattr(self, name)
            _check(value >= 0, f"{name} must be >= 0, got {value}")
        for name in ("lr", "min_lr", "weight_decay", "grad_clip"):
            value = getattr(self, name)
            _check(math.isfinite(value) and value >= 0, f"{name} must be >= 0, got {value}")
        _check(self.lr > 0, f"lr must be > 0, got {self.lr}")
        _check(self.min_lr <= self.lr, f"min_lr ({self.min_lr}) must be <= lr ({self.lr})")
        _check(math.isfinite(self.muon_lr) and self.muon_lr > 0,
               f"muon_lr must be > 0, got {self.muon_lr}")
        _check(0.0 <= self.muon_momentum < 1.0,
               f"muon_momentum must be in [0, 1), got {self.muon_momentum}")
        _check(self.muon_ns_steps >= 1, f"muon_ns_steps must be >= 1, got {self.muon_ns_steps}")
        _check(self.planned_steps >= 0, f"planned_steps must be >= 0, got {self.planned_steps}")
        check_time_budget(self)
        _check(0.0 < self.cooldown_frac <= 1.0,
               f"cooldown_frac must be in (0, 1], got {self.cooldown_frac}")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            _check(0.0 <= value < 1.0, f"{name} must be in [0, 1), got {value}")
        check_device(self.device)

        parse_log_to(self.log_to)
        parse_cooldown_plan(self.cooldown_plan)
        if self.size not in ("", "auto"):
            load_rule().size(self.size)

    @property
    def decay_steps(self) -> int:
        return self.lr_decay_steps or self.max_steps

    @property
    def epoch_order(self) -> bool:
        """Whether batches read every window once a pass (the forecast prices their tokens
        higher than random windows')."""
        return self.data_order == "epoch"


@dataclass
class Config:
    """A whole run: model, data and training."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> Config:
        return apply_overrides(cls(), d, source)


SECTIONS: dict[str, type] = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}

# Fields a run sets itself (from its data, its plans, its choices) and records in config.json:
# no flag offers them (config/flags.py), and a user's config file that gives one is an error
# (`check_user_tables`), never a value silently replaced.
INTERNAL_FIELDS = {("model", "vocab_size"), ("train", "planned_steps"), ("train", "plateau_step"),
                   ("train", "size_choice"), ("train", "cooldown_plan")}


def check_user_tables(tables: dict[str, Any], source: str) -> None:
    """Refuse a field of INTERNAL_FIELDS in tables a user wrote (a TOML config file)."""
    for section, values in tables.items():
        for key in values if isinstance(values, dict) else ():
            _check((section, key) not in INTERNAL_FIELDS,
                   f"{source}: {section}.{key} is set by the run itself, not by hand; remove it")


def apply_overrides(cfg: Config, overrides: dict[str, Any], source: str) -> Config:
    """Return a new Config with `overrides` ({section: {key: value}}) applied and validated."""
    sections: dict[str, dict[str, Any]] = {}
    for name, values in overrides.items():
        _check(name in SECTIONS, f"{source}: unknown section [{name}] "
                                 f"(expected one of {', '.join(SECTIONS)})")
        _check(isinstance(values, dict), f"{source}: [{name}] must be a table")
        types_ = field_types(SECTIONS[name])
        current = dataclasses.asdict(getattr(cfg, name))
        for key, value in values.items():
            _check(key in types_, f"{source}: unknown key '{key}' in [{name}]")
            current[key] = coerce(value, types_[key], f"{source}: {name}.{key}")
        sections[name] = current
    try:
        return dataclasses.replace(
            cfg, **{name: SECTIONS[name](**values) for name, values in sections.items()}
        )
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None

"""Resolving a run's values: the layers, later wins, and what a size may not be told.

Dataclass defaults, then a preset (default: shakespeare-cpu), then a named size of the sizing
rule when [train] size names one, then a TOML file, then the command line's overrides. With
`--size auto` the shape is the rule's to choose, so a shape value given as well is an error;
with a time budget the step count is the budget's to plan, so a max_steps given as well is one
too (`check_length`; a preset's max_steps is only a default, which the plan replaces).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from chargpt.config.presets import DEFAULT_PRESET, load_preset, load_toml
from chargpt.config.schema import Config, TrainConfig, apply_overrides, check_user_tables
from chargpt.config.sizing import load_rule
from chargpt.errors import ConfigError


def resolve_config(
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> Config:
    """Defaults, then a preset (default: shakespeare-cpu), then a named size of the sizing rule
    when [train] size names one, then a TOML file, then overrides."""
    layers = [(load_preset(preset or DEFAULT_PRESET), f"preset {preset}")]
    if config_file:
        layers.append((load_toml(config_file), str(config_file)))
        check_user_tables(*layers[-1])
    if overrides:
        layers.append((overrides, "command line"))
    cfg = Config()
    for tables, source in layers:
        cfg = apply_overrides(cfg, tables, source)
    check_length(cfg.train, layers[1:])
    if cfg.train.size == "auto":
        _check_auto_size(layers[1:])
    elif cfg.train.size:
        sized = load_rule().size(cfg.train.size).overrides()
        cfg = Config()
        for tables, source in [layers[0], (sized, f"size {cfg.train.size}"), *layers[1:]]:
            cfg = apply_overrides(cfg, tables, source)
    return cfg


SIZED_KEYS = {"model": ("n_layer", "n_embd", "n_head", "block_size", "dropout"),
              "train": ("batch_size",)}


def _check_auto_size(layers: list[tuple[dict[str, Any], str]]) -> None:
    """--size auto chooses the shape: a shape value given as well is an error, not ignored."""
    for tables, source in layers:
        for section, keys in SIZED_KEYS.items():
            given = [k for k in keys if k in (tables.get(section) or {})]
            if given:
                raise ConfigError(f"{source}: size 'auto' chooses {', '.join(given)}; give "
                                  "either those or the automatic size")


def check_length(train: TrainConfig, layers: list[tuple[dict[str, Any], str]]) -> None:
    """A time budget plans max_steps itself, so a max_steps the user gave (a layer of theirs:
    a TOML file, the command line) beside an unplanned budget would be silently replaced by the
    plan, or cut the budget short before it planned: one of the two is an error instead."""
    if not train.time_budget or train.planned_steps:
        return
    for tables, source in layers:
        if "max_steps" in (tables.get("train") or {}):
            raise ConfigError(f"{source}: max_steps and the time budget ({train.time_budget}) "
                              "both set the run's length; give --max-steps or --time, not "
                              "both (--step-cap N caps the steps a budget plans)")

"""Resolving a run's values: the layers, later wins, and what a size may not be told.

Dataclass defaults, then a preset (default: shakespeare-cpu), then a named size of the sizing
rule when [train] size names one, then a TOML file, then the command line's overrides. With
`--size auto` the shape is the rule's to choose, so a shape value given as well is an error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from chargpt.config.presets import DEFAULT_PRESET, load_preset, load_toml
from chargpt.config.schema import Config, apply_overrides
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
    if overrides:
        layers.append((overrides, "command line"))
    cfg = Config()
    for tables, source in layers:
        cfg = apply_overrides(cfg, tables, source)
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

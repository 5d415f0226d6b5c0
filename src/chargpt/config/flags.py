"""Command-line flags generated from the config dataclasses: one flag per field.

Every field of `ModelConfig`, `DataConfig` and `TrainConfig` becomes a flag (`n_layer` ->
`--n-layer`) whose help is the docstring written under the field; booleans get `--x/--no-x`,
`Literal` fields their choices. A flag left out is None, so only what the user typed overrides
the preset and the TOML file (`config_overrides`).
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, Literal

from chargpt.config.fields import field_docs, field_types
from chargpt.config.resolve import resolve_config
from chargpt.config.schema import INTERNAL_FIELDS, SECTIONS

__all__ = ["add_config_flags", "config_overrides"]

HIDDEN_FIELDS = INTERNAL_FIELDS  # set by the run itself
FLAG_ALIASES = {("train", "out_dir"): ["--out"], ("train", "time_budget"): ["--time"]}
REPEATABLE_FLAGS = {("train", "log_to")}  # each use adds to a comma-separated list


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per config field, grouped by section; defaults shown are the default preset's."""
    defaults = resolve_config()
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(f"[{section}] {cls.__doc__.splitlines()[0].lower()}")
        docs, types_ = field_docs(cls), field_types(cls)
        for f in dataclasses.fields(cls):
            if (section, f.name) in HIDDEN_FIELDS:
                continue
            default = getattr(getattr(defaults, section), f.name)
            help_ = docs.get(f.name, "")
            if default not in ("", None):
                help_ += f" (default: {default})"
            help_ = help_.replace("%", "%%")
            names = [_flag(f.name), *FLAG_ALIASES.get((section, f.name), [])]
            kw: dict[str, Any] = {"dest": f"{section}.{f.name}", "default": None, "help": help_}
            tp = types_[f.name]
            if tp is bool:
                group.add_argument(*names, action=argparse.BooleanOptionalAction, **kw)
            elif (section, f.name) in REPEATABLE_FLAGS:
                group.add_argument(*names, action="append", metavar="NAME[,NAME]", **kw)
            elif typing.get_origin(tp) is Literal:
                group.add_argument(*names, choices=typing.get_args(tp), **kw)
            else:
                group.add_argument(*names, type=tp, metavar=tp.__name__.upper(), **kw)


def config_overrides(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    overrides: dict[str, dict[str, Any]] = {}
    for dest, value in vars(args).items():
        if "." in dest and value is not None:
            if isinstance(value, list):  # a repeatable flag
                value = ",".join(value)
            section, key = dest.split(".", 1)
            overrides.setdefault(section, {})[key] = value
    return overrides

"""The shipped presets and TOML config files: the tables a `Config` is built from.

A preset is a TOML file in the package's `presets/` folder, named by its file name; its first
line (a comment) describes it, and a top-level `extends = "other"` starts it from another
preset. `load_toml` reads a user's `--config` file. Both return plain tables
({section: {key: value}}); config.py checks them against the dataclasses
(`config.resolve.resolve_config`: defaults, then a preset, then a file, then flags).
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path
from typing import Any

from chargpt.errors import ConfigError
from chargpt.fileio import read_bytes

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["DEFAULT_PRESET", "load_preset", "load_toml", "preset_description", "preset_names"]

DEFAULT_PRESET = "shakespeare-cpu"


def preset_names() -> list[str]:
    """The shipped presets' names, sorted."""
    files = resources.files("chargpt.config").joinpath("presets").iterdir()
    return sorted(p.name[: -len(".toml")] for p in files if p.name.endswith(".toml"))


def load_preset(name: str, _seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """A preset's tables; a top-level `extends = "other"` starts from another preset."""
    if name not in preset_names():
        raise ConfigError(f"unknown preset '{name}' (available: {', '.join(preset_names())})")
    if name in _seen:
        raise ConfigError(f"presets extend each other in a loop: {' -> '.join(_seen)}")
    text = resources.files("chargpt.config").joinpath("presets", f"{name}.toml").read_text("utf-8")
    data = tomllib.loads(text)
    base = data.pop("extends", None)
    if base is None:
        return data
    merged = load_preset(base, (*_seen, name))
    for section, values in data.items():
        merged.setdefault(section, {}).update(values)
    return merged


def preset_description(name: str) -> str:
    """The one-line description a preset's first comment gives."""
    text = resources.files("chargpt.config").joinpath("presets", f"{name}.toml").read_text("utf-8")
    first = text.splitlines()[0] if text else ""
    return first.lstrip("# ").strip()


def load_toml(path: str | Path) -> dict[str, Any]:
    """The tables of a user's TOML config file; an unreadable or invalid file is one line."""
    path = Path(path)
    raw = read_bytes(path, what="config file", error=ConfigError)
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not valid UTF-8 (byte offset {e.start})") from None

"""What a config dataclass says about its fields: the docstring under each (the `--help` text,
`field_docs`), their types (`field_types`), and a TOML or flag value checked against a type
(`coerce`). Generic over dataclasses, so the config's own module holds only the fields."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import typing
from functools import cache
from typing import Any, Literal

from chargpt.errors import ConfigError

__all__ = ["coerce", "field_docs", "field_types"]


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@cache
def field_docs(cls: type) -> dict[str, str]:
    """Map each field of a dataclass to the docstring written under it in the source."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Check a TOML or CLI value against a field's type, converting where lossless."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        _require(value in choices, f"{where} must be one of {', '.join(map(str, choices))}, "
                                 f"got {value!r}")
        return value
    if tp is bool:
        _require(isinstance(value, bool), f"{where} must be true or false, got {value!r}")
        return value
    if tp is int:
        _require(isinstance(value, int) and not isinstance(value, bool),
               f"{where} must be an integer, got {value!r}")
        return value
    if tp is float:
        _require(isinstance(value, (int, float)) and not isinstance(value, bool),
               f"{where} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        _require(isinstance(value, str), f"{where} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp!r}")  # a bug in chargpt, not user input

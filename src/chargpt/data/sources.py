"""Which files a corpus source names: a file, a folder's .txt files, a glob, or a list of those.

Folders are searched recursively for `*.txt`, skipping hidden files and folders (.git,
.ipynb_checkpoints, editor backups); globs may use `**`. The result is in a stable order (each
item's files sorted), and a source that names nothing, or a file twice, is an error, never an
empty corpus or a file counted twice.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from pathlib import Path

from chargpt.errors import DataError
from chargpt.text.textfiles import Source

__all__ = ["resolve_sources"]

_GLOB_MAGIC = frozenset("*?[")


def _is_hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _txt_files_under(root: Path) -> list[Path]:
    # Hidden files and folders (.git, .ipynb_checkpoints, editor backups) are never corpus text.
    return sorted(p for p in root.rglob("*.txt") if p.is_file() and not _is_hidden(p, root))


def _glob(pattern: str) -> list[Path]:
    found: list[Path] = []
    for m in sorted(Path(m) for m in glob.glob(pattern, recursive=True)):
        found.extend(_txt_files_under(m) if m.is_dir() else [m] if m.is_file() else [])
    if not found:
        raise DataError(f"no files match {pattern}")
    return found


def _files_of(item: Source) -> list[Path]:
    text = os.path.expanduser(os.fspath(item))
    path = Path(text)
    if path.is_file():
        return [path]
    if path.is_dir():
        found = _txt_files_under(path)
        if not found:
            raise DataError(f"no .txt files found under {path}")
        return found
    if _GLOB_MAGIC & set(text):
        return _glob(text)
    if path.exists():  # a pipe (/dev/stdin), a FIFO, a device
        raise DataError(f"{path} is not a regular file or directory; prepare reads its input "
                        "twice (to choose the vocabulary, then to encode), so save it to a "
                        "file first")
    raise DataError(f"input not found: {path}")


def resolve_sources(source: Source | Sequence[Source]) -> list[Path]:
    """The files a source names, in order: a file, a folder's .txt files, a glob, or a list."""
    if isinstance(source, (str, os.PathLike)):
        return _files_of(source)
    items = list(source)
    if not items:
        raise DataError("no input files given")
    files = [path for item in items for path in _files_of(item)]
    seen: dict[Path, Path] = {}
    for path in files:
        # A file named twice (a.txt a.txt, or a folder and a file in it) would be in the
        # corpus twice, and in both train and val.
        first = seen.setdefault(path.resolve(), path)
        if first is not path:
            also = "" if first == path else f" (also as {first})"
            raise DataError(f"the input names {path} more than once{also}; give each file once")
    return files

"""Where the native loop's built libraries are kept, and what is known about each of them.

A library runs as whoever loads it, so one is only ever loaded from a directory no one but the
user can write: the user's own, mode 0700, below directories that belong to the user or to
root and that no one else can write (a sticky one such as /tmp aside, whose entries only their
owners may replace). That is `native/` in chargpt's cache directory, or a directory of the
user's own in the temporary directory when someone else could write the cache
(`datasets.private_cache`). In the chosen
directory, `Store` holds a lock (one process builds
while the others wait for its library) and `records.json`: each library's sha256, recorded
when it is built and checked before every load, and the flag sets that failed here, which no
later process tries again (removing the file forgets them). Off POSIX systems, where ownership
is not checked here, no library is kept: sampling takes the torch step.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from chargpt.fileio import OTHERS_WRITE, atomic_write_text, sha256_file

if os.name == "posix":  # elsewhere library_dir refuses, so nothing is locked
    import fcntl

__all__ = ["Store", "library_dir"]

_LOCK, _RECORD = ".lock", "records.json"


def library_dir() -> Path:
    """The directory built libraries are kept in: `native/` in chargpt's cache directory when
    no one but the user can write it, else a private directory of the user's (said once). An
    OSError where ownership cannot be checked, or no directory can be made."""
    from chargpt.data.datasets import private_cache

    return private_cache("native", "the native decode loop's libraries")


class Store:
    """The libraries in a private `directory`, while open (`with`): the lock held, and the
    record of each library's sha256 and of the flag sets that failed."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self._lock = -1
        self._record: dict[str, dict[str, str]] = {}

    def __enter__(self) -> Store:
        self._lock = os.open(self.dir / _LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._lock, fcntl.LOCK_EX)  # released when closed, or when the process ends
        self._record = _read(self.dir / _RECORD)
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self._lock)

    def _write(self) -> None:
        atomic_write_text(self.dir / _RECORD, json.dumps(self._record, indent=1, sort_keys=True))

    def verified(self, path: Path) -> bool:
        """Whether `path` is a library built here: a file of the user's that no one else can
        write, whose sha256 is the one recorded when it was built."""
        try:
            st = os.lstat(path)
            ok = (stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid()
                  and not st.st_mode & OTHERS_WRITE)
            return ok and sha256_file(path) == self._record["libraries"].get(path.name)
        except OSError:
            return False

    def built(self, path: Path) -> None:
        """Record the sha256 of the library just built at `path`."""
        self._record["libraries"][path.name] = sha256_file(path)
        self._write()

    def failed(self, key: str) -> str | None:
        """Why the flag set `key` failed here, if it did."""
        return self._record["failed"].get(key)

    def fail(self, key: str, why: str) -> None:
        """Remember that the flag set `key` fails here, and why."""
        self._record["failed"][key] = why
        self._write()


def _read(path: Path) -> dict[str, dict[str, str]]:
    """The record at `path`; an empty one when it is missing or malformed (every library is
    then built again)."""
    try:
        data: Any = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        data = None
    record = {}
    for part in ("libraries", "failed"):
        entries = data.get(part) if isinstance(data, dict) else None
        record[part] = {k: v for k, v in entries.items() if isinstance(v, str)} if isinstance(
            entries, dict) else {}
    return record

"""Where `prepare` writes: whether it may, building beside the target, and swapping it in.

A prepared-data directory is never replaced in silence: `Target.check` refuses a directory that
is not prepared data, and a prepared one unless the new data would be the same (the same files,
settings and vocabulary: preparing again then repairs damaged token files and changes nothing
else) or the caller asked for the replacement (`--overwrite`). A run's own data (`RUN/data`
beside the run's config or checkpoints) is never replaced by other data, even then: its
checkpoints use that data's vocabulary, so eval and a resume would stop working. The new data
is built in a hidden sibling (`staging`) and swapped in by `publish`; until that swap, an
interrupted or failed prepare leaves the previous directory as it was.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chargpt.data.prepared import META_FILE, TRAIN_FILE, read_meta
from chargpt.errors import DataError
from chargpt.fileio import creation_reason, fsync_dir, os_reason, read_error, temp_path_for

__all__ = ["RUN_FILES", "Target", "publish", "staging"]

# What marks the directory above `data/` as a run (runs/rundir's CONFIG_FILE, CHECKPOINTS and
# DATA_SUBDIR; the data layer cannot import them, a test checks they agree).
RUN_FILES, RUN_CHECKPOINTS, RUN_DATA = "config.json", ("best", "last"), "data"


def _looks_prepared(path: Path) -> bool:
    try:
        names = {p.name for p in path.iterdir()}
    except OSError as e:
        raise read_error(path, e, what="directory") from None
    return not names or bool(names & {META_FILE, TRAIN_FILE})


def _owning_run(out: Path) -> Path | None:
    """The run directory `out` is the own data of, or None."""
    run = out.parent
    if out.name != RUN_DATA:
        return None
    if (run / RUN_FILES).is_file() or any((run / c).is_dir() for c in RUN_CHECKPOINTS):
        return run
    return None


def _files(meta: dict[str, Any]) -> list[Any]:
    sources = meta.get("sources")
    return [[s.get("path"), s.get("bytes")] if isinstance(s, dict) else s
            for s in sources] if isinstance(sources, list) else []


def _difference(old: dict[str, Any] | None, new: dict[str, Any]) -> str | None:
    """What differs between the prepared data there (`old`, None when unreadable) and what
    would be prepared (`new`: the settings and files alone, or the whole new meta.json)."""
    if old is None:
        return "unreadable metadata"
    for key, value in new.items():
        theirs = _files(old) if key == "files" else old.get(key)
        if theirs != value:
            if key in ("files", "sources", "source_sha256", "total_chars"):
                return "other text"
            if key in ("vocab_size", "vocab_fingerprint", "dtype"):
                return "another vocabulary"
            return f"{key} {theirs!r} (not {value!r})"
    return None


@dataclass(frozen=True)
class Target:
    """The directory `prepare` writes, and what is there now."""

    path: Path
    overwrite: bool  # the caller asked to replace prepared data that differs
    exists: bool  # prepared data is there (else nothing, or an empty directory)
    old: dict[str, Any] | None  # its meta.json; None when there is none or it is unreadable

    @classmethod
    def of(cls, path: Path, overwrite: bool) -> Target:
        """`path`, refused at once if something other than prepared data is there."""
        if not path.exists():
            return cls(path, overwrite, False, None)
        if not (path.is_dir() and _looks_prepared(path)):
            raise DataError(f"{path} exists and is not a prepared data directory; refusing to "
                            "replace it (choose another output directory)")
        if not any(path.iterdir()):
            return cls(path, overwrite, False, None)
        try:
            old = read_meta(path)
        except DataError:
            old = None  # a damaged directory: replaced only when the caller asked for it
        return cls(path, overwrite, True, old)

    def check(self, new: dict[str, Any]) -> None:
        """Refuse to replace prepared data that differs from `new` (see the module's doc):
        first with the settings and files alone, before any reading, then with the whole new
        meta.json once the corpus has been read."""
        if not self.exists or (what := _difference(self.old, new)) is None:
            return
        run = _owning_run(self.path)
        if run is not None:
            raise DataError(f"{self.path} is the data of the run in {run} and holds {what}; "
                            "replacing it would break that run (its checkpoints use this "
                            "data's vocabulary): choose another --out")
        if not self.overwrite:
            raise DataError(f"{self.path} already holds prepared data of {what}; refusing to "
                            "replace it: choose another --out, or replace it with --overwrite")


@contextmanager
def staging(out_dir: Path) -> Iterator[Path]:
    """A hidden sibling of `out_dir` to build in; removed whatever happens."""
    tmp = temp_path_for(out_dir, "prepare")
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as e:
        reason = creation_reason(e, out_dir)
        raise DataError(f"cannot write prepared data to {out_dir}: {reason}") from None
    try:
        yield tmp
    except OSError as e:
        raise DataError(f"cannot write prepared data to {out_dir}: {os_reason(e)}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish(tmp: Path, out_dir: Path) -> None:
    """Swap the finished directory `tmp` in as `out_dir`, replacing any previous data: the
    previous directory is moved aside first and put back if the swap fails."""
    if out_dir.exists():
        old = temp_path_for(out_dir, "old")
        os.rename(out_dir, old)
        try:
            os.rename(tmp, out_dir)
        except OSError:
            os.rename(old, out_dir)  # put the previous data back rather than lose it
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out_dir)
    fsync_dir(out_dir.parent)

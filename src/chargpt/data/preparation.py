"""`prepare`: turn a UTF-8 corpus of any size into a prepared-data directory, in named stages.

    plan -> scan (pass 1) -> choose the vocabulary -> split -> encode (pass 2) -> publish

`_plan` checks the arguments and resolves the sources; `_scan` reads every file once to check
it is UTF-8 text, hash it and collect the characters that occur (or, with unit "byte", the
bytes, unchecked); `_choose_vocabulary` builds (or checks) the vocabulary; `_split` fixes where
val and the optional test split start (splits.py); `_encode` reads the files again and writes
the token ids straight into `train.npy`, `val.npy` and `test.npy`; `_publish` writes
`vocab.json` and then `meta.json` (which marks the directory complete) and swaps the new
directory in (outdir.py: what may be replaced, and how). Memory stays bounded whatever the
corpus size: text is read in fixed-size pieces, hashing and writing overlap with reading on one
helper thread, and everything is built in a hidden sibling directory, so a crash never leaves a
half-written one that looks usable.
"""

from __future__ import annotations

import hashlib
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from chargpt import faults
from chargpt.data.outdir import Target, publish, staging
from chargpt.data.prepared import (
    DATA_FORMAT,
    DATA_VERSION,
    META_FILE,
    TEST_FILE,
    TRAIN_FILE,
    VAL_FILE,
    VOCAB_FILE,
)
from chargpt.data.sources import resolve_sources
from chargpt.data.splits import SplitWriter, split_counts, split_sizes
from chargpt.errors import ConfigError, DataError, VocabError
from chargpt.fileio import atomic_write_text, json_text, shown
from chargpt.progress import progress_bar
from chargpt.text.textfiles import Source, iter_units
from chargpt.text.tokenizer import N_CODEPOINTS, UNITS, CharTokenizer, unknown_chars_message

__all__ = ["prepare", "split_sizes"]


# --- the helpers the stages use -----------------------------------------------------------------


class _Background:
    """Runs calls in submission order on one helper thread, with at most `depth` in flight.

    The heavy calls given to it (hashing, file writes) release the GIL, so on a multi-core
    machine they overlap with the main thread's reading and encoding. Leaving the `with` block
    waits for everything and re-raises the first error of a call.
    """

    def __init__(self, depth: int = 2) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chargpt-prepare")
        self._pending: deque[Future[Any]] = deque()
        self._depth = depth

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        self._pending.append(self._pool.submit(fn, *args))
        while len(self._pending) > self._depth:
            self._pending.popleft().result()

    def drain(self) -> None:
        while self._pending:
            self._pending.popleft().result()

    def __enter__(self) -> _Background:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            if exc_type is None:
                self.drain()
            else:
                # Already failing: drop queued work; a call still running must not hide it.
                for future in self._pending:
                    future.cancel()
        finally:
            self._pending.clear()
            self._pool.shutdown(wait=True)


def _update_hashes(hashes: Sequence[Any], data: bytes) -> None:
    for h in hashes:
        h.update(data)


def _stat_key(path: Path) -> tuple[int, int]:
    return (st := path.stat()).st_size, st.st_mtime_ns


# --- the stages -----------------------------------------------------------------------------


@dataclass
class _Job:
    """What to prepare and how: the result of `_plan`, read by every later stage."""

    files: list[Path]
    out: Target
    val_fraction: float
    test_fraction: float
    heldout: tuple[int, int] | None  # (val, test) tokens at the end, instead of the fractions
    unit: str  # "char" or "byte": what one token is
    separator: str
    chunk_bytes: int
    progress: bool
    stats: dict[Path, tuple[int, int]]  # (size, mtime) when planned: a changed file is an error

    @property
    def total_bytes(self) -> int:
        return sum(size for size, _ in self.stats.values())

    @property
    def joined(self) -> bool:
        """Whether documents are joined with the separator (more than one, and one is given)."""
        return len(self.files) > 1 and bool(self.separator)

    @property
    def separator_codepoints(self) -> np.ndarray:
        """The separator's units: code points, or in byte mode its UTF-8 bytes."""
        sep = self.separator.encode("utf-8") if self.unit == "byte" else self.separator
        return np.array([c if isinstance(c, int) else ord(c) for c in sep], dtype=np.uint32)

    def pieces(self, path: Path) -> Iterator[tuple[bytes, np.ndarray]]:
        return iter_units(path, self.chunk_bytes, self.unit)


@dataclass
class _Scan:
    """What pass 1 learned about the corpus."""

    seen: np.ndarray  # (N_CODEPOINTS,) bool: which characters (or byte values) occur
    sources: list[dict[str, Any]]  # per file: absolute path, bytes, sha256
    total_chars: int  # tokens (characters or bytes), including separators
    sha256: str  # of the whole corpus


def _check_split(val_fraction: float, test_fraction: float,
                 heldout: tuple[int, int] | None) -> None:
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if not 0.0 <= test_fraction < 1.0 or val_fraction + test_fraction >= 1.0:
        raise ConfigError(f"test_fraction must be in [0, 1) and leave some text for training "
                          f"with val_fraction {val_fraction}, got {test_fraction}")
    if heldout is not None and (len(heldout) != 2 or heldout[0] < 1 or heldout[1] < 0):
        raise ConfigError(f"heldout must be (val tokens >= 1, test tokens >= 0), got {heldout}")


def _plan(source: Source | Sequence[Source], out_dir: Source, val_fraction: float,
          test_fraction: float, heldout: tuple[int, int] | None, unit: str,
          separator: str, chunk_bytes: int, progress: bool, overwrite: bool) -> _Job:
    _check_split(val_fraction, test_fraction, heldout)
    if unit not in UNITS:
        raise ConfigError(f"unit must be one of {', '.join(UNITS)}, got {unit!r}")
    if not isinstance(separator, str):
        raise ConfigError(f"separator must be a string, got {separator!r}")
    try:
        separator.encode("utf-8")
    except UnicodeEncodeError:  # bytes of a command line that are not UTF-8
        raise ConfigError(f"the separator {shown(separator)} is not valid UTF-8 text") from None
    if chunk_bytes < 1:
        raise ConfigError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    files = resolve_sources(source)
    out = Target.of(Path(out_dir).expanduser(), overwrite)
    return _Job(files, out, val_fraction, test_fraction, heldout, unit, separator, chunk_bytes,
                progress, stats={p: _stat_key(p) for p in files})


def _scan_file(job: _Job, path: Path, hashes: list[Any], seen: np.ndarray, bar: Any,
               bg: _Background) -> tuple[int, int]:
    """Check one file, feed its bytes to `hashes` and mark its characters: (bytes, chars)."""
    seen_ascii = bytes(np.flatnonzero(seen[:128]).astype(np.uint8))
    n_bytes = n_chars = 0
    for raw, cps in job.pieces(path):
        bg.submit(_update_hashes, hashes, raw)
        n_bytes += len(raw)
        n_chars += cps.size
        if cps.dtype == np.uint8:
            # Deleting already-seen bytes is ~10x faster than counting them and leaves
            # nothing at all once the vocabulary is known.
            new = raw.translate(None, seen_ascii)
            if new:
                seen[np.frombuffer(new, dtype=np.uint8)] = True
                seen_ascii = bytes(np.flatnonzero(seen[:128]).astype(np.uint8))
        else:
            seen[cps] = True
            seen_ascii = bytes(np.flatnonzero(seen[:128]).astype(np.uint8))
        bar.update(len(raw))
    if n_chars == 0:
        raise DataError(f"{path} is empty" if n_bytes == 0 else f"{path} contains no text")
    bg.drain()
    return n_bytes, n_chars


def _scan(job: _Job) -> _Scan:
    """Pass 1: check every file is UTF-8 text, hash it and find which characters occur."""
    seen = np.zeros(N_CODEPOINTS, dtype=bool)
    total_hash = hashlib.sha256()
    sources: list[dict[str, Any]] = []
    total_chars = 0
    with progress_bar(job.total_bytes, "reading", enabled=job.progress) as bar, \
            _Background() as bg:
        for path in job.files:
            file_hash = hashlib.sha256()
            # With one file its hash is the total hash; don't compute it twice.
            hashes = [file_hash] if len(job.files) == 1 else [file_hash, total_hash]
            n_bytes, n_chars = _scan_file(job, path, hashes, seen, bar, bg)
            total_chars += n_chars
            sources.append({"path": os.path.abspath(path), "bytes": n_bytes,
                            "sha256": file_hash.hexdigest()})
    if job.joined:
        seen[job.separator_codepoints] = True
        total_chars += len(job.separator) * (len(job.files) - 1)
    sha = sources[0]["sha256"] if len(job.files) == 1 else total_hash.hexdigest()
    return _Scan(seen, sources, total_chars, sha)


def _choose_vocabulary(job: _Job, scan: _Scan, vocab: CharTokenizer | None,
                       extend: bool) -> CharTokenizer:
    """Every character (or byte) that occurs; or `vocab` (with `extend`, and those it lacks)."""
    occurring = np.flatnonzero(scan.seen)
    if vocab is None:
        if job.unit == "byte":
            return CharTokenizer.from_bytes(occurring.tolist())
        return CharTokenizer.from_codepoints(occurring.tolist())
    if vocab.unit != job.unit:
        raise VocabError(f"the given vocabulary is of unit {vocab.unit!r}, but the corpus is "
                         f"being prepared as {job.unit!r}")
    missing = occurring[vocab.lookup_table()[occurring] < 0]
    if missing.size and extend:
        return CharTokenizer([*vocab.chars, *map(chr, missing.tolist())], unit=vocab.unit)
    if missing.size:
        what, chars = str(job.files[0]) if len(job.files) == 1 else "the corpus", missing.tolist()
        raise VocabError(unknown_chars_message(what, [*map(chr, chars)], hint=None, unit=job.unit))
    return vocab


def _split(job: _Job, total: int) -> tuple[int, int, int]:
    n_train, n_val, n_test = split_counts(total, job.val_fraction, job.test_fraction,
                                          job.heldout)
    wants_test = job.heldout[1] > 0 if job.heldout else job.test_fraction > 0
    if n_train < 1 or n_val < 1 or (wants_test and n_test < 1):
        how = (f"the last {job.heldout[0]} + {job.heldout[1]} tokens held out" if job.heldout
               else f"val_fraction {job.val_fraction}"
               + (f" and test_fraction {job.test_fraction}" if wants_test else ""))
        test = f", {n_test} test" if wants_test else ""
        noun = "bytes" if job.unit == "byte" else "characters"
        raise DataError(
            f"the corpus has only {total} {noun}, too few to split with {how} "
            f"({n_train} train, {n_val} val{test})"
        )
    return n_train, n_val, n_test


def _encode(job: _Job, tokenizer: CharTokenizer, into: Path, n_train: int, n_val: int,
            n_test: int) -> None:
    """Pass 2: encode every file into the token files of `into`."""
    files = [(TRAIN_FILE, n_train), (VAL_FILE, n_val)] + ([(TEST_FILE, n_test)] * (n_test > 0))
    writer = SplitWriter(into, files, tokenizer.id_dtype)
    try:
        sep_ids = tokenizer.encode_array(job.separator_codepoints) if job.joined else None
        # Writing happens on a helper thread, overlapping the kernel's copy into the page
        # cache with reading and encoding the next piece.
        with progress_bar(job.total_bytes, "encoding", enabled=job.progress) as bar, \
                _Background() as bg:
            for i, path in enumerate(job.files):
                if i and sep_ids is not None:
                    bg.submit(writer.write, sep_ids)
                for raw, cps in job.pieces(path):
                    bg.submit(writer.write, tokenizer.encode_array(cps, what=str(path)))
                    bar.update(len(raw))
                if _stat_key(path) != job.stats[path]:
                    raise DataError(f"{path} changed while it was being prepared; run again")
        if writer.written != n_train + n_val + n_test:
            raise DataError("the input changed while it was being prepared; run it again")
        writer.close(sync=True)
    finally:
        writer.close(sync=False)


def _split_setting(job: _Job) -> dict[str, Any]:
    if job.heldout:
        return {"heldout": list(job.heldout)}
    return {"test_fraction": job.test_fraction}


def _settings(job: _Job) -> dict[str, Any]:
    """What of meta.json is known before the corpus is read: the settings and each file's
    path and size (`outdir.Target.check` compares them with the data already there)."""
    return {"unit": job.unit, "val_fraction": job.val_fraction, **_split_setting(job),
            "separator": job.separator,
            "files": [[os.path.abspath(p), job.stats[p][0]] for p in job.files]}


def _meta(job: _Job, scan: _Scan, tokenizer: CharTokenizer, n_train: int,
          n_val: int, n_test: int) -> dict[str, Any]:
    return {
        "format": DATA_FORMAT,
        "version": DATA_VERSION,
        "dtype": tokenizer.id_dtype.name,
        "vocab_size": tokenizer.vocab_size,
        "vocab_fingerprint": tokenizer.fingerprint(),
        "unit": job.unit,
        "train_tokens": n_train,
        "val_tokens": n_val,
        "test_tokens": n_test,
        "total_chars": scan.total_chars,
        "val_fraction": job.val_fraction,
        **_split_setting(job),
        "separator": job.separator,
        "sources": scan.sources,
        "source_sha256": scan.sha256,
    }


def _publish(tmp: Path, out_dir: Path, tokenizer: CharTokenizer, meta: dict[str, Any]) -> None:
    """Finish the staged directory and swap it in, replacing any previous prepared data."""
    tokenizer.save(tmp / VOCAB_FILE)
    # meta.json is what marks a directory as prepared, so it is written last.
    atomic_write_text(tmp / META_FILE, json_text(meta))
    publish(tmp, out_dir)


def prepare(
    source: Source | Sequence[Source],
    out_dir: Source,
    *,
    val_fraction: float = 0.1,
    test_fraction: float = 0.0,
    heldout: tuple[int, int] | None = None,
    unit: str = "char",
    separator: str = "\n\n",
    chunk_bytes: int = 16 * 2**20,
    vocab: CharTokenizer | None = None,
    extend_vocab: bool = False,
    progress: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Tokenize a corpus into a prepared-data directory and return its metadata.

    Documents are joined with `separator`; the vocabulary is every code point that occurs
    (including the separator's, when there is more than one document), or with unit "byte"
    every byte value, unless a fixed `vocab` is given (with `extend_vocab`, the characters it
    lacks are appended to it, so its ids stay). The last `test_fraction` of the tokens is the
    test split (none by default) and the `val_fraction` before it the validation split;
    `heldout` = (val tokens, test tokens) fixes those counts instead (a standard split).
    Prepared data already in `out_dir` is replaced only by the same data (which repairs it),
    or with `overwrite`, and never when it is a run's own (outdir.py).
    """
    job = _plan(source, out_dir, val_fraction, test_fraction, heldout, unit, separator,
                chunk_bytes, progress, overwrite)
    job.out.check(_settings(job))  # before the corpus is read, when that already tells
    scan = _scan(job)
    tokenizer = _choose_vocabulary(job, scan, vocab, extend_vocab)
    n_train, n_val, n_test = _split(job, scan.total_chars)
    meta = _meta(job, scan, tokenizer, n_train, n_val, n_test)
    job.out.check(meta)
    with staging(job.out.path) as tmp:
        _encode(job, tokenizer, tmp, n_train, n_val, n_test)
        faults.active().reached("prepare")  # the token files written, nothing published
        _publish(tmp, job.out.path, tokenizer, meta)
    return meta

"""Corpus preparation, prepared-data loading and random training batches.

`prepare` turns UTF-8 text (a file, a folder of .txt files, a glob, or a list of those) into a
prepared-data directory: `train.npy` and `val.npy` (token ids, the last `val_fraction` of the text
is validation), `vocab.json` and `meta.json`. It streams the corpus twice in fixed-size pieces
(once to validate, hash and collect the vocabulary, once to encode), so memory does not grow with
corpus size, and it builds the directory beside the target and renames it into place so a crash
never leaves a half-written directory that looks usable. `load_prepared` opens such a directory
with memory-mapped, read-only token arrays and checks it is complete and consistent, and
`BatchSampler` draws reproducible random (input, target) windows from a token array.
"""

from __future__ import annotations

import codecs
import contextlib
import glob
import hashlib
import json
import os
import shutil
import sys
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

from .errors import CheckpointError, ConfigError, DataError, VocabError
from .io import atomic_write_text, fsync_dir
from .tokenizer import N_CODEPOINTS, CharTokenizer, unknown_chars_message

if TYPE_CHECKING:
    import torch

__all__ = [
    "BatchSampler",
    "PreparedData",
    "check_split_lengths",
    "encode_file",
    "load_prepared",
    "prepare",
    "read_text_file",
]

DATA_FORMAT = "chargpt-data"
DATA_VERSION = 1
_OUTPUT_FILES = ("train.npy", "val.npy", "vocab.json", "meta.json")
# Work is done in pieces of at most this many bytes whatever the read size, which bounds the
# temporaries (a decoded piece can take 4 bytes per character, an index array 8).
_PIECE_BYTES = 2 * 2**20
_GLOB_MAGIC = frozenset("*?[")

Source = str | os.PathLike[str]


# --- reading text -----------------------------------------------------------------------------


def _first_nul(path: Path, limit: int = 8192) -> int:
    try:
        with open(path, "rb") as f:
            return f.read(limit).find(b"\0")
    except OSError:
        return -1


def _binary_error(path: Path, offset: int) -> DataError:
    return DataError(f"{path} looks like a binary file (NUL byte at offset {offset})")


def _utf8_error(path: Path, e: UnicodeDecodeError, offset: int) -> DataError:
    # Most non-UTF-8 files with a NUL near the start are binaries (images, archives, models);
    # saying so is more helpful than naming an invalid byte, whatever the read size.
    nul = _first_nul(path)
    if nul >= 0:
        return _binary_error(path, nul)
    bad = e.object[e.start : e.start + 1]
    byte = f" (byte 0x{bad[0]:02x})" if bad else ""
    return DataError(
        f"{path} is not valid UTF-8: {e.reason}{byte} at byte offset {offset}; "
        "convert it to UTF-8 first"
    )


def _open_binary(path: Path) -> BinaryIO:
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise DataError(f"file not found: {path}") from None
    except IsADirectoryError:
        raise DataError(f"{path} is a directory, not a text file") from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None


def _iter_codepoints(path: Path, chunk_bytes: int) -> Iterator[tuple[bytes, np.ndarray]]:
    """Yield (raw bytes, code points) pieces of a strict UTF-8 file, without a leading BOM.

    Pure-ASCII pieces come back as a uint8 view of the bytes themselves (no decoding needed,
    by far the common case); others as uint32 code points. The raw bytes are every byte of the
    file in order (including a BOM), for hashing.
    """
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    offset = 0  # file offset of the current piece
    at_start = True  # no character produced yet, so a BOM may still come
    with _open_binary(path) as f:
        while True:
            try:
                chunk = f.read(chunk_bytes)
            except OSError as e:
                raise DataError(f"cannot read {path}: {e.strerror}") from None
            if not chunk:
                break
            for start in range(0, len(chunk), _PIECE_BYTES):
                raw = chunk if len(chunk) <= _PIECE_BYTES else chunk[start : start + _PIECE_BYTES]
                nul = raw.find(b"\0")
                if nul >= 0:
                    raise _binary_error(path, offset + nul)
                pending = decoder.getstate()[0]
                if not pending and raw.isascii():
                    at_start = False
                    yield raw, np.frombuffer(raw, dtype=np.uint8)
                else:
                    try:
                        text = decoder.decode(raw)
                    except UnicodeDecodeError as e:
                        raise _utf8_error(path, e, offset - len(pending) + e.start) from None
                    if at_start and text:
                        at_start = False
                        if text[0] == "\ufeff":
                            text = text[1:]
                    text32 = text.encode("utf-32-le")
                    del text
                    yield raw, np.frombuffer(text32, dtype=np.uint32)
                offset += len(raw)
            # Drop this chunk before reading the next, or both would be alive at once.
            del chunk, raw
        pending = decoder.getstate()[0]
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError as e:
            raise _utf8_error(path, e, offset - len(pending) + e.start) from None


def read_text_file(path: Source, *, allow_empty: bool = False) -> str:
    """Read a small UTF-8 file (a prompt, say) with the same checks and messages as `prepare`."""
    path = Path(path).expanduser()
    with _open_binary(path) as f:
        try:
            raw = f.read()
        except OSError as e:
            raise DataError(f"cannot read {path}: {e.strerror}") from None
    nul = raw.find(b"\0")
    if nul >= 0:
        raise _binary_error(path, nul)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _utf8_error(path, e, e.start) from None
    text = text.removeprefix("\ufeff")
    if not text and not allow_empty:
        raise DataError(f"{path} is empty" if not raw else f"{path} contains no text")
    return text


def encode_file(
    path: Source,
    tokenizer: CharTokenizer,
    unknown: str = "error",
    replacement: str | None = None,
    *,
    chunk_bytes: int = 16 * 2**20,
) -> np.ndarray:
    """Token ids of a whole UTF-8 file, in memory (for evaluation text, not training corpora).

    With `unknown="error"` the whole file is scanned first so the error names every distinct
    unknown character, not just those of the first piece that has one.
    """
    path = Path(path).expanduser()
    if unknown == "error":
        lut = tokenizer.lookup_table()
        missing: set[int] = set()
        for _, cps in _iter_codepoints(path, chunk_bytes):
            ids = np.take(lut, cps)
            if (ids < 0).any():
                missing.update(np.unique(cps[ids < 0]).tolist())
        if missing:
            chars = [chr(c) for c in sorted(missing)]
            raise VocabError(unknown_chars_message(str(path), chars))
    parts = [
        tokenizer.encode_array(cps, unknown=unknown, replacement=replacement, what=str(path))
        for _, cps in _iter_codepoints(path, chunk_bytes)
    ]
    if not parts:
        return np.zeros(0, dtype=tokenizer.id_dtype)
    return np.concatenate(parts)


# --- resolving sources ------------------------------------------------------------------------


def _is_hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _txt_files_under(root: Path) -> list[Path]:
    # Hidden files and folders (.git, .ipynb_checkpoints, editor backups) are never corpus text.
    return sorted(p for p in root.rglob("*.txt") if p.is_file() and not _is_hidden(p, root))


def resolve_sources(source: Source | Sequence[Source]) -> list[Path]:
    """The files a source names, in order: a file, a folder's .txt files, a glob, or a list."""
    if isinstance(source, (str, os.PathLike)):
        items: list[Source] = [source]
    else:
        items = list(source)
        if not items:
            raise DataError("no input files given")
    files: list[Path] = []
    for item in items:
        text = os.path.expanduser(os.fspath(item))
        path = Path(text)
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            found = _txt_files_under(path)
            if not found:
                raise DataError(f"no .txt files found under {path}")
            files.extend(found)
        elif _GLOB_MAGIC & set(text):
            matches = sorted(Path(m) for m in glob.glob(text, recursive=True))
            found = []
            for m in matches:
                found.extend(_txt_files_under(m) if m.is_dir() else [m] if m.is_file() else [])
            if not found:
                raise DataError(f"no files match {text}")
            files.extend(found)
        elif path.exists():
            raise DataError(f"{path} is not a regular file or directory")
        else:
            raise DataError(f"input not found: {path}")
    return files


# --- prepare ----------------------------------------------------------------------------------


def _progress_bar(total: int, desc: str, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(
        total=total,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        file=sys.stderr,
        disable=not (enabled and sys.stderr.isatty()),
        leave=False,
    )


def split_sizes(total: int, val_fraction: float) -> tuple[int, int]:
    """(n_train, n_val): train is floor(total * (1 - val_fraction)), as in `int(0.9 * n)`."""
    # Decimal of the shortest repr is the fraction the user wrote, so 0.9 * 10 is 9, not the
    # 8 that binary floating point would give.
    n_train = int((1 - Decimal(repr(float(val_fraction)))) * total)
    return n_train, total - n_train


class _SplitWriter:
    """Writes one stream of ids into train.npy then val.npy, switching at n_train."""

    def __init__(self, out: Path, n_train: int, n_val: int, dtype: np.dtype) -> None:
        self._files: list[tuple[BinaryIO, int]] = []
        for name, n in (("train.npy", n_train), ("val.npy", n_val)):
            path = out / name
            # open_memmap writes a proper .npy header and sizes the file; the data itself goes
            # through ordinary writes because pages written through a mapping stay resident
            # and would make the process's memory grow with the corpus.
            mm = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(n,))
            offset = mm.offset
            del mm
            f = open(path, "r+b")  # noqa: SIM115 - closed in close()
            f.seek(offset)
            self._files.append((f, n))
        self._index = 0
        self._left = n_train
        self.written = 0

    def write(self, ids: np.ndarray) -> None:
        while ids.size:
            if self._left == 0:
                self._index += 1
                if self._index >= len(self._files):
                    raise DataError("the input grew while it was being prepared; run it again")
                self._left = self._files[self._index][1]
            n = min(self._left, ids.size)
            self._files[self._index][0].write(memoryview(np.ascontiguousarray(ids[:n])))
            self._left -= n
            self.written += n
            ids = ids[n:]

    def close(self, sync: bool) -> None:
        for f, _ in self._files:
            if sync:
                f.flush()
                os.fsync(f.fileno())
            f.close()
        self._files = []


class _Pipeline:
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

    def __enter__(self) -> _Pipeline:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            if exc_type is None:
                self.drain()
            else:
                # Already failing: drop queued work and do not let a second error from a
                # call still running hide the first one.
                for future in self._pending:
                    future.cancel()
        finally:
            self._pending.clear()
            self._pool.shutdown(wait=True)


def _update_hashes(hashes: Sequence[Any], data: bytes) -> None:
    for h in hashes:
        h.update(data)


def _scan(
    files: list[Path], chunk_bytes: int, total_bytes: int, progress: bool
) -> tuple[np.ndarray, list[dict[str, Any]], list[int], str]:
    """Pass 1: check every file is UTF-8 text; return (seen code points, sources, chars, sha)."""
    seen = np.zeros(N_CODEPOINTS, dtype=bool)
    seen_ascii = b""  # the ASCII bytes already in `seen`, for the fast bytes.translate check
    total_hash = hashlib.sha256()
    sources: list[dict[str, Any]] = []
    file_chars: list[int] = []
    with _progress_bar(total_bytes, "reading", progress) as bar, _Pipeline() as bg:
        for path in files:
            file_hash = hashlib.sha256()
            # With one file its hash is the total hash; don't compute it twice.
            hashes = [file_hash] if len(files) == 1 else [file_hash, total_hash]
            n_bytes = n_chars = 0
            for raw, cps in _iter_codepoints(path, chunk_bytes):
                bg.submit(_update_hashes, hashes, raw)
                n_bytes += len(raw)
                n_chars += cps.size
                if cps.dtype == np.uint8:
                    # Deleting already-seen bytes is ~10x faster than counting them and
                    # leaves nothing at all once the vocabulary is known.
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
            sources.append(
                {"path": os.path.abspath(path), "bytes": n_bytes, "sha256": file_hash.hexdigest()}
            )
            file_chars.append(n_chars)
    source_sha256 = sources[0]["sha256"] if len(files) == 1 else total_hash.hexdigest()
    return seen, sources, file_chars, source_sha256


def _looks_prepared(path: Path) -> bool:
    try:
        names = {p.name for p in path.iterdir()}
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None
    return not names or bool(names & {"meta.json", "train.npy"})


def _stat_key(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def prepare(
    source: Source | Sequence[Source],
    out_dir: Source,
    *,
    val_fraction: float = 0.1,
    separator: str = "\n\n",
    chunk_bytes: int = 16 * 2**20,
    vocab: CharTokenizer | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Tokenize a corpus into a prepared-data directory and return its metadata.

    Documents are joined with `separator`; the vocabulary is every code point that occurs
    (including the separator's, when there is more than one document) unless a fixed `vocab` is
    given. The last `val_fraction` of the tokens is the validation split.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if not isinstance(separator, str):
        raise ConfigError(f"separator must be a string, got {separator!r}")
    if chunk_bytes < 1:
        raise ConfigError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    files = resolve_sources(source)
    out_dir = Path(out_dir).expanduser()
    if out_dir.exists() and not (out_dir.is_dir() and _looks_prepared(out_dir)):
        raise DataError(
            f"{out_dir} exists and is not a prepared data directory; refusing to replace it "
            "(choose another output directory)"
        )
    stats = {p: _stat_key(p) for p in files}
    total_bytes = sum(size for size, _ in stats.values())
    use_separator = len(files) > 1 and bool(separator)
    sep_cps = np.array([ord(c) for c in separator], dtype=np.uint32)

    # Pass 1: validate, hash and find which code points occur.
    seen, sources, file_chars, source_sha256 = _scan(files, chunk_bytes, total_bytes, progress)
    if use_separator:
        seen[sep_cps] = True
    total = sum(file_chars) + (len(separator) * (len(files) - 1) if use_separator else 0)

    occurring = np.flatnonzero(seen)
    if vocab is None:
        tokenizer = CharTokenizer.from_codepoints(occurring.tolist())
    else:
        tokenizer = vocab
        missing = occurring[tokenizer.lookup_table()[occurring] < 0]
        if missing.size:
            what = str(files[0]) if len(files) == 1 else "the corpus"
            raise VocabError(
                unknown_chars_message(what, [chr(c) for c in missing.tolist()], hint=None)
            )
    n_train, n_val = split_sizes(total, val_fraction)
    if n_train < 1 or n_val < 1:
        raise DataError(
            f"the corpus has only {total} characters, too few to split with val_fraction "
            f"{val_fraction} ({n_train} train, {n_val} val)"
        )

    # Pass 2: encode into the token files of a hidden sibling directory.
    tmp_dir = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir)  # left over by an earlier crash of a process with our pid
        tmp_dir.mkdir()
    except OSError as e:
        raise DataError(f"cannot create {tmp_dir}: {e.strerror}") from None
    try:
        writer = _SplitWriter(tmp_dir, n_train, n_val, tokenizer.id_dtype)
        try:
            sep_ids = tokenizer.encode_array(sep_cps) if use_separator else sep_cps
            # Writing happens on a helper thread, overlapping the kernel's copy into the page
            # cache with reading and encoding the next piece.
            with _progress_bar(total_bytes, "encoding", progress) as bar, _Pipeline() as bg:
                for i, path in enumerate(files):
                    if i and use_separator:
                        bg.submit(writer.write, sep_ids)
                    for raw, cps in _iter_codepoints(path, chunk_bytes):
                        bg.submit(writer.write, tokenizer.encode_array(cps, what=str(path)))
                        bar.update(len(raw))
                    if _stat_key(path) != stats[path]:
                        raise DataError(f"{path} changed while it was being prepared; run again")
            if writer.written != total:
                raise DataError("the input changed while it was being prepared; run it again")
            writer.close(sync=True)
        finally:
            writer.close(sync=False)
        tokenizer.save(tmp_dir / "vocab.json")
        meta: dict[str, Any] = {
            "format": DATA_FORMAT,
            "version": DATA_VERSION,
            "dtype": tokenizer.id_dtype.name,
            "vocab_size": tokenizer.vocab_size,
            "vocab_fingerprint": tokenizer.fingerprint(),
            "train_tokens": n_train,
            "val_tokens": n_val,
            "total_chars": total,
            "val_fraction": val_fraction,
            "separator": separator,
            "sources": sources,
            "source_sha256": source_sha256,
        }
        # meta.json is what marks a directory as prepared, so it is written last.
        atomic_write_text(tmp_dir / "meta.json", json.dumps(meta, indent=2, ensure_ascii=False))
        _move_into_place(tmp_dir, out_dir)
    except OSError as e:
        raise DataError(f"cannot write prepared data to {out_dir}: {e.strerror or e}") from None
    finally:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir, ignore_errors=True)
    return meta


def _move_into_place(tmp_dir: Path, out_dir: Path) -> None:
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        if old.exists():
            shutil.rmtree(old)
        os.rename(out_dir, old)
        try:
            os.rename(tmp_dir, out_dir)
        except OSError:
            os.rename(old, out_dir)  # put the previous data back rather than lose it
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp_dir, out_dir)
    fsync_dir(out_dir.parent)


# --- loading ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreparedData:
    """A prepared-data directory: read-only memory-mapped token splits plus their vocabulary."""

    train: np.ndarray
    val: np.ndarray
    tokenizer: CharTokenizer
    meta: dict[str, Any]
    path: Path

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def split(self, name: str) -> np.ndarray:
        if name not in ("train", "val"):
            raise ConfigError(f"split must be 'train' or 'val', got {name!r}")
        return self.train if name == "train" else self.val


_META_TYPES: dict[str, type | tuple[type, ...]] = {
    "dtype": str,
    "vocab_size": int,
    "vocab_fingerprint": str,
    "train_tokens": int,
    "val_tokens": int,
}


def _load_tokens(path: Path, dtype: str, length: int, data_dir: Path) -> np.ndarray:
    rerun = f"the prepared data in {data_dir} is damaged (run `chargpt prepare` again)"
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"{path.name} is missing; {rerun}") from None
    except (OSError, ValueError, EOFError) as e:
        reason = " ".join(str(e).split())
        raise DataError(f"{path.name} cannot be read ({reason}); {rerun}") from None
    if not isinstance(arr, np.ndarray) or arr.ndim != 1:
        raise DataError(f"{path.name} is not a 1-D token array; {rerun}")
    if arr.dtype != np.dtype(dtype):
        raise DataError(f"{path.name} holds {arr.dtype} but meta.json says {dtype}; {rerun}")
    if arr.shape[0] != length:
        raise DataError(
            f"{path.name} has {arr.shape[0]} tokens but meta.json says {length}; {rerun}"
        )
    return arr


def load_prepared(data_dir: Source) -> PreparedData:
    """Open a directory made by `prepare`, checking that it is complete and consistent."""
    path = Path(data_dir).expanduser()
    if not path.exists():
        raise DataError(f"data directory not found: {path}")
    if not path.is_dir():
        raise DataError(f"{path} is not a directory")
    not_prepared = f"{path} is not a prepared data directory (run `chargpt prepare`)"
    try:
        meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{not_prepared}: meta.json is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        reason = " ".join(str(e).split())
        raise DataError(f"{not_prepared}: meta.json cannot be read ({reason})") from None
    if not isinstance(meta, dict) or meta.get("format") != DATA_FORMAT:
        raise DataError(f"{not_prepared}: meta.json is not chargpt data metadata")
    if meta.get("version") != DATA_VERSION:
        raise DataError(
            f"{path} was prepared in data format version {meta.get('version')!r}, this chargpt "
            f"reads version {DATA_VERSION} (run `chargpt prepare` again)"
        )
    for key, tp in _META_TYPES.items():
        if not isinstance(meta.get(key), tp) or isinstance(meta.get(key), bool):
            raise DataError(f"{not_prepared}: meta.json has no valid {key!r}")
    if meta["dtype"] not in ("uint16", "uint32"):
        raise DataError(f"{not_prepared}: meta.json has unknown dtype {meta['dtype']!r}")
    tokenizer = CharTokenizer.load(path / "vocab.json")
    if tokenizer.fingerprint() != meta["vocab_fingerprint"]:
        raise DataError(
            f"{path / 'vocab.json'} does not match meta.json (different vocabulary "
            "fingerprint); run `chargpt prepare` again"
        )
    if tokenizer.vocab_size != meta["vocab_size"]:
        raise DataError(f"{path / 'vocab.json'} size does not match meta.json")
    train = _load_tokens(path / "train.npy", meta["dtype"], meta["train_tokens"], path)
    val = _load_tokens(path / "val.npy", meta["dtype"], meta["val_tokens"], path)
    return PreparedData(train=train, val=val, tokenizer=tokenizer, meta=meta, path=path)


def check_split_lengths(prepared: PreparedData, block_size: int) -> None:
    """Refuse a block_size that does not fit in both splits (a window needs block_size + 1)."""
    need = block_size + 1
    for name, arr, advice in (
        ("train", prepared.train, "a smaller --val-fraction"),
        ("val", prepared.val, "a larger --val-fraction"),
    ):
        if len(arr) < need:
            raise DataError(
                f"the {name} split of {prepared.path} has {len(arr)} tokens (train "
                f"{len(prepared.train)}, val {len(prepared.val)}) but block_size {block_size} "
                f"needs at least {need}; use a smaller --block-size, {advice}, or more text"
            )


# --- batches ----------------------------------------------------------------------------------


def _stream_seed(seed: int, rank: int) -> int:
    # SeedSequence mixes (seed, rank) into well-separated 64-bit seeds, so ranks (and nearby
    # seeds) get unrelated streams rather than shifted copies of one another.
    ss = np.random.SeedSequence([seed % 2**64, rank])
    return int(ss.generate_state(1, dtype=np.uint64)[0])


class BatchSampler:
    """Random (x, y) windows of `block_size` tokens, y being x shifted by one.

    All ranks of a DDP job follow ONE stream of window draws and each keeps its own share: at
    every call the stream yields `world_size` groups of `batch_size` windows and rank r takes
    group r. So ranks never see the same draw, and N processes with accumulation A see exactly
    the batches one process with accumulation N x A sees, which makes distributed runs
    comparable with single-process ones. `order="random"` draws window starts uniformly with
    replacement; `order="epoch"` shuffles non-overlapping windows (at a random offset each
    epoch) and walks through them, so every token is seen once per epoch. Only the B x (T + 1)
    tokens of a batch are read from the (typically memory-mapped) token array. `state_dict`
    captures the stream so a resumed run draws exactly the batches it would have drawn.
    """

    ORDERS = ("random", "epoch")

    def __init__(
        self,
        tokens: np.ndarray,
        block_size: int,
        batch_size: int,
        seed: int,
        device: str | torch.device = "cpu",
        rank: int = 0,
        world_size: int = 1,
        order: str = "random",
    ) -> None:
        import torch  # imported here so that preparing data does not pay for loading torch

        if block_size < 1:
            raise ConfigError(f"block_size must be >= 1, got {block_size}")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"rank must be in [0, {world_size}), got {rank}")
        if order not in self.ORDERS:
            raise ConfigError(f"order must be one of {', '.join(self.ORDERS)}, got {order!r}")
        if not isinstance(tokens, np.ndarray) or tokens.ndim != 1:
            raise TypeError("tokens must be a 1-D numpy array")
        if len(tokens) < block_size + 1:
            raise DataError(
                f"{len(tokens)} tokens are too few for block_size {block_size} (need at least "
                f"{block_size + 1}); use a smaller --block-size or more text"
            )
        self.tokens = tokens
        self.block_size = block_size
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.order = order
        self.device = torch.device(device)
        self.batches = 0
        self._n_starts = len(tokens) - block_size
        self._offsets = np.arange(block_size + 1, dtype=np.int64)
        self._generator = torch.Generator(device="cpu")
        self._generator.manual_seed(_stream_seed(seed, 0))
        self._pin = self.device.type == "cuda" and torch.cuda.is_available()
        # epoch order: the permutation is rebuilt from the generator state saved at its start
        self.epoch = 0
        self._epoch_pos = 0
        self._epoch_state: torch.Tensor | None = None
        self._epoch_starts: np.ndarray | None = None

    def _new_epoch(self) -> None:

        self._epoch_state = self._generator.get_state()
        self._build_epoch()

    def _build_epoch(self) -> None:
        import torch

        T = self.block_size
        offset = int(torch.randint(T, (1,), generator=self._generator)[0])
        n_windows = (len(self.tokens) - 1 - offset) // T
        if n_windows < 1:  # the text is shorter than two windows: no room for an offset
            offset, n_windows = 0, 1
        perm = torch.randperm(n_windows, generator=self._generator).numpy()
        self._epoch_starts = offset + perm.astype(np.int64) * T
        self._epoch_pos = 0

    def _draw_epoch(self, n: int) -> np.ndarray:
        out = []
        while n > 0:
            if self._epoch_starts is None or self._epoch_pos >= len(self._epoch_starts):
                if self._epoch_starts is not None:
                    self.epoch += 1
                self._new_epoch()
            assert self._epoch_starts is not None
            take = self._epoch_starts[self._epoch_pos : self._epoch_pos + n]
            self._epoch_pos += len(take)
            out.append(take)
            n -= len(take)
        return np.concatenate(out)

    def _draw_starts(self) -> np.ndarray:
        import torch

        B, r = self.batch_size, self.rank
        if self.order == "epoch":
            return self._draw_epoch(B * self.world_size)[r * B : (r + 1) * B]
        # Every rank draws every group so all ranks' streams stay in step.
        starts = torch.randint(
            self._n_starts, (self.world_size, B), generator=self._generator, dtype=torch.int64
        )
        return starts[r].numpy()

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y), both int64 tensors of shape (batch_size, block_size) on the device."""
        import torch

        starts = self._draw_starts()
        windows = np.asarray(self.tokens[starts[:, None] + self._offsets], dtype=np.int64)
        both = torch.from_numpy(windows)
        x = both[:, :-1].contiguous()
        y = both[:, 1:].contiguous()
        self.batches += 1
        if self.device.type == "cpu":
            return x, y
        if self._pin:
            x, y = x.pin_memory(), y.pin_memory()
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        """Tensors under "generator" and "epoch_generator"; everything else JSON-safe."""
        state: dict[str, Any] = {
            "generator": self._generator.get_state(),
            "batches": self.batches,
            "seed": self.seed,
            "order": self.order,
            "world_size": self.world_size,
            "block_size": self.block_size,
            "batch_size": self.batch_size,
        }
        if self.order == "epoch" and self._epoch_state is not None:
            state["epoch_generator"] = self._epoch_state
            state["epoch"] = self.epoch
            state["epoch_pos"] = self._epoch_pos
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        import torch

        gen = state.get("generator") if isinstance(state, dict) else None
        if not isinstance(gen, torch.Tensor) or gen.dtype != torch.uint8:
            raise CheckpointError("the saved batch-sampler state has no valid generator state")
        for key in ("order", "world_size", "batch_size", "block_size"):
            if key in state and state[key] != getattr(self, key):
                raise CheckpointError(
                    f"the checkpoint's batch sampler used {key}={state[key]!r}, this run "
                    f"{getattr(self, key)!r}; resume with the same settings"
                )
        try:
            if self.order == "epoch" and "epoch_generator" in state:
                # Rebuild the current epoch's permutation, then continue where it stopped.
                self._generator.set_state(state["epoch_generator"].cpu())
                self._new_epoch()
                self.epoch = int(state["epoch"])
                self._epoch_pos = int(state["epoch_pos"])
            self._generator.set_state(gen.cpu())
        except (RuntimeError, ValueError, KeyError, AttributeError) as e:
            reason = " ".join(str(e).split())
            raise CheckpointError(f"the saved batch-sampler state is invalid ({reason})") from None
        with contextlib.suppress(TypeError, ValueError):
            self.batches = int(state.get("batches", 0))

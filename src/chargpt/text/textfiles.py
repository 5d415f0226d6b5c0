"""Reading UTF-8 text files with checks: strict UTF-8, no binaries, no byte-order mark.

Every text chargpt reads from a user (corpus files, prompt files, evaluation text) goes through
here, so the same problems get the same one-line messages: a file that is missing, a directory,
unreadable, not valid UTF-8 (with the byte offset), binary (a NUL byte) or empty.
`iter_codepoints` streams a file of any size as (raw bytes, code points) pieces of bounded
size, and `iter_bytes` as its bytes, unchecked, for a byte-level vocabulary (`iter_units` picks
one by unit); `read_text_file` reads a small file whole; `encode_file` turns a file into token
ids.
"""

from __future__ import annotations

import codecs
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np

from chargpt.errors import DataError, VocabError
from chargpt.fileio import read_bytes, read_error
from chargpt.text.tokenizer import UNKNOWN_HINT, CharTokenizer, unknown_chars_message

__all__ = [
    "PIECE_BYTES",
    "Source",
    "encode_file",
    "iter_bytes",
    "iter_codepoints",
    "iter_units",
    "read_text_file",
]

Source = str | os.PathLike[str]
# Work is done in pieces of at most this many bytes whatever the read size, which bounds the
# temporaries (a decoded piece can take 4 bytes per character, an index array 8).
PIECE_BYTES = 2 * 2**20
WHAT = "text file"


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
    except OSError as e:
        raise read_error(path, e, what=WHAT) from None


def _read(f: BinaryIO, size: int, path: Path) -> bytes:
    try:
        return f.read(size)
    except OSError as e:
        raise read_error(path, e, what=WHAT) from None


def iter_codepoints(path: Path, chunk_bytes: int) -> Iterator[tuple[bytes, np.ndarray]]:
    """Yield (raw bytes, code points) pieces of a strict UTF-8 file, without a leading BOM.

    Pure-ASCII pieces come back as a uint8 view of the bytes themselves (no decoding needed,
    by far the common case); others as uint32 code points. The raw bytes are every byte of the
    file in order (including a BOM), for hashing.
    """
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    offset = 0  # file offset of the current piece
    at_start = True  # no character produced yet, so a BOM may still come
    with _open_binary(path) as f:
        while chunk := _read(f, chunk_bytes, path):
            for start in range(0, len(chunk), PIECE_BYTES):
                raw = chunk if len(chunk) <= PIECE_BYTES else chunk[start : start + PIECE_BYTES]
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


def iter_bytes(path: Path, chunk_bytes: int) -> Iterator[tuple[bytes, np.ndarray]]:
    """Yield (raw bytes, byte values) pieces of any file, as they are.

    For a byte-level vocabulary every byte is a token, so nothing is checked or removed: not
    UTF-8, not NUL bytes, not a BOM (the byte-level benchmarks count every byte of the file).
    """
    with _open_binary(path) as f:
        while chunk := _read(f, chunk_bytes, path):
            for start in range(0, len(chunk), PIECE_BYTES):
                raw = chunk if len(chunk) <= PIECE_BYTES else chunk[start : start + PIECE_BYTES]
                yield raw, np.frombuffer(raw, dtype=np.uint8)
            del chunk, raw


def iter_units(path: Path, chunk_bytes: int, unit: str) -> Iterator[tuple[bytes, np.ndarray]]:
    """`iter_bytes` for unit "byte", else `iter_codepoints`."""
    if unit == "byte":
        return iter_bytes(path, chunk_bytes)
    return iter_codepoints(path, chunk_bytes)


def read_text_file(path: Source, *, allow_empty: bool = False) -> str:
    """Read a small UTF-8 file (a prompt, say) with the same checks and messages as `prepare`."""
    path = Path(path).expanduser()
    raw = read_bytes(path, what=WHAT)
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
    hint: str | None = UNKNOWN_HINT,
) -> np.ndarray:
    """Token ids of a whole UTF-8 file, in memory (for evaluation text, not training corpora).

    The file is read once, as it streams, so a pipe or FIFO (`--input /dev/stdin`) works.
    With `unknown="error"` the whole file is still read before the error, which names every
    distinct unknown character, not just those of the first piece that has one; `hint` ends
    that error (the caller's own options). A byte-level tokenizer reads the file's bytes as
    they are.
    """
    path = Path(path).expanduser()
    unit, lut = tokenizer.unit, tokenizer.lookup_table()
    parts: list[np.ndarray] = []
    missing: set[int] = set()
    for _, cps in iter_units(path, chunk_bytes, unit):
        if unknown == "error":
            ids = np.take(lut, cps)
            if (ids < 0).any():
                missing.update(np.unique(cps[ids < 0]).tolist())
            if missing:
                continue  # an error follows: keep reading only to name every character
        parts.append(tokenizer.encode_array(cps, unknown=unknown, replacement=replacement,
                                            what=str(path)))
    if missing:
        chars = [chr(c) for c in sorted(missing)]
        raise VocabError(unknown_chars_message(str(path), chars, hint=hint, unit=unit))
    if not parts:
        return np.zeros(0, dtype=tokenizer.id_dtype)
    return np.concatenate(parts)

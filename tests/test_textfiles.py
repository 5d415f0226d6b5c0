"""Tests for chargpt.text.textfiles: reading small text files and encoding whole files."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import write

from chargpt.errors import DataError, VocabError
from chargpt.text.textfiles import encode_file, read_text_file
from chargpt.text.tokenizer import CharTokenizer


def test_encode_file(tmp_path: Path) -> None:
    tok = CharTokenizer.from_text("abc \ufeff")
    src = write(tmp_path / "e.txt", "\ufeffab ca" * 3)
    ids = encode_file(src, tok, chunk_bytes=3)
    # only the leading BOM is a byte-order mark; later U+FEFF are ordinary characters
    assert ids.dtype == np.uint16 and tok.decode(ids) == "ab ca" + "\ufeffab ca" * 2
    plain = CharTokenizer.from_text("abc ")
    bad = write(tmp_path / "g.txt", "ab" + "é" * 5 + "—")
    with pytest.raises(VocabError, match="g.txt has 2 characters not in the vocabulary: 'é'"):
        encode_file(bad, plain, chunk_bytes=2)
    assert plain.decode(encode_file(bad, plain, unknown="skip")) == "ab"
    assert plain.decode(encode_file(bad, plain, unknown="replace")) == "ab" + " " * 6


def test_read_text_file(tmp_path: Path) -> None:
    assert read_text_file(write(tmp_path / "p.txt", "\ufeffŞeker\r\n")) == "Şeker\r\n"
    with pytest.raises(DataError, match="is empty"):
        read_text_file(write(tmp_path / "e.txt", ""))
    assert read_text_file(tmp_path / "e.txt", allow_empty=True) == ""
    with pytest.raises(DataError, match="byte offset 2"):
        read_text_file(write(tmp_path / "b.txt", b"ok\xc3("))
    with pytest.raises(DataError, match="binary"):
        read_text_file(write(tmp_path / "n.txt", b"a\x00"))
    with pytest.raises(DataError, match="file not found"):
        read_text_file(tmp_path / "missing.txt")
    with pytest.raises(DataError, match="is a directory"):
        read_text_file(tmp_path)


@contextlib.contextmanager
def _pipe_with(data: bytes) -> Iterator[Path]:
    """A pipe holding `data`, its writer closed, by the path a shell gives it (/dev/fd/N):
    what `echo ... | chargpt eval --input /dev/stdin` reads. A second read finds it empty."""
    r, w = os.pipe()
    os.write(w, data)  # less than a pipe's buffer
    os.close(w)
    try:
        yield Path(f"/dev/fd/{r}")
    finally:
        os.close(r)


@pytest.mark.parametrize("unknown", ["error", "skip"])
def test_encode_file_reads_a_pipe_once(unknown: str) -> None:
    tok = CharTokenizer.from_text("helo ")
    with _pipe_with(b"hello hello") as pipe:
        ids = encode_file(pipe, tok, unknown=unknown, chunk_bytes=4)
    assert tok.decode(ids) == "hello hello"


def test_encode_file_names_every_unknown_character_of_a_pipe() -> None:
    with _pipe_with("hé ho ☃".encode()) as pipe, \
            pytest.raises(VocabError, match="'é' .*'☃'"):
        encode_file(pipe, CharTokenizer.from_text("h o"), chunk_bytes=2)

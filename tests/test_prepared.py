"""Tests for chargpt.data.prepared: opening a prepared-data directory and refusing damaged ones."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from chargpt.data import prepared as prepared_mod
from chargpt.data.prepared import check_split_lengths, load_prepared
from chargpt.errors import DataError
from chargpt.text.tokenizer import CharTokenizer


def _edit_meta(path: Path, **changes) -> None:
    meta = json.loads((path / "meta.json").read_text())
    meta.update(changes)
    (path / "meta.json").write_text(json.dumps(meta))


def _npy_version(path: Path, major: int) -> None:
    """The same .npy file, its magic claiming another format version."""
    data = bytearray(path.read_bytes())
    data[6] = major  # b"\x93NUMPY", then the major and minor version bytes
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (lambda p: (p / "meta.json").unlink(), "not a prepared data directory .*meta.json"),
        (lambda p: (p / "meta.json").write_text("{"), "meta.json cannot be read"),
        (lambda p: _edit_meta(p, format="other"), "not a prepared data directory"),
        (lambda p: _edit_meta(p, version=2), "data format version 2"),
        (lambda p: _edit_meta(p, train_tokens=5), "train.npy has 468 tokens but meta.json"),
        (lambda p: _edit_meta(p, dtype="uint32"), "holds uint16 but meta.json says uint32"),
        (lambda p: _edit_meta(p, vocab_size="many"), "no valid 'vocab_size'"),
        (lambda p: (p / "train.npy").unlink(), "train.npy is missing"),
        (lambda p: (p / "val.npy").write_bytes(b"garbage"), "val.npy cannot be read"),
        (lambda p: _npy_version(p / "val.npy", 3), r"val.npy is a .npy file of format version "
                                                   r"\(3, 0\), which chargpt does not write"),
        (lambda p: (p / "vocab.json").unlink(), "vocabulary file not found"),
        (lambda p: CharTokenizer.from_text("xyz").save(p / "vocab.json"), "fingerprint"),
        (lambda p: np.save(p / "val.npy", np.array([{}], dtype=object)), "val.npy holds object"),
    ],
)
def test_damaged_prepared_dir(prepared: Path, damage, match: str) -> None:
    damage(prepared)
    with pytest.raises(DataError, match=match) as info:
        load_prepared(prepared)
    assert "\n" not in str(info.value)


def _ids_past_vocab(path: Path, at: int, value: int) -> None:
    """The same token file, its header and length intact, one id set to `value`."""
    ids = np.load(path)
    ids[at] = value
    np.save(path, ids)


@pytest.mark.parametrize("at", [0, -1])
def test_ids_past_the_vocabulary(prepared: Path, at: int) -> None:
    vocab_size = load_prepared(prepared).vocab_size
    _ids_past_vocab(prepared / "val.npy", at, vocab_size)
    with pytest.raises(DataError, match=rf"^val.npy holds token id {vocab_size}, past the "
                       rf"vocabulary of {vocab_size}; .* is damaged \(run `chargpt prepare` "
                       "again\\)$"):
        load_prepared(prepared)


def test_ids_are_checked_in_pieces(prepared: Path, monkeypatch) -> None:
    # Whatever the piece size, a bad id in the last piece is found and good data loads.
    monkeypatch.setattr(prepared_mod, "CHECK_BYTES", 6)
    assert len(load_prepared(prepared).train) == 468
    _ids_past_vocab(prepared / "train.npy", -1, 60000)
    with pytest.raises(DataError, match="train.npy holds token id 60000"):
        load_prepared(prepared)


def test_truncated_token_file(prepared: Path) -> None:
    path = prepared / "train.npy"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataError, match="train.npy"):
        load_prepared(prepared)


def test_not_a_data_dir(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data directory not found"):
        load_prepared(tmp_path / "nope")
    with pytest.raises(DataError, match="run `chargpt prepare`"):
        load_prepared(tmp_path)


def test_check_split_lengths(prepared: Path) -> None:
    d = load_prepared(prepared)  # 468 train, 52 val
    check_split_lengths(d, 51)
    with pytest.raises(DataError, match="val split .* has 52 tokens .* block_size 52 needs"):
        check_split_lengths(d, 52)
    with pytest.raises(DataError, match="smaller --block-size"):
        check_split_lengths(d, 1000)

"""The prepared-data directory: its format, and opening one for training or evaluation.

A directory made by `prepare` (see preparation.py) holds `train.npy` and `val.npy` (token ids,
the validation split taken from the end of the text), optionally `test.npy` (a test split after
val, at the very end), `vocab.json` and `meta.json`, which is written last and marks the
directory as complete. `meta.json`'s `test_tokens` and `unit` came later: a directory without
them has no test split and character tokens. `load_prepared` opens one with memory-mapped,
read-only token arrays and checks that the files agree with each other and that every token id
is in the vocabulary; `check_split_lengths` refuses a context longer than a split. Nothing here
needs torch.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.lib import format as npy_format

from chargpt.errors import ConfigError, DataError
from chargpt.fileio import os_reason
from chargpt.text.textfiles import Source
from chargpt.text.tokenizer import CharTokenizer

__all__ = [
    "DATA_FORMAT",
    "DATA_VERSION",
    "META_FILE",
    "SPLITS",
    "PreparedData",
    "check_split_lengths",
    "load_prepared",
    "read_meta",
]

DATA_FORMAT = "chargpt-data"
DATA_VERSION = 1
TRAIN_FILE, VAL_FILE, VOCAB_FILE, META_FILE = "train.npy", "val.npy", "vocab.json", "meta.json"
TEST_FILE = "test.npy"
SPLITS = ("train", "val", "test")
TOKEN_DTYPES = ("uint16", "uint32")
# The largest-id check reads a token file in pieces of this many bytes: a bounded buffer
# whatever the corpus size, and no pages of the file left mapped by the check itself.
CHECK_BYTES = 1 << 22
# meta.json lists every source file (~200 bytes each): this is about a million files.
MAX_META_BYTES = 1 << 28

_META_TYPES: dict[str, type | tuple[type, ...]] = {
    "dtype": str,
    "vocab_size": int,
    "vocab_fingerprint": str,
    "train_tokens": int,
    "val_tokens": int,
}


@dataclass(frozen=True)
class PreparedData:
    """A prepared-data directory: read-only memory-mapped token splits plus their vocabulary."""

    train: np.ndarray
    val: np.ndarray
    tokenizer: CharTokenizer
    meta: dict[str, Any]
    path: Path
    test: np.ndarray | None = None  # only where the data was prepared with a test split

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def split(self, name: str) -> np.ndarray:
        if name not in SPLITS:
            raise ConfigError(f"split must be one of {', '.join(SPLITS)}, got {name!r}")
        if name == "test":
            if self.test is None:
                raise DataError(
                    f"{self.path} has no test split (prepare it with --test-fraction, or "
                    "train on a benchmark dataset such as --dataset enwik8)"
                )
            return self.test
        return self.train if name == "train" else self.val


def _check_header(path: Path, dtype: str, length: int, rerun: str) -> None:
    """The .npy header describes exactly `length` ids of `dtype` filling the file: checked
    before the file is mapped, so a hostile header never reaches numpy's memory map."""
    try:
        with open(path, "rb") as f:
            version = npy_format.read_magic(f)
            read = {(1, 0): npy_format.read_array_header_1_0,
                    (2, 0): npy_format.read_array_header_2_0}.get(version)
            header = None if read is None else read(f)
            offset, size = f.tell(), os.fstat(f.fileno()).st_size
    except FileNotFoundError:
        raise DataError(f"{path.name} is missing; {rerun}") from None
    except (OSError, ValueError, EOFError, SyntaxError) as e:
        raise DataError(f"{path.name} cannot be read ({' '.join(str(e).split())}); "
                        f"{rerun}") from None
    if header is None:
        raise DataError(f"{path.name} is a .npy file of format version {version}, which "
                        f"chargpt does not write; {rerun}")
    shape, fortran, descr = header
    if len(shape) != 1 or fortran:
        raise DataError(f"{path.name} is not a 1-D token array; {rerun}")
    if descr != np.dtype(dtype):
        raise DataError(f"{path.name} holds {descr} but meta.json says {dtype}; {rerun}")
    if shape[0] != length:
        raise DataError(f"{path.name} has {shape[0]} tokens but meta.json says {length}; {rerun}")
    if offset + length * descr.itemsize != size:
        raise DataError(f"{path.name} has {size:,} bytes, not the {length:,} tokens its header "
                        f"promises; {rerun}")


def _check_ids(path: Path, dtype: np.dtype, offset: int, vocab_size: int, rerun: str) -> None:
    """Every id in the token file is below `vocab_size`: an id past the vocabulary would end
    in an IndexError inside the model's embedding. Read once per load, in pieces."""
    if vocab_size > np.iinfo(dtype).max:
        return  # no value the dtype can hold is out of range
    buf = np.empty(CHECK_BYTES // dtype.itemsize, dtype=dtype)
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            while n := f.readinto(memoryview(buf).cast("B")) // dtype.itemsize:
                top = int(buf[:n].max())
                if top >= vocab_size:
                    raise DataError(f"{path.name} holds token id {top}, past the vocabulary "
                                    f"of {vocab_size}; {rerun}")
    except OSError as e:
        raise DataError(f"{path.name} cannot be read ({os_reason(e)}); {rerun}") from None


def _load_tokens(path: Path, dtype: str, length: int, data_dir: Path,
                 vocab_size: int) -> np.ndarray:
    rerun = f"the prepared data in {data_dir} is damaged (run `chargpt prepare` again)"
    _check_header(path, dtype, length, rerun)
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        reason = " ".join(str(e).split())
        raise DataError(f"{path.name} cannot be read ({reason}); {rerun}") from None
    _check_ids(path, arr.dtype, arr.offset, vocab_size, rerun)
    return arr


def read_meta(path: Path) -> dict[str, Any]:
    """The checked meta.json of prepared-data directory `path`; one DataError line if it is
    missing or not chargpt's."""
    not_prepared = f"{path} is not a prepared data directory (run `chargpt prepare`)"
    try:
        if (path / META_FILE).stat().st_size > MAX_META_BYTES:
            raise DataError(f"{not_prepared}: meta.json is larger than any chargpt metadata")
        meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{not_prepared}: meta.json is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        reason = " ".join(str(e).split()) or "JSON nested too deeply"
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
    if meta["dtype"] not in TOKEN_DTYPES:
        raise DataError(f"{not_prepared}: meta.json has unknown dtype {meta['dtype']!r}")
    test = meta.get("test_tokens", 0)
    if type(test) is not int or test < 0:
        raise DataError(f"{not_prepared}: meta.json has no valid 'test_tokens'")
    if meta.get("unit", "char") not in ("char", "byte"):
        raise DataError(f"{not_prepared}: meta.json has unknown unit {meta.get('unit')!r}")
    return meta


def load_prepared(data_dir: Source) -> PreparedData:
    """Open a directory made by `prepare`, checking that it is complete and consistent."""
    path = Path(data_dir).expanduser()
    if not path.exists():
        raise DataError(f"data directory not found: {path}")
    if not path.is_dir():
        raise DataError(f"{path} is not a directory")
    meta = read_meta(path)
    tokenizer = CharTokenizer.load(path / VOCAB_FILE)
    if tokenizer.fingerprint() != meta["vocab_fingerprint"]:
        raise DataError(
            f"{path / VOCAB_FILE} does not match meta.json (different vocabulary "
            "fingerprint); run `chargpt prepare` again"
        )
    if tokenizer.vocab_size != meta["vocab_size"]:
        raise DataError(f"{path / VOCAB_FILE} size does not match meta.json")
    if tokenizer.unit != meta.get("unit", "char"):
        raise DataError(f"{path / VOCAB_FILE} is a {tokenizer.unit} vocabulary but meta.json "
                        f"says {meta.get('unit', 'char')}; run `chargpt prepare` again")
    n_vocab, dtype = tokenizer.vocab_size, meta["dtype"]
    train = _load_tokens(path / TRAIN_FILE, dtype, meta["train_tokens"], path, n_vocab)
    val = _load_tokens(path / VAL_FILE, dtype, meta["val_tokens"], path, n_vocab)
    n_test = meta.get("test_tokens", 0)
    test = _load_tokens(path / TEST_FILE, dtype, n_test, path, n_vocab) if n_test else None
    return PreparedData(train=train, val=val, tokenizer=tokenizer, meta=meta, path=path,
                        test=test)


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

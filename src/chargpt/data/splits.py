"""Where a prepared corpus is cut into train, val and test, and writing the token files.

The splits are consecutive pieces of the one token stream, in that order: train first, then
val, then test (when there is one) at the very end. `split_counts` turns fractions, or the
fixed (val, test) token counts of a benchmark's standard split, into the three sizes;
`SplitWriter` writes the stream into one `.npy` file per split as it is encoded, switching
file at each boundary.
"""

from __future__ import annotations

import os
from decimal import Decimal
from pathlib import Path
from typing import BinaryIO

import numpy as np

from chargpt.errors import DataError

__all__ = ["SplitWriter", "split_counts", "split_sizes"]


def _exact(fraction: float) -> Decimal:
    # Decimal of the shortest repr is the fraction the user wrote, so 0.9 * 10 is 9, not the
    # 8 that binary floating point would give.
    return Decimal(repr(float(fraction)))


def split_counts(total: int, val_fraction: float, test_fraction: float = 0.0,
                 heldout: tuple[int, int] | None = None) -> tuple[int, int, int]:
    """(n_train, n_val, n_test) for `total` tokens.

    With fractions, train is floor(total * (1 - val - test)) and train + val is
    floor(total * (1 - test)), as in `int(0.9 * n)`; test_fraction 0 means no test split.
    `heldout` = (n_val, n_test) fixes the last tokens instead (a benchmark's standard split:
    the last 5 M tokens are test, the 5 M before them val, everything before that train).
    """
    if heldout is not None:
        n_val, n_test = heldout
        return total - n_val - n_test, n_val, n_test
    n_train = int((1 - _exact(val_fraction) - _exact(test_fraction)) * total)
    n_before_test = int((1 - _exact(test_fraction)) * total)
    return n_train, n_before_test - n_train, total - n_before_test


def split_sizes(total: int, val_fraction: float) -> tuple[int, int]:
    """(n_train, n_val) without a test split: train is floor(total * (1 - val_fraction))."""
    n_train, n_val, _ = split_counts(total, val_fraction)
    return n_train, n_val


class SplitWriter:
    """Writes one stream of ids into a sequence of .npy files of fixed lengths, in order."""

    def __init__(self, out: Path, files: list[tuple[str, int]], dtype: np.dtype) -> None:
        self._files: list[tuple[BinaryIO, int]] = []
        for name, n in files:
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
        self._left = files[0][1]
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

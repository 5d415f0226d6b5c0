"""The file-system helpers: atomic writes and one wording for files that cannot be read."""

from __future__ import annotations

import errno

import pytest

from chargpt.errors import CheckpointError, DataError
from chargpt.fileio import atomic_write, atomic_write_text, os_reason, read_bytes, read_error


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
    path = tmp_path / "f.txt"
    atomic_write_text(path, "old")

    def half_then_fail(f):
        f.write(b"new, but")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError):
        atomic_write(path, half_then_fail)
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]
    atomic_write(path, lambda f: f.write(b"new"))
    assert path.read_text() == "new" and len(list(tmp_path.iterdir())) == 1


def test_unreadable_files_are_one_line_user_errors(tmp_path):
    assert str(read_error(tmp_path / "x", FileNotFoundError(2, "No such file"), what="thing")) \
        == f"thing not found: {tmp_path / 'x'}"
    with pytest.raises(DataError, match="is a directory, not a vocabulary file"):
        read_bytes(tmp_path, what="vocabulary file")
    denied = read_error(tmp_path, PermissionError(13, "Permission denied"),
                        error=CheckpointError)
    assert isinstance(denied, CheckpointError)
    assert str(denied) == f"cannot read {tmp_path}: Permission denied"
    assert os_reason(OSError(errno.ENOSPC, "No space left on device", "/x")) == \
        "No space left on device"

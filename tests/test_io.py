"""The file-system helpers: atomic writes and one wording for files that cannot be read."""

from __future__ import annotations

import errno
import json

import pytest

from chargpt import fileio
from chargpt.errors import CheckpointError, ConfigError, DataError
from chargpt.fileio import (
    atomic_write,
    atomic_write_text,
    json_text,
    new_dir,
    os_reason,
    read_bytes,
    read_error,
    shown,
    utf8_path,
)


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


# --- a file or directory that cannot be created: the user's path, the real reason -----------


def _write_error(path) -> OSError:
    with pytest.raises(OSError) as e:
        atomic_write(path, lambda f: f.write(b"x"))
    return e.value


def test_a_write_names_the_users_path_and_why(tmp_path):
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("x")
    cases = [
        (tmp_path / "nodir" / "a.png", FileNotFoundError,
         f"its folder {tmp_path / 'nodir'} does not exist"),
        (tmp_path / "adir", IsADirectoryError, "it is a directory"),
        (tmp_path / "afile" / "a.png", NotADirectoryError,
         f"{tmp_path / 'afile'} is a file, not a folder"),
        (tmp_path / "afile" / "deeper" / "a.png", NotADirectoryError,
         f"{tmp_path / 'afile'} is a file, not a folder"),
    ]
    for path, kind, reason in cases:
        e = _write_error(path)
        assert isinstance(e, kind) and (e.filename, os_reason(e)) == (str(path), reason)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "afile"]  # no temp left


def test_permission_denied_names_the_folder(tmp_path, monkeypatch):
    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", "hidden.tmp")

    monkeypatch.setattr(fileio.os, "open", denied)
    e = _write_error(tmp_path / "a.txt")
    assert (e.filename, os_reason(e)) == (str(tmp_path / "a.txt"),
                                          f"permission denied in {tmp_path}")


def test_a_new_directory_names_the_users_path(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OSError) as e, new_dir(tmp_path / "afile" / "out", "export"):
        pass
    assert e.value.filename == str(tmp_path / "afile" / "out")
    assert os_reason(e.value) == f"{tmp_path / 'afile'} is a file, not a folder"


@pytest.mark.parametrize(("out", "says"), [
    ("nodir/a.png", "chargpt: error: nodir/a.png: its folder nodir does not exist\n"),
    ("adir", "chargpt: error: adir: it is a directory\n"),
])
def test_the_cli_names_the_path_not_a_temporary_file(tmp_path, monkeypatch, capsys, out, says):
    # Any command's write that fails reaches the CLI's last resort for an OSError.
    from chargpt.cli import commands

    monkeypatch.chdir(tmp_path)
    (tmp_path / "adir").mkdir()
    monkeypatch.setitem(commands.COMMANDS, "presets",
                        lambda args: atomic_write(out, lambda f: f.write(b"png")))
    assert commands.main(["presets"]) == 1
    assert capsys.readouterr().err == says
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir"]


# --- paths whose bytes are not UTF-8 --------------------------------------------------------


def test_json_text_keeps_any_path():
    obj = {"path": "/tmp/bad\udcff.txt", "char": "é"}
    text = json_text(obj)
    assert "é" in text and json.loads(text.encode("utf-8")) == obj


def test_shown_prints_the_bytes_as_escapes():
    assert shown("bad\udcff.txt") == "bad\\xff.txt" and shown("café") == "café"
    assert shown("x\ud800") == "x\\ud800"


def test_utf8_path_refuses_what_safetensors_cannot_open():
    assert utf8_path("runs/x", "the run directory") == "runs/x"
    with pytest.raises(ConfigError, match=r"^the run directory runs/x\\xff has a name that "
                       "is not UTF-8 text"):
        utf8_path("runs/x\udcff", "the run directory")

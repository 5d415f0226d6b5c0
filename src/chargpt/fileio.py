"""The file system, in one place: atomic writes, fsync, and file errors turned into user errors.

A file written with `atomic_write` (or `atomic_write_bytes` / `atomic_write_text`) is either
the complete new content or the previous one, never a torn mix: the data goes to a temporary
file in the same directory (same file system, so the final rename is atomic), is flushed and
fsynced, and is then moved over the target with `os.replace`. The writers raise plain
`OSError`. Readers that face a user's file call `read_bytes`, or `read_error` in their own
`except OSError`, so every missing, unreadable or mistaken path is reported in the same words as
one `ChargptError` line; `os_reason` is the one-line reason of any OSError. A file or directory
that cannot be created is reported as the user's path, never the hidden sibling it is built in,
with the reason in plain words (`creation_reason`: its folder does not exist, is a file, ...).
`json_text` is JSON that any path survives, and `shown` a path as text that prints anywhere.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from chargpt.errors import ChargptError, ConfigError, DataError
from chargpt.progress import printable

__all__ = [
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "creation_reason",
    "fsync_dir",
    "fsync_file",
    "json_text",
    "OTHERS_WRITE",
    "os_reason",
    "private_dir",
    "read_bytes",
    "read_error",
    "read_json",
    "sha256_file",
    "shown",
    "temp_path_for",
    "untrusted",
    "utf8_path",
]

OTHERS_WRITE = stat.S_IWGRP | stat.S_IWOTH  # mode bits that let someone else change a file


def temp_path_for(path: str | os.PathLike[str], tag: str = "tmp") -> Path:
    """A hidden, unique sibling of `path` suitable for building a replacement of it."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.{tag}")


def check_new_dir(path: Path) -> None:
    """Refuse a directory to write that exists and is not empty: what chargpt writes there
    must not mix with what a user had there."""
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ConfigError(f"{path} already exists and is not empty; choose a new directory")


@contextlib.contextmanager
def new_dir(path: Path, tag: str) -> Iterator[Path]:
    """A hidden sibling of `path` to fill inside the block; when the block ends without an
    error it becomes `path` (still new or empty), otherwise it is removed, so `path` appears
    whole or not at all."""
    tmp = temp_path_for(path, tag)
    try:
        try:
            tmp.mkdir(parents=True)
        except OSError as e:
            raise _about(e, path) from None
        yield tmp
        check_new_dir(path)
        if path.exists():
            path.rmdir()
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Make a rename inside `directory` durable; silently skipped where unsupported."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_file(path: str | os.PathLike[str]) -> None:
    """Flush a file that was written and closed elsewhere to the disk."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def sha256_file(path: str | os.PathLike[str]) -> str:
    """The hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def atomic_write(path: str | os.PathLike[str], write: Callable[[BinaryIO], object]) -> None:
    """Replace `path` with what `write(f)` writes to a fresh binary file, atomically."""
    path = Path(path)
    if path.is_dir():  # found before the content is made, and named, not its temporary file
        raise IsADirectoryError(errno.EISDIR, "it is a directory", str(path))
    tmp = temp_path_for(path)
    # os.open with 0o666 lets the umask decide the permissions, as a plain open() would;
    # tempfile.mkstemp would force 0o600 on the final file.
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as e:
        raise _about(e, path) from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Replace `path` with `data` so that readers only ever see the old or the new file."""
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> None:
    """Like `atomic_write_bytes` for text; newlines are written as given (no translation)."""
    atomic_write_bytes(path, text.encode(encoding))


def creation_reason(e: OSError, path: str | os.PathLike[str]) -> str:
    """Why `path` could not be created (`e`, raised for it or for the hidden sibling it is
    built in), in plain words about `path`: a folder on the way is a file, permission denied,
    its folder does not exist; else the OS's reason and where."""
    path = Path(path)
    existing = next((p for p in path.parents if p.exists()), None)
    if existing is not None and not existing.is_dir():
        return f"{shown(existing)} is a file, not a folder"
    if isinstance(e, PermissionError):
        return f"permission denied in {shown(existing or path.parent)}"
    if existing != path.parent and isinstance(e, FileNotFoundError):
        return f"its folder {shown(path.parent)} does not exist"
    return f"cannot create it in {shown(path.parent)} ({os_reason(e)})"


def _about(e: OSError, path: Path) -> OSError:
    """`e` as an error about `path` itself, with `creation_reason` as its reason."""
    return OSError(e.errno, creation_reason(e, path), shown(path))


def shown(path: str | os.PathLike[str]) -> str:
    """`path` as text that can be printed anywhere (progress.printable: bytes that are not
    UTF-8 as \\xNN)."""
    return printable(os.fsdecode(path))


def utf8_path(path: str | os.PathLike[str], what: str,
              error: type[ChargptError] = ConfigError) -> str:
    """`path` as text for a library that opens only UTF-8 paths (safetensors); a path with
    bytes that are not UTF-8 is one `error` line naming `what` it is."""
    text = os.fsdecode(path)
    if _SURROGATE.search(text):
        raise error(f"{what} {shown(text)} has a name that is not UTF-8 text, which the "
                    "safetensors library cannot open; choose or rename it to a UTF-8 name")
    return text


_SURROGATE = re.compile("[\ud800-\udfff]")


def json_text(obj: Any, indent: int | None = 2) -> str:
    """`obj` as JSON with its characters as they are, except lone surrogates (the bytes of a
    file name that are not UTF-8), written as \\u escapes: the text is valid UTF-8 and
    json.loads gives the same path back. They can only occur inside strings, as every other
    character of JSON is ASCII."""
    text = json.dumps(obj, indent=indent, ensure_ascii=False)
    return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def os_reason(e: BaseException) -> str:
    """An OS error's reason as one line: "No space left on device", not "[Errno 28] ...: path";
    also when a library wraps it in its own error, as safetensors does ("Error while
    serializing: I/O error: No space left on device (os error 28)")."""
    if isinstance(e, OSError):
        return e.strerror or " ".join(str(e).split()) or type(e).__name__
    text = " ".join(str(e).split())
    wrapped = re.search(r"I/O error: (.+?) \(os error \d+\)", text)
    return wrapped.group(1) if wrapped else text or type(e).__name__


def read_error(
    path: str | os.PathLike[str],
    e: OSError,
    *,
    what: str = "file",
    error: type[ChargptError] = DataError,
) -> ChargptError:
    """The user error for a `what` at `path` that could not be read because of `e`."""
    if isinstance(e, FileNotFoundError):
        return error(f"{what} not found: {path}")
    if isinstance(e, IsADirectoryError):
        return error(f"{path} is a directory, not a {what}")
    return error(f"cannot read {path}: {os_reason(e)}")


def read_bytes(
    path: str | os.PathLike[str],
    *,
    what: str = "file",
    error: type[ChargptError] = DataError,
    max_bytes: int | None = None,
) -> bytes:
    """The whole content of a user's file, or one `error` line saying why it cannot be read.

    With `max_bytes`, a larger file is refused before it is read (a hostile or mistaken file
    must not fill the memory)."""
    try:
        with open(path, "rb") as f:
            # Read one byte past the limit rather than trust the size: /dev/zero has none.
            data = f.read() if max_bytes is None else f.read(max_bytes + 1)
    except OSError as e:
        raise read_error(path, e, what=what, error=error) from None
    if max_bytes is not None and len(data) > max_bytes:
        raise error(f"{path} is too large for a {what} (more than {max_bytes:,} bytes)")
    return data


def read_json(
    path: str | os.PathLike[str], *, error: type[ChargptError] = DataError, max_bytes: int
) -> Any:
    """A user's JSON file, at most `max_bytes`; anything else is one `error` line."""
    raw = read_bytes(path, error=error, max_bytes=max_bytes)
    try:
        return json.loads(raw)
    except ValueError as e:  # includes bytes that are not UTF-8
        raise error(f"{path} is unreadable: {' '.join(str(e).split())}") from None
    except RecursionError:
        raise error(f"{path} is unreadable: JSON nested too deeply") from None


def untrusted(directory: Path) -> str | None:
    """Why someone other than the user could change what `directory` (resolved, existing)
    holds, or None: it must be the user's and writable by no one else, and the directories
    above it the user's or root's, and not writable by others unless sticky (as /tmp is, whose
    entries only their owners may replace)."""
    uid = os.geteuid()
    for path in (directory, *directory.parents):
        st, strict = os.stat(path), path == directory
        if st.st_uid != uid and (strict or st.st_uid != 0):
            return f"{path} belongs to someone else"
        if st.st_mode & OTHERS_WRITE and (strict or not st.st_mode & stat.S_ISVTX):
            return f"{path} is group- or world-writable"
    return None


def private_dir(directory: Path, own: Path) -> tuple[Path, str | None]:
    """`directory` (made, mode 0700, where missing) and where it leads (through symlinks); and
    None when both it and `own` (it, or the directory holding it) are the user's alone (it is
    then set to mode 0700), else why they are not. For directories chargpt loads code from."""
    try:
        own.mkdir(mode=0o700, parents=True, exist_ok=True)
        directory.mkdir(mode=0o700, exist_ok=True)
        real = directory.resolve()
        why = untrusted(own) or untrusted(real)
        if why is None:
            os.chmod(real, 0o700)
        return real, why
    except OSError as e:
        return directory, f"{directory} cannot be used ({e.strerror or e})"

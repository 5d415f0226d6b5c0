"""Small file-system helpers shared by the package: atomic writes.

A file written with `atomic_write_bytes` or `atomic_write_text` is either the complete new
content or the previous one, never a torn mix: the data goes to a temporary file in the same
directory (same file system, so the final rename is atomic), is flushed and fsynced, and is then
moved over the target with `os.replace`. The helpers raise plain `OSError`; callers turn that
into a user-facing error with their own context.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

__all__ = ["atomic_write_bytes", "atomic_write_text", "fsync_dir", "temp_path_for"]


def temp_path_for(path: str | os.PathLike[str], tag: str = "tmp") -> Path:
    """A hidden, unique sibling of `path` suitable for building a replacement of it."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.{tag}")


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Make a rename inside `directory` durable; silently skipped where unsupported."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Replace `path` with `data` so that readers only ever see the old or the new file."""
    path = Path(path)
    tmp = temp_path_for(path)
    # os.open with 0o666 lets the umask decide the permissions, as a plain open() would;
    # tempfile.mkstemp would force 0o600 on the final file.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> None:
    """Like `atomic_write_bytes` for text; newlines are written as given (no translation)."""
    atomic_write_bytes(path, text.encode(encoding))

"""Named corpora that are downloaded on first use and cached, checked by size and sha256.

`DATASETS` lists the corpora chargpt knows by name; `fetch(name)` returns the path of a verified
local copy, downloading it into `cache_dir()` when there is none (or when the cached copy does
not match its checksum). Downloads use only the standard library and are written with
`io.atomic_write`, verified before the rename, so concurrent or interrupted downloads never
leave a corrupt file under the final name.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from .errors import ConfigError, DataError
from .io import atomic_write, os_reason, sha256_file
from .progress import progress_bar

__all__ = ["DATASETS", "Dataset", "cache_dir", "fetch"]

_READ_BYTES = 1 << 16


@dataclass(frozen=True)
class Dataset:
    """A downloadable corpus and the size and checksum its file must have."""

    name: str
    url: str
    sha256: str
    size: int
    filename: str
    description: str = ""


DATASETS: dict[str, Dataset] = {
    "shakespeare": Dataset(
        "shakespeare",
        url=(
            "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/"
            "input.txt"
        ),
        sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
        size=1115394,
        filename="tinyshakespeare.txt",
        description="Tiny Shakespeare: 40,000 lines of Shakespeare's plays (1.1 MB)",
    ),
}


def cache_dir() -> Path:
    """$CHARGPT_CACHE, else $XDG_CACHE_HOME/chargpt, else ~/.cache/chargpt."""
    if os.environ.get("CHARGPT_CACHE"):
        return Path(os.environ["CHARGPT_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    # The XDG spec says relative values are to be ignored.
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "chargpt"
    return Path.home() / ".cache" / "chargpt"


def _is_valid(path: Path, ds: Dataset) -> bool:
    try:
        return path.stat().st_size == ds.size and sha256_file(path) == ds.sha256
    except OSError:
        return False


def _one_line(reason: object) -> str:
    return " ".join(str(reason).split()) or type(reason).__name__


def _download(ds: Dataset, f: BinaryIO, progress: bool, timeout: float) -> tuple[int, str]:
    """Stream ds.url into `f`; return (bytes, sha256). Stops early past the expected size."""
    h = hashlib.sha256()
    n = 0
    request = urllib.request.Request(ds.url, headers={"User-Agent": "chargpt"})
    with (
        urllib.request.urlopen(request, timeout=timeout) as response,
        progress_bar(ds.size, f"downloading {ds.name}", enabled=progress) as bar,
    ):
        while block := response.read(_READ_BYTES):
            h.update(block)
            f.write(block)
            n += len(block)
            bar.update(len(block))
            if n > ds.size:
                break
    return n, h.hexdigest()


def _download_error(ds: Dataset, reason: str) -> DataError:
    return DataError(
        f"could not download {ds.name} from {ds.url} ({reason}); "
        "pass a local file with --input FILE"
    )


def _download_verified(ds: Dataset, f: BinaryIO, progress: bool, timeout: float) -> None:
    """Download `ds` into `f`, or raise a DataError: then nothing is saved."""
    try:
        n, digest = _download(ds, f, progress, timeout)
    except urllib.error.HTTPError as e:
        raise _download_error(ds, f"HTTP {e.code} {_one_line(e.reason)}") from None
    except urllib.error.URLError as e:
        raise _download_error(ds, _one_line(e.reason)) from None
    except (OSError, http.client.HTTPException, ValueError) as e:
        # OSError covers timeouts and resets, and also a full disk while writing.
        raise _download_error(ds, _one_line(e)) from None
    if n != ds.size or digest != ds.sha256:
        if n == ds.size:
            got = f"sha256 {digest[:16]}..."
        else:
            got = f"more than {ds.size} bytes" if n > ds.size else f"{n} bytes"
        raise DataError(
            f"the download of {ds.name} from {ds.url} does not match its checksum (expected "
            f"{ds.size} bytes with sha256 {ds.sha256[:16]}..., got {got}); the file may "
            "have changed upstream; pass a local file with --input FILE"
        )


def fetch(name: str, *, progress: bool = False, timeout: float = 30) -> Path:
    """The path of a verified local copy of the named corpus, downloading it if needed."""
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r} (available: {', '.join(sorted(DATASETS))})")
    ds = DATASETS[name]
    directory = cache_dir()
    dest = directory / ds.filename
    if dest.exists():
        if _is_valid(dest, ds):
            return dest
        # A truncated or altered copy: drop it so that a failed download cannot leave it
        # looking usable.
        with contextlib.suppress(OSError):
            dest.unlink()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create the cache directory {directory}: {os_reason(e)}") from None
    try:
        # Verified before the rename: a failed or wrong download never appears under `dest`.
        atomic_write(dest, lambda f: _download_verified(ds, f, progress, timeout))
    except OSError as e:
        raise DataError(f"cannot save the download as {dest}: {os_reason(e)}") from None
    return dest

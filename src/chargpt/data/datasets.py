"""Named corpora that are downloaded on first use and cached, checked by size and checksum.

`DATASETS` lists the corpora chargpt knows by name; `fetch(name)` returns the path of a verified
local copy, downloading it into `cache_dir()` when there is none (or when the cached copy does
not match its checksum). Downloads use only the standard library and are written with
`io.atomic_write`, verified before the rename, so concurrent or interrupted downloads never
leave a corrupt file under the final name.

The character-level benchmarks (enwik8, text8) come as zip archives holding one file. The zip
is checked (size, and sha256 where one is published), then only that one member is unpacked,
by its exact name, into a file whose name chargpt chooses: no path from inside the archive is
ever used (no zip-slip), and unpacking stops at the member's published size (no zip bomb). The
unpacked file is checked against its own published size and digest, and only it is cached.
A benchmark also carries its standard split (`Dataset.split`), which `prepare` applies.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import http.client
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from chargpt.errors import ConfigError, DataError, warn
from chargpt.fileio import atomic_write, os_reason, private_dir, temp_path_for
from chargpt.progress import progress_bar

__all__ = ["DATASETS", "Archive", "Dataset", "Digest", "cache_dir", "dataset", "fetch",
           "private_cache"]

_READ_BYTES = 1 << 16


@dataclass(frozen=True)
class Digest:
    """A published checksum of a file: hashlib's algorithm name and the hex digest."""

    algorithm: str
    hexdigest: str

    def of_file(self, path: Path) -> str:
        h = hashlib.new(self.algorithm)
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
        return h.hexdigest()


@dataclass(frozen=True)
class Archive:
    """The corpus is one file inside a zip download: its name there, size and digest."""

    member: str
    size: int
    digest: Digest


@dataclass(frozen=True)
class Dataset:
    """A downloadable corpus and the size and checksums its files must have."""

    name: str
    url: str
    sha256: str  # of the download; "" where none is published (the archive's digest checks)
    size: int  # bytes of the download
    filename: str  # the cached corpus
    description: str = ""
    archive: Archive | None = None  # the download is a zip holding the corpus
    split: tuple[int, int] | None = None  # (val, test) tokens at the end: a standard split
    # (vocabulary size, training tokens) for `chargpt estimate`; the vocabulary is an upper
    # bound where the exact count is not published (enwik8: at most 256 byte values).
    estimate_sizes: tuple[int, int] = (0, 0)

    def __post_init__(self) -> None:
        if not self.sha256 and self.archive is None:
            raise ConfigError(f"dataset {self.name} has no checksum to verify it by")

    @property
    def corpus_check(self) -> tuple[int, Digest]:
        """The size and digest of the cached corpus file."""
        if self.archive is not None:
            return self.archive.size, self.archive.digest
        return self.size, Digest("sha256", self.sha256)


# Where each checksum was published (never computed here: this machine cannot download them):
# - enwik8.zip, 36,445,475 bytes, sha256: Hugging Face datasets, datasets/enwik8/
#   dataset_infos.json ("download_checksums" of http://mattmahoney.net/dc/enwik8.zip).
# - enwik8, 100,000,000 bytes, sha1 57b8...76b2: Matt Mahoney's table on
#   mattmahoney.net/dc/textdata.html, as quoted in dmlc/gluon-nlp's
#   src/gluonnlp/data/corpora/large_text_compression_benchmark.py (md5 a1fa5ffd... there too).
# - text8.zip, 31,344,016 bytes: TensorFlow's word2vec tutorial (maybe_download). No sha256
#   of text8.zip could be traced to a source that can be cited, so the zip is checked by size
#   only, and the unpacked file by size and md5.
# - text8, 100,000,000 bytes, md5 3bea...da7e: the text8 loader of danijar/tensorsets, which
#   checks the unpacked file against it (quoted as Mahoney's by other loaders).
# The standard split of both (Mikolov et al. 2012 for text8; Al-Rfou et al. 2018 and
# Transformer-XL for both): the first 90 M units train, the next 5 M validation, the last 5 M
# test.
_BENCHMARK_SPLIT = (5_000_000, 5_000_000)

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
        estimate_sizes=(65, 1_003_854),
    ),
    "enwik8": Dataset(
        "enwik8",
        url="http://mattmahoney.net/dc/enwik8.zip",
        sha256="547994d9980ebed1288380d652999f38a14fe291a6247c157c3d33d4932534bc",
        size=36_445_475,
        filename="enwik8",
        description="enwik8: the first 10^8 bytes of an English Wikipedia XML dump (Hutter "
        "Prize); results are in bits per byte",
        archive=Archive("enwik8", 100_000_000,
                        Digest("sha1", "57b8363b814821dc9d47aa4d41f58733519076b2")),
        split=_BENCHMARK_SPLIT,
        estimate_sizes=(256, 90_000_000),
    ),
    "text8": Dataset(
        "text8",
        url="http://mattmahoney.net/dc/text8.zip",
        sha256="",
        size=31_344_016,
        filename="text8",
        description="text8: 10^8 characters of Wikipedia text reduced to a-z and space",
        archive=Archive("text8", 100_000_000,
                        Digest("md5", "3bea1919949baf155f99411df5fada7e")),
        split=_BENCHMARK_SPLIT,
        estimate_sizes=(27, 90_000_000),
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


def private_cache(name: str, what: str) -> Path:
    """A directory for code chargpt builds and later loads (`what`, plural, for the warning):
    `name/` in the cache directory when no one but the user can write it, else a private
    directory of the user's in the temporary directory (`chargpt-NAME-UID`), or failing that a
    fresh one for the process; `warn` says so. The cache itself may well be shared: downloaded
    corpora are checksummed and safe to share, code is not. An OSError off POSIX systems, where
    ownership is not checked here, or when no directory can be made."""
    if os.name != "posix":
        raise OSError("code is kept only where its owner and permissions can be checked "
                      "(a POSIX system)")
    cache = cache_dir().resolve()
    configured, why = private_dir(cache / name, cache)
    if why is None:
        return configured
    own = Path(tempfile.gettempdir()).resolve() / f"chargpt-{name}-{os.geteuid()}"
    fallback, unusable = private_dir(own, own)
    if unusable is not None:
        fallback = Path(tempfile.mkdtemp(prefix=f"chargpt-{name}-"))
        atexit.register(shutil.rmtree, fallback, ignore_errors=True)
    warn(f"{what} are not kept in the cache: {why}; they are kept in {fallback}, which only "
         "you can write")
    return fallback


def dataset(name: str) -> Dataset:
    """The named corpus, or a ConfigError listing the known names."""
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r} (available: {', '.join(sorted(DATASETS))})")
    return DATASETS[name]


def _is_valid(path: Path, ds: Dataset) -> bool:
    size, digest = ds.corpus_check
    try:
        return path.stat().st_size == size and digest.of_file(path) == digest.hexdigest
    except OSError:
        return False


def _one_line(reason: object) -> str:
    return " ".join(str(reason).split()) or type(reason).__name__


def _mismatch(ds: Dataset, what: str, size: int, digest: Digest | None, n: int,
              got: str) -> DataError:
    """The one wording for a file that is not the one published."""
    expected = f"{size} bytes" + (f" with {digest.algorithm} {digest.hexdigest[:16]}..."
                                  if digest else "")
    if n == size:
        found = f"{digest.algorithm} {got[:16]}..." if digest else f"{n} bytes"
    else:
        found = f"more than {size} bytes" if n > size else f"{n} bytes"
    return DataError(
        f"{what} does not match its checksum (expected {expected}, got {found}); the file "
        "may have changed upstream; pass a local file with --input FILE"
    )


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
    if n != ds.size or (ds.sha256 and digest != ds.sha256):
        published = Digest("sha256", ds.sha256) if ds.sha256 else None
        raise _mismatch(ds, f"the download of {ds.name} from {ds.url}", ds.size, published,
                        n, digest)


def _unpack(ds: Dataset, archive: Archive, zip_path: Path, f: BinaryIO,
            progress: bool) -> None:
    """Write the member `archive` names into `f`, stopping at its published size."""
    what = f"{archive.member} in {ds.url}"
    h = hashlib.new(archive.digest.algorithm)
    n = 0
    try:
        with zipfile.ZipFile(zip_path) as zf:
            try:
                info = zf.getinfo(archive.member)
            except KeyError:
                raise DataError(f"{ds.url} does not hold {archive.member!r}; pass a local "
                                "file with --input FILE") from None
            if info.file_size != archive.size:
                raise DataError(f"{what} is {info.file_size} bytes, not the published "
                                f"{archive.size}; pass a local file with --input FILE")
            with zf.open(info) as src, \
                    progress_bar(archive.size, f"unpacking {ds.name}", enabled=progress) as bar:
                # Read at most one byte past the published size: a member that says it is
                # small but inflates further is cut off there, whatever its header claims.
                while block := src.read(min(_READ_BYTES, archive.size + 1 - n)):
                    n += len(block)
                    if n > archive.size:
                        break
                    h.update(block)
                    f.write(block)
                    bar.update(len(block))
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError) as e:
        # RuntimeError: an encrypted member; NotImplementedError: an unknown compression.
        raise DataError(f"the download of {ds.name} from {ds.url} is not a readable zip "
                        f"archive ({_one_line(e)}); pass a local file with --input FILE"
                        ) from None
    if n != archive.size or h.hexdigest() != archive.digest.hexdigest:
        raise _mismatch(ds, what, archive.size, archive.digest, n, h.hexdigest())


def _fetch_archive(ds: Dataset, archive: Archive, dest: Path, progress: bool,
                   timeout: float) -> None:
    """Download the zip next to `dest`, unpack its member into `dest`, drop the zip."""
    zip_path = temp_path_for(dest, "zip")
    try:
        with open(zip_path, "wb") as f:
            _download_verified(ds, f, progress, timeout)
        atomic_write(dest, lambda f: _unpack(ds, archive, zip_path, f, progress))
    finally:
        with contextlib.suppress(OSError):
            zip_path.unlink()


def fetch(name: str, *, progress: bool = False, timeout: float = 30) -> Path:
    """The path of a verified local copy of the named corpus, downloading it if needed."""
    ds = dataset(name)
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
        if ds.archive is None:
            atomic_write(dest, lambda f: _download_verified(ds, f, progress, timeout))
        else:
            _fetch_archive(ds, ds.archive, dest, progress, timeout)
    except OSError as e:
        raise DataError(f"cannot save the download as {dest}: {os_reason(e)}") from None
    return dest

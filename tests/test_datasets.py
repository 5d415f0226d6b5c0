"""Tests for chargpt.data.datasets, against a real HTTP server on 127.0.0.1 (never the internet).

Plain downloads (Tiny Shakespeare) and zip downloads (enwik8, text8) are served from files the
tests make; the table entries are replaced with the stand-ins' URLs and checksums.
"""

from __future__ import annotations

import hashlib
import socket
import struct
from pathlib import Path

import pytest
from conftest import register_dataset, zip_bytes

from chargpt.data.datasets import DATASETS, Archive, Dataset, Digest, cache_dir, fetch
from chargpt.errors import ConfigError, DataError

BODY = "Şu an sadece bir test: 東京 🙂\n".encode() * 500
BODY_SHA = hashlib.sha256(BODY).hexdigest()

# A stand-in for enwik8: multi-byte UTF-8, as the real one has.
CORPUS = "<page><title>Ünïcode 東京</title> text 🙂 and more text.</page>\n".encode() * 300
CORPUS_DIGEST = Digest("sha1", hashlib.sha1(CORPUS).hexdigest())
ZIP = zip_bytes({"enwik8": CORPUS})


def _register(monkeypatch: pytest.MonkeyPatch, url: str, sha: str = BODY_SHA,
              size: int = len(BODY)) -> None:
    register_dataset(monkeypatch, "shakespeare", url=url, sha256=sha, size=size,
                     filename="tiny.txt")


def _register_zip(monkeypatch: pytest.MonkeyPatch, url: str, archive: bytes = ZIP,
                  sha256: str | None = None, member: str = "enwik8",
                  member_size: int = len(CORPUS),
                  digest: Digest = CORPUS_DIGEST) -> None:
    register_dataset(monkeypatch, "enwik8", url=url, size=len(archive), filename="enwik8",
                     sha256=hashlib.sha256(archive).hexdigest() if sha256 is None else sha256,
                     archive=Archive(member, member_size, digest), split=(1000, 1000))


def test_registry_entries() -> None:
    ds = DATASETS["shakespeare"]
    assert ds.size == 1115394 and ds.filename == "tinyshakespeare.txt"
    assert ds.sha256 == "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
    for name in ("enwik8", "text8"):
        ds = DATASETS[name]
        assert ds.url == f"http://mattmahoney.net/dc/{name}.zip"
        assert ds.archive is not None and ds.archive.member == name
        assert ds.archive.size == 100_000_000 and ds.split == (5_000_000, 5_000_000)
    assert DATASETS["enwik8"].size == 36_445_475
    assert DATASETS["text8"].size == 31_344_016
    assert DATASETS["enwik8"].archive.digest.algorithm == "sha1"
    assert DATASETS["text8"].archive.digest.algorithm == "md5"


def test_download_then_cache_hit(file_server, monkeypatch, dataset_cache: Path) -> None:
    url, handler = file_server
    handler.files["/corpus.txt"] = BODY
    _register(monkeypatch, f"{url}/corpus.txt")
    path = fetch("shakespeare", progress=True)
    assert path == dataset_cache / "tiny.txt"
    assert path.read_bytes() == BODY
    assert handler.requests == ["/corpus.txt"]
    assert fetch("shakespeare") == path
    assert handler.requests == ["/corpus.txt"]  # served from the cache
    assert [p.name for p in dataset_cache.iterdir()] == ["tiny.txt"]  # no temp files left


def test_corrupt_cache_is_downloaded_again(file_server, monkeypatch, dataset_cache) -> None:
    url, handler = file_server
    handler.files["/corpus.txt"] = BODY
    _register(monkeypatch, f"{url}/corpus.txt")
    dataset_cache.mkdir()
    (dataset_cache / "tiny.txt").write_bytes(BODY[:-1] + b"!")
    assert fetch("shakespeare").read_bytes() == BODY
    assert handler.requests == ["/corpus.txt"]


@pytest.mark.parametrize(("sha", "size", "got"), [
    ("0" * 64, len(BODY), "got sha256"),
    (BODY_SHA, len(BODY) + 5, f"got {len(BODY)} bytes"),
    (BODY_SHA, 100, "got more than 100 bytes"),
])
def test_checksum_mismatch(file_server, monkeypatch, dataset_cache: Path, sha: str, size: int,
                           got: str) -> None:
    url, handler = file_server
    handler.files["/corpus.txt"] = BODY
    _register(monkeypatch, f"{url}/corpus.txt", sha=sha, size=size)
    with pytest.raises(DataError, match="does not match its checksum") as info:
        fetch("shakespeare")
    msg = str(info.value)
    assert got in msg and "--input" in msg and "\n" not in msg
    assert list(dataset_cache.iterdir()) == []  # the bad download is deleted


def test_http_error(file_server, monkeypatch, dataset_cache) -> None:
    url, _ = file_server
    _register(monkeypatch, f"{url}/missing.txt")
    with pytest.raises(DataError, match="HTTP 404") as info:
        fetch("shakespeare")
    assert "--input FILE" in str(info.value)


def test_server_unreachable(monkeypatch, dataset_cache: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # nothing listens on `port` any more, so the connection is refused at once
    url = f"http://127.0.0.1:{port}/corpus.txt"
    _register(monkeypatch, url)
    with pytest.raises(DataError) as info:
        fetch("shakespeare", timeout=5)
    msg = str(info.value)
    assert msg.startswith(f"could not download shakespeare from {url} (")
    assert "pass a local file with --input FILE" in msg and "\n" not in msg
    assert not (dataset_cache / "tiny.txt").exists()


def test_unknown_name() -> None:
    with pytest.raises(ConfigError,
                       match="unknown dataset 'nope' .*available: enwik8, shakespeare, text8"):
        fetch("nope")


def test_cache_dir_resolution(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CHARGPT_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("CHARGPT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "chargpt"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "chargpt"


# --- zip downloads: enwik8 and text8 ---------------------------------------------------------


def test_zip_is_downloaded_unpacked_and_cached(file_server, monkeypatch, dataset_cache) -> None:
    url, handler = file_server
    handler.files["/enwik8.zip"] = ZIP
    _register_zip(monkeypatch, f"{url}/enwik8.zip")
    path = fetch("enwik8", progress=True)
    assert path == dataset_cache / "enwik8" and path.read_bytes() == CORPUS
    assert [p.name for p in dataset_cache.iterdir()] == ["enwik8"]  # the zip is not kept
    assert fetch("enwik8") == path
    assert handler.requests == ["/enwik8.zip"]  # the second fetch was served from the cache
    # a cached copy that no longer matches its digest is fetched again
    path.write_bytes(CORPUS[:-1] + b"?")
    assert fetch("enwik8").read_bytes() == CORPUS
    assert handler.requests == ["/enwik8.zip"] * 2


def test_zip_checked_by_size_alone_where_no_sha256_is_published(file_server, monkeypatch,
                                                                dataset_cache) -> None:
    url, handler = file_server
    handler.files["/text8.zip"] = ZIP
    _register_zip(monkeypatch, f"{url}/text8.zip", sha256="",
                  digest=Digest("md5", hashlib.md5(CORPUS).hexdigest()))
    assert fetch("enwik8").read_bytes() == CORPUS


@pytest.mark.parametrize(("change", "expected"), [
    ({"sha256": "0" * 64}, "the download of enwik8 from .* does not match its checksum .*got "
                           "sha256"),
    ({"digest": Digest("sha1", "0" * 40)}, "enwik8 in .* does not match its checksum "
                                           r"\(expected \d+ bytes with sha1 0000"),
    ({"member_size": len(CORPUS) - 1}, f"enwik8 in .* is {len(CORPUS)} bytes, not the "
                                       f"published {len(CORPUS) - 1}"),
    ({"member": "enwik9"}, "does not hold 'enwik9'"),
    ({"archive": b"PK not a zip at all" * 10}, "is not a readable zip archive"),
])
def test_zip_refused(file_server, monkeypatch, dataset_cache, change, expected) -> None:
    url, handler = file_server
    handler.files["/enwik8.zip"] = change.get("archive", ZIP)
    _register_zip(monkeypatch, f"{url}/enwik8.zip", **change)
    with pytest.raises(DataError, match=expected) as info:
        fetch("enwik8")
    assert "--input FILE" in str(info.value) and "\n" not in str(info.value)
    assert list(dataset_cache.iterdir()) == []  # neither the zip nor a partial corpus is left


def _lying_zip(content: bytes, declared: int) -> bytes:
    """A zip whose one member says it unpacks to `declared` bytes but inflates to more."""
    data = bytearray(zip_bytes({"enwik8": content}))
    # The uncompressed size is at offset 22 of the local header and 24 of the central one.
    for signature, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        at = data.index(signature)
        struct.pack_into("<I", data, at + offset, declared)
    return bytes(data)


def test_zip_bomb_is_cut_off(file_server, monkeypatch, dataset_cache: Path) -> None:
    url, handler = file_server
    bomb = _lying_zip(b"\0" * 5_000_000, declared=len(CORPUS))
    assert len(bomb) < 10_000  # five million bytes inflate from a few kilobytes
    handler.files["/enwik8.zip"] = bomb
    _register_zip(monkeypatch, f"{url}/enwik8.zip", archive=bomb)
    with pytest.raises(DataError, match="enwik8"):
        fetch("enwik8")
    assert list(dataset_cache.iterdir()) == []


def test_zip_slip_members_are_never_written(file_server, monkeypatch, tmp_path: Path,
                                            dataset_cache: Path) -> None:
    url, handler = file_server
    archive = zip_bytes({"../escaped.txt": b"out", "/tmp/absolute.txt": b"abs",
                         "enwik8": CORPUS})
    handler.files["/enwik8.zip"] = archive
    _register_zip(monkeypatch, f"{url}/enwik8.zip", archive=archive)
    assert fetch("enwik8").read_bytes() == CORPUS
    assert [p.name for p in dataset_cache.iterdir()] == ["enwik8"]
    assert not (tmp_path / "escaped.txt").exists()


def test_a_dataset_without_a_checksum_cannot_be_declared():
    with pytest.raises(ConfigError, match="dataset loose has no checksum"):
        Dataset(name="loose", url="http://127.0.0.1/x.txt", sha256="", size=1, filename="x.txt")

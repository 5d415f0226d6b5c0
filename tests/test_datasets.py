"""Tests for chargpt.datasets, against a real HTTP server on 127.0.0.1 (never the internet)."""

from __future__ import annotations

import hashlib
import http.server
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from chargpt.datasets import DATASETS, Dataset, cache_dir, fetch
from chargpt.errors import ConfigError, DataError

BODY = "Şu an sadece bir test: 東京 🙂\n".encode() * 500
BODY_SHA = hashlib.sha256(BODY).hexdigest()


class _Handler(http.server.BaseHTTPRequestHandler):
    body = BODY
    requests: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 - the name http.server dispatches to
        type(self).requests.append(self.path)
        if self.path != "/corpus.txt":
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: object) -> None:  # keep test output quiet
        pass


@pytest.fixture()
def server() -> Iterator[tuple[str, type[_Handler]]]:
    handler = type("Handler", (_Handler,), {"requests": [], "body": BODY})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", handler
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("CHARGPT_CACHE", str(cache))
    # A proxy from the environment would route the loopback requests elsewhere.
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy",
                "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "*")
    return cache


def _register(monkeypatch: pytest.MonkeyPatch, url: str, sha: str = BODY_SHA,
              size: int = len(BODY)) -> Dataset:
    ds = Dataset("shakespeare", url=url, sha256=sha, size=size, filename="tiny.txt")
    monkeypatch.setitem(DATASETS, "shakespeare", ds)
    return ds


def test_registry_entry() -> None:
    ds = DATASETS["shakespeare"]
    assert ds.size == 1115394 and ds.filename == "tinyshakespeare.txt"
    assert ds.sha256 == "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


def test_download_then_cache_hit(server, monkeypatch, isolated: Path) -> None:
    url, handler = server
    _register(monkeypatch, f"{url}/corpus.txt")
    path = fetch("shakespeare", progress=True)
    assert path == isolated / "tiny.txt"
    assert path.read_bytes() == BODY
    assert handler.requests == ["/corpus.txt"]
    assert fetch("shakespeare") == path
    assert handler.requests == ["/corpus.txt"]  # served from the cache
    assert [p.name for p in isolated.iterdir()] == ["tiny.txt"]  # no temp files left


def test_corrupt_cache_is_downloaded_again(server, monkeypatch, isolated: Path) -> None:
    url, handler = server
    _register(monkeypatch, f"{url}/corpus.txt")
    isolated.mkdir()
    (isolated / "tiny.txt").write_bytes(BODY[:-1] + b"!")
    assert fetch("shakespeare").read_bytes() == BODY
    assert handler.requests == ["/corpus.txt"]


@pytest.mark.parametrize(("sha", "size", "got"), [
    ("0" * 64, len(BODY), "got sha256"),
    (BODY_SHA, len(BODY) + 5, f"got {len(BODY)} bytes"),
    (BODY_SHA, 100, "got more than 100 bytes"),
])
def test_checksum_mismatch(server, monkeypatch, isolated: Path, sha: str, size: int,
                           got: str) -> None:
    url, _ = server
    _register(monkeypatch, f"{url}/corpus.txt", sha=sha, size=size)
    with pytest.raises(DataError, match="does not match its checksum") as info:
        fetch("shakespeare")
    msg = str(info.value)
    assert got in msg and "--input" in msg and "\n" not in msg
    assert list(isolated.iterdir()) == []  # the bad download is deleted


def test_http_error(server, monkeypatch) -> None:
    url, _ = server
    _register(monkeypatch, f"{url}/missing.txt")
    with pytest.raises(DataError, match="HTTP 404") as info:
        fetch("shakespeare")
    assert "--input FILE" in str(info.value)


def test_server_unreachable(monkeypatch, isolated: Path) -> None:
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
    assert not (isolated / "tiny.txt").exists()


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


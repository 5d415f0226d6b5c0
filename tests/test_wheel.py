"""The wheel, installed as a user installs it: built from this checkout offline (`pip wheel
--no-deps --no-build-isolation`), installed, not editable, into a fresh virtual environment of
this interpreter's base Python, and run as the installed `chargpt` command from a directory
outside the checkout. Nothing is downloaded: the environment's one other path is this
interpreter's site-packages (a .pth file), so torch, numpy and the rest resolve from there,
while chargpt itself can only come from the wheel. There the presets are listed and trained
from, the native loop is built from the installed C sources and samples what the torch step
samples, and `chargpt serve` serves the web page's static files."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import SERVE_CORPUS

ROOT = Path(__file__).resolve().parents[1]
# a minute or so; bounded so a hung step fails rather than stalls the suite
pytestmark = pytest.mark.timeout(300)


def check(*command: str | Path, **kwargs) -> subprocess.CompletedProcess:
    """Run `command`; its output, or a failure that shows it."""
    run = subprocess.run([str(c) for c in command], capture_output=True, text=True,
                         timeout=240, **kwargs)
    assert run.returncode == 0, f"{command}:\n{run.stdout[-2000:]}\n{run.stderr[-3000:]}"
    return run


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> tuple[Path, dict[str, str], Path]:
    """(the environment's bin directory, the environment variables to run it with, a working
    directory outside the checkout) once the wheel is installed there."""
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("building the wheel offline needs setuptools installed beside pytest "
                    "(pip install setuptools)")
    tmp = tmp_path_factory.mktemp("wheel")
    project = tmp / "project"  # a copy, so the build leaves nothing in the checkout
    project.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, project / name)
    shutil.copytree(ROOT / "src", project / "src",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "*.so"))
    check(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
          "--no-index", "-w", tmp / "dist", project)
    (wheel,) = (tmp / "dist").glob("chargpt-*.whl")
    check(sys.executable, "-m", "venv", "--without-pip", tmp / "venv")
    bin_dir = tmp / "venv" / ("Scripts" if os.name == "nt" else "bin")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(CHARGPT_CACHE=str(tmp / "cache"), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    purelib = check(bin_dir / "python", "-c",
                    "import sysconfig; print(sysconfig.get_paths()['purelib'])", env=env)
    parents = {sysconfig.get_paths()[k] for k in ("purelib", "platlib")}
    (Path(purelib.stdout.strip()) / "parent.pth").write_text("\n".join(sorted(parents)) + "\n")
    check(bin_dir / "python", "-m", "pip", "install", "-q", "--no-deps", "--no-index",
          "--force-reinstall", wheel, env=env)
    work = tmp / "work"
    work.mkdir()
    (work / "corpus.txt").write_text(SERVE_CORPUS)
    return bin_dir, env, work


def chargpt(venv, *args: str | Path) -> subprocess.CompletedProcess:
    bin_dir, env, work = venv
    return check(bin_dir / "chargpt", *args, env=env, cwd=work)


@pytest.fixture(scope="module")
def trained(venv) -> Path:
    """A few steps of a shipped preset, made tiny, trained by the installed command."""
    chargpt(venv, "train", "--preset", "classic-cpu", "--input", "corpus.txt", "--out", "run",
            "--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "32",
            "--batch-size", "4", "--max-steps", "6", "--eval-interval", "6", "--eval-iters",
            "2", "--log-interval", "3", "--warmup-steps", "2", "--sample-chars", "0")
    return venv[2] / "run"


def test_the_installed_package_is_the_wheel_and_its_dependencies_the_parents(venv):
    bin_dir, env, work = venv
    where = check(bin_dir / "python", "-c", "import chargpt, numpy, torch; "
                  "print(chargpt.__file__); print(numpy.__file__); print(torch.__file__)",
                  env=env, cwd=work).stdout.split()
    assert Path(where[0]).is_relative_to(bin_dir.parent) and not Path(where[0]).is_relative_to(
        ROOT)
    assert all(not Path(p).is_relative_to(bin_dir.parent) for p in where[1:])
    listed = chargpt(venv, "presets").stdout
    assert "classic-cpu" in listed and "fast-cpu" in listed


def test_the_installed_cli_trains_from_a_preset_and_samples_with_the_native_loop(venv, trained):
    args = ["sample", trained, "--prompt", "ROMEO:", "--max-new-tokens", "60", "--seed", "3"]
    native, eager = chargpt(venv, *args), chargpt(venv, *args, "--no-native")
    assert native.stdout.startswith("ROMEO:") and native.stdout == eager.stdout
    assert "warning" not in native.stderr, native.stderr
    libraries = list((Path(venv[1]["CHARGPT_CACHE"]) / "native").glob("native_decode-*.so"))
    assert len(libraries) == 1  # built from the installed sources, on first use
    bin_dir, env, work = venv
    loaded = check(bin_dir / "python", "-c", "from chargpt.generation.native import build; "
                   "print(build.library()._name); print(build.SOURCES[0])", env=env, cwd=work)
    library, source = map(Path, loaded.stdout.split())
    assert library == libraries[0] and source.is_relative_to(bin_dir.parent)


def test_the_installed_server_serves_the_page(venv, trained):
    if importlib.util.find_spec("starlette") is None or importlib.util.find_spec(
            "uvicorn") is None:
        pytest.skip("serving needs the serve extra: pip install 'chargpt[serve]'")
    bin_dir, env, work = venv
    proc = subprocess.Popen([str(bin_dir / "chargpt"), "serve", str(trained), "--port", "0",
                             "--log-level", "warning"], env=env, cwd=work, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        line = proc.stdout.readline()
        found = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        assert found, (line, proc.stderr.read() if proc.poll() is not None else "")
        base = f"http://127.0.0.1:{found.group(1)}"
        deadline = time.monotonic() + 30  # the socket is bound before the server listens
        while True:
            try:
                urllib.request.urlopen(base + "/health", timeout=2).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "no server"
                time.sleep(0.1)
        pages = {}
        for path in ("/", "/static/app.js", "/static/style.css"):
            with urllib.request.urlopen(base + path, timeout=30) as r:
                assert r.status == 200
                pages[path] = r.read().decode()
        assert "<html" in pages["/"].lower() and "/static/app.js" in pages["/"]
        assert pages["/static/app.js"].strip() and pages["/static/style.css"].strip()
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)

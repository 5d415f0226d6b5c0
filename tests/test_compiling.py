"""torch.compile runs only code the user's own processes wrote: inductor keeps its kernels,
libraries and precompiled headers in `torchinductor_USER` in the temporary directory, which
another user of the machine can create first and fill. chargpt makes that directory the user's
own (mode 0700) before a compile, and refuses to compile when someone else could write it: a
compile in a fresh process then writes and loads nothing there, and sampling with `compile=True`
decodes eagerly and says why."""

from __future__ import annotations

import getpass
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from test_sampling import gen, rope_gpt

import chargpt.generation.decode as decode_module
from chargpt.errors import ChargptError
from chargpt.generation.loop import generate
from chargpt.model import compiling

SRC = Path(__file__).resolve().parents[1] / "src"
pytestmark = pytest.mark.skipif(os.name != "posix", reason="ownership is checked on POSIX only")
NEEDS_CXX = pytest.mark.skipif(
    shutil.which("g++") is None and shutil.which("c++") is None,
    reason="torch.compile needs a C++ compiler on the CPU: install g++ or clang")


@pytest.fixture
def tmp(monkeypatch, tmp_path):
    """The temporary directory, for a process that has checked no kernel directory yet."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    compiling.kernel_dir.cache_clear()
    yield tmp_path
    compiling.kernel_dir.cache_clear()


def squat(tmp: Path) -> Path:
    """Inductor's directory in `tmp`, made first and left writable by anyone."""
    squatted = tmp / f"torchinductor_{getpass.getuser()}"
    squatted.mkdir(mode=0o777)
    os.chmod(squatted, 0o777)
    return squatted


def test_a_missing_kernel_directory_is_made_the_users_own(tmp):
    chosen = compiling.kernel_dir()
    assert chosen == tmp.resolve() / f"torchinductor_{getpass.getuser()}"
    assert chosen.stat().st_mode & 0o777 == 0o700


def test_a_squatted_kernel_directory_is_refused(tmp):
    squat(tmp)
    with pytest.raises(ChargptError, match="group- or world-writable.*set TMPDIR"):
        compiling.compiled(torch.nn.Linear(2, 2))


def test_sampling_with_a_squatted_kernel_directory_decodes_eagerly_and_says_why(
        tmp, monkeypatch, capsys):
    monkeypatch.setattr(decode_module, "_REPORTED", set())
    squatted = squat(tmp)
    model = rope_gpt()
    idx = torch.zeros(1, 1, dtype=torch.long)
    out = generate(model, idx, 20, temperature=1.0, generator=gen(0), compile=True,
                   native=False)
    eager = generate(model, idx, 20, temperature=1.0, generator=gen(0), native=False)
    assert torch.equal(out, eager)
    assert "torch.compile would load code from" in capsys.readouterr().err
    assert list(squatted.iterdir()) == []


PROGRAM = """
import torch
from chargpt.model.compiling import compiled
f = compiled(lambda x: torch.sin(x) * 2 + 1)
x = torch.randn(64)
assert torch.allclose(f(x), torch.sin(x) * 2 + 1)
"""


@NEEDS_CXX
@pytest.mark.parametrize("squatted", [False, True])
def test_a_compile_in_a_fresh_process_keeps_its_code_private(tmp_path, squatted):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHINDUCTOR")}
    env.update(TMPDIR=str(tmp_path), PYTHONPATH=str(SRC))
    default = squat(tmp_path) if squatted else tmp_path / f"torchinductor_{getpass.getuser()}"
    done = subprocess.run([sys.executable, "-c", PROGRAM], env=env, timeout=600,
                          capture_output=True, text=True)
    if squatted:
        assert done.returncode != 0 and "torch.compile would load code from" in done.stderr
        assert list(default.iterdir()) == []
    else:
        assert done.returncode == 0, done.stderr
        assert default.stat().st_mode & 0o777 == 0o700
        assert any(p.is_file() for p in default.rglob("*"))

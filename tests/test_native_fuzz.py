"""The native loop's entry point fuzzed from Python (native_fuzz.py): in this process against
the library sampling uses, and in a subprocess against a build with AddressSanitizer, where
any read or write outside the arrays the C code is handed ends the run with ASan's report.
Seeded (derandomised) and bounded in examples, so it runs in CI in well under a minute."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import native_fuzz
import pytest

from chargpt.generation.native import build

if not build.available()[0]:
    pytest.skip(f"no native decode loop here ({build.available()[1]}); install a C compiler "
                "(gcc or clang) to test it", allow_module_level=True)

SRC = Path(__file__).resolve().parents[1] / "src"


def test_every_call_works_or_is_one_clean_error():
    counts = native_fuzz.fuzz(600)
    assert counts["worked"] >= 150 and counts["refused"] >= 150, counts  # both were reached


def asan_runtime(tmp: Path) -> str:
    """The path of the compiler's AddressSanitizer runtime, after checking that the compiler
    builds a shared library with it; skips, saying why, where it cannot."""
    cc = build._compiler()
    found = subprocess.run([*cc, "-print-file-name=libasan.so"], capture_output=True,
                           text=True).stdout.strip()
    if not os.path.isabs(found) or not os.path.exists(found):
        pytest.skip(f"{build._name(cc)} has no AddressSanitizer runtime (libasan.so) here")
    (tmp / "probe.c").write_text("int probe(int *p) { return p[1]; }\n")
    probe = subprocess.run([*cc, "-fsanitize=address", "-shared", "-fPIC", "-o",
                            str(tmp / "probe.so"), str(tmp / "probe.c")], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"{build._name(cc)} does not build with -fsanitize=address")
    return found


@pytest.fixture(scope="module")
def sanitized(tmp_path_factory):
    """Runs native_fuzz.py in a subprocess that preloads ASan's runtime (Python is not built
    with it), against a library built with -fsanitize=address in a cache of its own."""
    tmp = tmp_path_factory.mktemp("asan")
    env = {**os.environ, "LD_PRELOAD": asan_runtime(tmp),
           # Python frees little at exit by design: leaks are not what this looks for
           "ASAN_OPTIONS": "detect_leaks=0",
           "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, native_fuzz.__file__, str(tmp / "cache"), *args],
                              env=env, capture_output=True, text=True, timeout=180)

    return run


def test_the_sanitizer_build_reports_a_read_past_an_array(sanitized):
    # the harness itself: a call that reads the row past the learned positions is caught
    run = sanitized("1", "overflow")
    assert run.returncode != 0
    assert "AddressSanitizer: heap-buffer-overflow" in run.stderr, run.stderr[-2000:]
    assert "in chargpt_fill" in run.stderr


def test_the_fuzz_makes_no_memory_error_under_address_sanitizer(sanitized):
    run = sanitized("400")
    assert run.returncode == 0 and "AddressSanitizer" not in run.stderr, run.stderr[-3000:]
    assert "library:" in run.stdout and "'worked'" in run.stdout

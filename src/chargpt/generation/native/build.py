"""Building the native decode loop's library with this machine's C compiler, and loading it.

`native_decode.c` (with `kernels.h`, and `structs.h` written from structs.py's table) is
compiled once per machine, about a second: with `$CC`, else cc, gcc or clang, tuned with
`-march=native` and OpenMP where the compiler has them, else with fewer flags. The library is
kept in chargpt's cache directory (`library_dir`) under a name that hashes the sources, the
compiler, its flags and the CPU, and loaded with ctypes; a library whose structs the compiler
laid out differently from ctypes is refused. `available()` says whether it could be had here,
and why not; `library()` raises `Unavailable` with that reason.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from ctypes import POINTER, c_int, c_int64
from pathlib import Path

from chargpt.generation.native.structs import Cache, Chunk, Config, Model, header, layout

__all__ = ["SOURCES", "Unavailable", "available", "compiled_layout", "library", "library_dir"]

HERE = Path(__file__).parent
SOURCES = (HERE / "native_decode.c", HERE / "kernels.h")  # the first one is compiled
HEADER = "structs.h"  # written from structs.py into the build directory
# flag sets tried in order: tuned for this CPU (gcc/clang on x86, Linux on ARM; Apple's clang on
# ARM), with OpenMP where the compiler has it (macOS's clang does not), then portable
_TUNINGS = (("-march=native", "-fopenmp"), ("-march=native",), ("-mcpu=native", "-fopenmp"),
            ("-mcpu=native",), ("-fopenmp",), ())
_BASE_FLAGS = ("-O3", "-fPIC", "-shared", "-fno-math-errno", "-ffp-contract=fast", "-std=c99")


class Unavailable(RuntimeError):
    """The native library cannot be built or loaded here; the message says why."""


def _compiler() -> str | None:
    """The C compiler: `$CC` (the usual way to choose one), else the first of cc, gcc, clang."""
    cc = os.environ.get("CC")
    if cc:
        return shutil.which(cc)
    return next((p for p in map(shutil.which, ("cc", "gcc", "clang")) if p), None)


def _cpu_identity() -> str:
    """What a library tuned with -march=native depends on: the machine and its CPU features
    (a home directory shared by different machines keeps one library per CPU)."""
    ident = [platform.machine(), platform.processor()]
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            ident += sorted({line for line in f if line.startswith(("flags", "Features",
                                                                    "model name"))})
    except OSError:
        pass
    return "\n".join(ident)


def _build(cc: str, out_dir: Path) -> Path:
    """Compile the sources into `out_dir` (kept across runs); returns the library's path."""
    sources = [p.read_bytes() for p in SOURCES] + [header().encode()]
    version = subprocess.run([cc, "--version"], capture_output=True, text=True,
                             timeout=60).stdout
    errors = []
    for tuning in _TUNINGS:
        flags = (*_BASE_FLAGS, *tuning)
        key = hashlib.sha256(b"\0".join(
            [*sources, cc.encode(), version.encode(), " ".join(flags).encode(),
             _cpu_identity().encode()])).hexdigest()[:20]
        path = out_dir / f"native_decode-{key}.so"
        if path.exists():
            return path
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
            (Path(tmp) / HEADER).write_bytes(sources[-1])
            built = Path(tmp) / "lib.so"
            run = subprocess.run([cc, *flags, "-I", tmp, "-o", str(built), str(SOURCES[0]),
                                  "-lm"], capture_output=True, text=True, timeout=300)
            if run.returncode == 0:
                os.replace(built, path)  # atomic: a concurrent build writes the same bytes
                return path
        errors.append((run.stderr.strip().splitlines() or ["no message"])[-1])
    raise Unavailable(f"{Path(cc).name} could not build it: {errors[-1]}")


def library_dir() -> Path:
    """Where built libraries are kept: `native/` in chargpt's cache directory."""
    from chargpt.data.datasets import cache_dir

    return cache_dir() / "native"


def compiled_layout(lib: ctypes.CDLL) -> list[int]:
    """structs.layout() as the library's compiler laid the structs out."""
    n = lib.chargpt_layout(None, 0)
    out = (c_int64 * n)()
    lib.chargpt_layout(out, n)
    return list(out)


def _declare(lib: ctypes.CDLL) -> None:
    """The library's functions' argument and result types."""
    lib.chargpt_layout.argtypes, lib.chargpt_layout.restype = [POINTER(c_int64), c_int64], c_int64
    lib.chargpt_work_size.argtypes, lib.chargpt_work_size.restype = [POINTER(Config)], c_int64
    lib.chargpt_fill.argtypes = [POINTER(Config), POINTER(Model), POINTER(Cache), POINTER(Chunk)]
    lib.chargpt_fill.restype = c_int


@functools.lru_cache(maxsize=1)
def _load() -> ctypes.CDLL | Unavailable:
    """The library, or why it cannot be had (kept, so a failed build is tried once)."""
    cc = _compiler()
    if cc is None:
        return Unavailable("no C compiler found (install one, or name it in $CC)")
    try:
        lib = ctypes.CDLL(str(_build(cc, library_dir())))
    except Unavailable as e:
        return e
    except (OSError, subprocess.SubprocessError) as e:
        return Unavailable(f"{type(e).__name__}: {e}")
    _declare(lib)
    if compiled_layout(lib) != layout():
        return Unavailable(f"{Path(cc).name} lays out the loop's structs differently from ctypes")
    return lib


def library() -> ctypes.CDLL:
    """The loaded native library, built on first use; `Unavailable` says why it cannot be."""
    lib = _load()
    if isinstance(lib, Unavailable):
        raise Unavailable(str(lib))
    return lib


def available() -> tuple[bool, str]:
    """Whether the native library can be used here, and if not, why."""
    try:
        library()
    except Unavailable as e:
        return False, str(e)
    return True, ""

"""Building the native decode loop's library with this machine's C compiler, and loading it.

`native_decode.c` (with `kernels.h`, and `structs.h` written from structs.py's table) is
compiled once per machine, about a second: with `$CC` (split as a shell would: `ccache gcc`),
else cc, gcc or clang, tuned with `-march=native` and OpenMP where the compiler has them, else
with fewer flags. The library is kept in a directory only the user can write (store.py) under a
name that hashes the sources, the compiler, its flags and the CPU, and loaded with ctypes once
its sha256 is the one recorded when it was built. A library that differs from its record, or
does not load, is built again, once; a flag set whose library fails to build or to load is
passed over for the next, and remembered, so no later process tries it again. One process
builds at a time, under the store's lock. A library whose structs the compiler laid out
differently from ctypes is refused. `available()` says whether the library could be had here,
and why not; `library()` raises `Unavailable` with that reason.
"""

from __future__ import annotations

import _ctypes
import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from ctypes import POINTER, c_int, c_int64
from pathlib import Path

from chargpt.generation.native.store import Store, library_dir
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


def _compiler() -> list[str] | None:
    """The C compiler's command: `$CC` (the usual way to choose one, split as a shell would),
    else the first of cc, gcc, clang."""
    try:
        words = shlex.split(os.environ.get("CC", ""))
    except ValueError:  # unbalanced quotes
        return None
    if words:
        found = shutil.which(words[0])
        return [found, *words[1:]] if found else None
    return next(([p] for p in map(shutil.which, ("cc", "gcc", "clang")) if p), None)


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


def _name(cc: list[str]) -> str:
    """The compiler as the user would name it: `gcc`, `ccache gcc`."""
    return " ".join([Path(cc[0]).name, *cc[1:]])


def _key(cc: list[str], version: str, flags: tuple[str, ...]) -> str:
    """What a library built with `flags` is named after: the sources, the compiler, its
    version, the flags and the CPU."""
    parts = [*(p.read_bytes() for p in SOURCES), header().encode(), "\0".join(cc).encode(),
             version.encode(), " ".join(flags).encode(), _cpu_identity().encode()]
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:20]


def _compile(cc: list[str], flags: tuple[str, ...], path: Path) -> str | None:
    """Compile the sources with `flags` into `path`, replaced whole; None, or the compiler's
    last line of complaint."""
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        (Path(tmp) / HEADER).write_text(header(), encoding="utf-8")
        built = Path(tmp) / "lib.so"
        run = subprocess.run([*cc, *flags, "-I", tmp, "-o", str(built), str(SOURCES[0]), "-lm"],
                             capture_output=True, text=True, timeout=300)
        if run.returncode == 0 and built.is_file():
            os.replace(built, path)
            return None
    if run.returncode < 0:  # killed (out of memory, say): no verdict on the flags
        raise subprocess.SubprocessError(f"{_name(cc)} was killed by signal {-run.returncode}")
    return (run.stderr.strip().splitlines() or ["no message"])[-1]


def _open(path: Path) -> tuple[ctypes.CDLL | None, str]:
    """The library at `path`, its functions declared; or None and why it does not load."""
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        return None, f"its library does not load ({' '.join(str(e).split())})"
    try:
        _declare(lib)
    except AttributeError as e:  # a function is missing: unloaded, so a rebuild is loaded anew
        _ctypes.dlclose(lib._handle)
        return None, f"its library lacks a function ({' '.join(str(e).split())})"
    return lib, ""


def _find_or_build(cc: list[str], store: Store) -> ctypes.CDLL:
    """The library of the first flag set that builds and loads here: the one kept in `store`
    if it is the one recorded and loads, else built again (once); flag sets that fail are
    remembered and passed over."""
    version = subprocess.run([*cc, "--version"], capture_output=True, text=True,
                             timeout=60).stdout
    errors = []
    for tuning in _TUNINGS:
        flags = (*_BASE_FLAGS, *tuning)
        key = _key(cc, version, flags)
        known = store.failed(key)
        if known is not None:
            errors.append(known)
            continue
        path = store.dir / f"native_decode-{key}.so"
        lib = _open(path)[0] if store.verified(path) else None
        if lib is not None:
            return lib
        why = _compile(cc, flags, path)
        if why is None:
            store.built(path)
            lib, why = _open(path)
            if lib is not None:
                return lib
        store.fail(key, why)
        errors.append(why)
    raise Unavailable(f"{_name(cc)} could not build it: {errors[-1]}")


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
        with Store(library_dir()) as store:
            lib = _find_or_build(cc, store)
    except Unavailable as e:
        return e
    except (OSError, subprocess.SubprocessError) as e:
        return Unavailable(f"{type(e).__name__}: {e}")
    if compiled_layout(lib) != layout():
        return Unavailable(f"{_name(cc)} lays out the loop's structs differently from ctypes")
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

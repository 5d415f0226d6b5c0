"""torch.compile, only where the code it generates is kept where only the user can write.

Inductor writes the C++ (or Triton) kernels it generates, the libraries built from them and
precompiled headers to `torchinductor_USER` in the temporary directory (or, for all but the
headers, to `$TORCHINDUCTOR_CACHE_DIR`), and loads them from there in later processes. On a
shared machine anyone can create that directory first and fill it with libraries of their own
for the user's process to load. Every torch.compile of chargpt (the training step with
`train.compile`, the compiled decode step) goes through `compiled`, which first makes that
directory the user's own, mode 0700, where it is missing, and refuses to compile where it
belongs to someone else or others can write it (`fileio.untrusted`). Off POSIX systems, whose
temporary directory is the user's own, it is not checked. `check_works` compiles a one-line
function first, so a machine without the compiler inductor needs (a C++ compiler on the CPU,
Triton on a GPU) is told so in one line before training starts, not by a traceback at step 1.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import torch
from torch._inductor.runtime.cache_dir_utils import default_cache_dir

from chargpt.errors import ChargptError
from chargpt.fileio import private_dir

__all__ = ["check_works", "compiled", "kernel_dir"]


def compiled(module: Any, device_type: str | None = None, **options: Any) -> Any:
    """`torch.compile(module, **options)`, after `kernel_dir()` has checked where its code is
    kept; a ChargptError when someone else could write there, or (given `device_type`) when
    torch.compile cannot work on that device (`check_works`)."""
    kernel_dir()
    if device_type is not None:
        check_works(device_type)
    return torch.compile(module, **options)


@functools.cache
def kernel_dir() -> Path | None:
    """Inductor's own directory in the temporary directory (which it uses whatever
    `$TORCHINDUCTOR_CACHE_DIR` says), made private where missing; a ChargptError when it is
    not the user's alone. None off POSIX systems, where it is not checked."""
    if os.name != "posix":
        return None
    default = Path(default_cache_dir())
    real, why = private_dir(default, default)
    if why is not None:
        raise ChargptError(f"torch.compile would load code from {default}, but {why}: remove "
                           "it, or set TMPDIR to a directory of your own")
    return real


@functools.cache
def check_works(device_type: str) -> None:
    """Compile and run a one-line function on `device_type`; a ChargptError when torch.compile
    cannot (no C++ compiler on the CPU, no Triton on a GPU). Seconds the first time, most of
    them inductor's own start-up, which the model's compile would pay anyway."""
    try:
        compiled(lambda x: x * 2 + 1)(torch.ones(2, device=device_type))
    except ChargptError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever inductor raises, say it in one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        need = "a C++ compiler (g++ or clang; or name it in $CXX)" if device_type == "cpu" \
            else "Triton (pip install triton)"
        raise ChargptError(f"--compile: torch.compile does not work here ({first[:200]}); "
                           f"install {need}, or train without --compile") from None

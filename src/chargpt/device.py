"""Device and precision: which device a run or a loaded model uses, and which autocast dtype.

Training and inference both ask here, so loading a model for sampling or serving does not pull
in the training stack. `pick_device("auto")` prefers CUDA, then Apple's MPS, then the CPU and
refuses an explicit device that is not there; `precision` decides the precision a new run trains
in, `autocast_dtype` turns a precision name into the dtype for `torch.autocast` (None meaning
plain float32), and `autocast_context` enters it; `fast_bfloat16` says whether bfloat16 matmuls
beat float32 ones on a device.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import torch

from chargpt.errors import ConfigError

__all__ = ["allow_tf32", "autocast_context", "autocast_dtype", "fast_bfloat16", "pick_device",
           "precision"]


def pick_device(name: str) -> torch.device:
    """The torch device for a config or flag value: 'auto', 'cpu', 'cuda', 'cuda:1', 'mps'."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {name!r} requested but MPS is not available")
    return device


def precision(device: torch.device, name: str) -> str:
    """The precision a new run on `device` trains in, for the config's `name`: 'auto' becomes
    bfloat16 wherever its matmuls are the fast ones (`fast_bfloat16`: GPUs, and CPUs with
    bfloat16 instructions, where a default training step takes 1.2x less time, 2026-12-05,
    docs/fast.md), else float32. A run records the name this returns, so its resume trains in
    the same precision on any machine and under any later rule."""
    if name != "auto":
        return name
    fast = device.type in ("cuda", "cpu") and fast_bfloat16(device)
    return "bfloat16" if fast else "float32"


def autocast_dtype(device: torch.device, name: str) -> torch.dtype | None:
    """The autocast dtype for precision `name` on `device`, or None for plain float32. 'auto'
    here is only ever a run recorded before runs recorded their precision (`precision`), and
    keeps the meaning it had then: bfloat16 on CUDA GPUs that support it, else float32."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None
    return {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def autocast_context(device: torch.device, dtype: torch.dtype | None) -> Any:
    """`torch.autocast` for `dtype` on `device`, or a no-op context for float32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def allow_tf32(device: torch.device) -> None:
    """Let float32 matmuls use TF32 tensor cores on CUDA (a training speed-up; no-op elsewhere)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def fast_bfloat16(device: torch.device) -> bool:
    """Whether bfloat16 matmuls run faster than float32 ones on `device`: CUDA GPUs that
    support bfloat16, and CPUs with bfloat16 dot-product instructions (x86's AVX512-BF16 or
    AMX, ARM's BF16), where a matmul does twice the multiply-adds per instruction. Elsewhere
    the CPU converts every element and bfloat16 is slower than float32."""
    if device.type == "cuda":  # not the emulation on older GPUs, slower than float32
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return device.type == "cpu" and _cpu_has_bfloat16_dot()


@functools.cache
def _cpu_has_bfloat16_dot() -> bool:
    capabilities = getattr(torch.cpu, "get_capabilities", None)  # torch >= 2.11
    if capabilities is None:
        return False
    have = capabilities()
    return any(have.get(name, False) for name in ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16"))

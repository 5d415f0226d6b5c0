"""Device and precision: which device a run or a loaded model uses, and which autocast dtype.

Training and inference both ask here, so loading a model for sampling or serving does not pull
in the training stack. `pick_device("auto")` prefers CUDA, then Apple's MPS, then the CPU and
refuses an explicit device that is not there; `autocast_dtype` turns the config's precision
name into the dtype for `torch.autocast` (None meaning plain float32), and `autocast_context`
enters it.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from chargpt.errors import ConfigError

__all__ = ["allow_tf32", "autocast_context", "autocast_dtype", "pick_device"]


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


def autocast_dtype(device: torch.device, name: str) -> torch.dtype | None:
    """The autocast dtype for precision `name` on `device`, or None for plain float32."""
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

"""Whether a new run's model can be trained here, asked before anything is built or written.

A run is only worth its hours if every loader will open it afterwards: `check_trainable` refuses
a model past the bounds every loader checks (runs/safety.BOUNDS), worded for the flag or config
value that asked for it. `check_memory` refuses a model whose weights, gradients, optimizer state
and activations (model/flops.estimate) need more memory than the machine has (the same figure
the loaders use, safety.available_memory), before a minute is spent allocating it. Both are
estimates: `allocation_errors` turns an allocation that fails anyway into one line.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from chargpt.config.schema import Config, ModelConfig
from chargpt.errors import ConfigError, TrainingError
from chargpt.model.flops import estimate
from chargpt.runs.safety import LOAD_FACTOR, TRAIN_FACTOR, beyond_bounds, memory_shortfall

__all__ = ["allocation_errors", "check_memory", "check_trainable"]


def check_trainable(model: ModelConfig) -> None:
    """Refuse a model no loader would open (sample, eval, resume all check the same bounds)."""
    beyond = beyond_bounds(model)
    if beyond is not None:
        name, value, limit = beyond
        raise ConfigError(f"model.{name} is {value:,}, more than chargpt loads (at most "
                          f"{limit:,}): the run could never be sampled or resumed; choose a "
                          f"smaller --{name.replace('_', '-')}")


def check_memory(cfg: Config, device: torch.device) -> None:
    """Refuse a model that needs more memory to train than the machine has. On the CPU that is
    weights, gradients, optimizer state and activations; elsewhere the model is still built on
    the CPU first, so its weights must fit there."""
    on_cpu = device.type == "cpu"
    activations = estimate(cfg).activation_bytes if on_cpu else 0
    lacking = memory_shortfall(cfg.model, TRAIN_FACTOR if on_cpu else LOAD_FACTOR, activations)
    if lacking is not None:
        what = "train" if on_cpu else "build"
        raise ConfigError(f"cannot {what} {lacking}; choose a smaller model (or --batch-size)")


def out_of_memory(error: BaseException) -> bool:
    """Whether `error` is an allocation that failed (torch's CPU allocator raises a plain
    RuntimeError that says so; CUDA's is torch.OutOfMemoryError)."""
    if isinstance(error, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and "alloc" in text and "memory" in text


@contextmanager
def allocation_errors(what: str, after: Callable[[], str] | None = None) -> Iterator[None]:
    """Turn a failed allocation while `what` into one line (and `after()`: what is left and how
    to go on); any other error passes through."""
    try:
        yield
    except (RuntimeError, MemoryError) as e:
        if not out_of_memory(e):
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        tail = f"; {after()}" if after is not None else ""
        raise TrainingError(f"out of memory {what} ({first}); a smaller model or --batch-size "
                            f"needs less{tail}") from None

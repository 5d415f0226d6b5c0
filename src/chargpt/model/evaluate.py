"""Loss measurement: a quick estimate during training and an exact pass over a whole text.

`estimate_loss` averages the loss over a fixed number of random batches per split, drawn from
a sampler with its own seed so that every evaluation sees the same batches (curves are
comparable from one eval to the next) and training randomness is never consumed. `evaluate_tokens`
scores every token of a text exactly once with a sliding window, each prediction made with at
least half a context of history, which is the number to report for a trained model.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from chargpt import faults
from chargpt.data.batches import BatchSampler
from chargpt.distributed import DistEnv, all_reduce_sum
from chargpt.errors import ConfigError, DataError
from chargpt.model.lm import eval_mode


@torch.no_grad()
def estimate_loss(
    model: Callable[..., Any],
    splits: dict[str, np.ndarray],
    *,
    block_size: int,
    batch_size: int,
    iters: int,
    seed: int,
    device: torch.device | str = "cpu",
    autocast: Callable[[], Any] = contextlib.nullcontext,
    env: DistEnv | None = None,
) -> dict[str, float]:
    """Mean loss over `iters` random batches of each split, always the same batches for a seed.

    Under DDP the ranks share the `iters` draws (rank r takes draws r, r + world, ...), so the
    mean over all ranks is the single-process number."""
    env = env or DistEnv()
    out: dict[str, float] = {}
    calls = -(-iters // env.world_size)  # ceil: every rank makes the same number of calls
    with eval_mode(model):  # type: ignore[arg-type]
        for name, tokens in splits.items():
            sampler = BatchSampler(tokens, block_size, batch_size, seed=seed, device=device,
                                   rank=env.rank, world_size=env.world_size)
            total = torch.zeros(2, device=device)  # (sum of losses, number of batches)
            for call in range(calls):
                x, y = sampler.next_batch()
                if call * env.world_size + env.rank < iters:
                    with autocast():
                        _, loss = model(x, y)
                    total[0] += loss.float()
                    total[1] += 1
                faults.active().reached("evaluate")
            all_reduce_sum(total, env)
            out[name] = (total[0] / total[1]).item()
    return out


def window_plan(n_tokens: int, block_size: int, tiled: bool = False) -> list[tuple[int, int]]:
    """(start, first scored position) for windows that score each target exactly once.

    Windows overlap by half, so every prediction after the first half-window has at least
    half a block of history; `tiled` puts them back to back instead, so predictions see 1 to
    block_size characters, the mix a training batch (and the lecture's estimate) averages."""
    n_targets = n_tokens - 1
    T = min(block_size, n_targets)
    stride = T if tiled else max(1, T // 2)
    starts = list(range(0, n_targets - T + 1, stride))
    if starts[-1] + T < n_targets:
        starts.append(n_targets - T)
    plan, covered = [], 0
    for s in starts:
        plan.append((s, max(covered, s) - s))
        covered = s + T
    return plan


@torch.no_grad()
def evaluate_tokens(
    model: torch.nn.Module,
    tokens: np.ndarray,
    *,
    block_size: int,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    autocast: Callable[[], Any] = contextlib.nullcontext,
    tiled: bool = False,
) -> float:
    """Mean cross-entropy (nats per character) of predicting every token after the first;
    `tiled` scores back-to-back windows (see `window_plan`)."""
    if len(tokens) < 2:
        raise DataError("the text to evaluate needs at least 2 characters")
    # a batch of 0 or fewer windows would score nothing and report a loss of 0
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size!r}")
    T = min(block_size, len(tokens) - 1)
    plan = window_plan(len(tokens), block_size, tiled)
    offsets = np.arange(T + 1)
    total = torch.zeros((), dtype=torch.float64, device=device)
    with eval_mode(model):
        for i in range(0, len(plan), batch_size):
            chunk = plan[i : i + batch_size]
            starts = np.array([s for s, _ in chunk])
            windows = torch.from_numpy(tokens[starts[:, None] + offsets].astype(np.int64))
            windows = windows.to(device)
            x, y = windows[:, :-1], windows[:, 1:]  # (b, T)
            first = torch.tensor([f for _, f in chunk], device=device)
            mask = torch.arange(T, device=device)[None, :] >= first[:, None]  # (b, T)
            with autocast():
                logits, _ = model(x)
            nll = F.cross_entropy(
                logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), reduction="none"
            ).view_as(y)
            total += nll[mask].sum()  # stays on the device: one sync at the end
    # window_plan scores every target exactly once (test_evaluate checks both layouts)
    return total.item() / (len(tokens) - 1)


def bits_per_char(loss: float) -> float:
    return loss / math.log(2)

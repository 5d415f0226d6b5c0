"""Random training batches: reproducible, resumable (x, y) windows from a token array.

`BatchSampler` is the only part of the data path that needs torch: it turns windows of a
(typically memory-mapped) token array into int64 tensors on the training device. Its random
stream is seeded from the config's seed, shared by every DDP rank, and saved in checkpoints
(`state_dict`), so a resumed run draws exactly the batches it would have drawn.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from chargpt.errors import CheckpointError, ConfigError, DataError

__all__ = ["BatchSampler"]


def _stream_seed(seed: int) -> int:
    # SeedSequence turns the seed into a well-mixed 64-bit seed, so nearby seeds get unrelated
    # streams rather than shifted copies of one another. The second word is fixed at 0: all
    # ranks share one stream, and a saved run's stream must stay the one it was drawn from.
    ss = np.random.SeedSequence([seed % 2**64, 0])
    return int(ss.generate_state(1, dtype=np.uint64)[0])


class BatchSampler:
    """Random (x, y) windows of `block_size` tokens, y being x shifted by one.

    All ranks of a DDP job follow ONE stream of window draws and each keeps its own share: at
    every call the stream yields `world_size` groups of `batch_size` windows and rank r takes
    group r. So ranks never see the same draw, and N processes with accumulation A see exactly
    the batches one process with accumulation N x A sees, which makes distributed runs
    comparable with single-process ones. `order="random"` draws window starts uniformly with
    replacement; `order="epoch"` shuffles non-overlapping windows (at a random offset each
    epoch) and walks through them, so every token is seen once per epoch. Only the B x (T + 1)
    tokens of a batch are read from the (typically memory-mapped) token array. `state_dict`
    captures the stream so a resumed run draws exactly the batches it would have drawn.
    """

    ORDERS = ("random", "epoch")

    def __init__(
        self,
        tokens: np.ndarray,
        block_size: int,
        batch_size: int,
        seed: int,
        device: str | torch.device = "cpu",
        rank: int = 0,
        world_size: int = 1,
        order: str = "random",
    ) -> None:
        if block_size < 1:
            raise ConfigError(f"block_size must be >= 1, got {block_size}")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"rank must be in [0, {world_size}), got {rank}")
        if order not in self.ORDERS:
            raise ConfigError(f"order must be one of {', '.join(self.ORDERS)}, got {order!r}")
        if not isinstance(tokens, np.ndarray) or tokens.ndim != 1:
            raise TypeError("tokens must be a 1-D numpy array")
        if len(tokens) < block_size + 1:
            raise DataError(
                f"{len(tokens)} tokens are too few for block_size {block_size} (need at least "
                f"{block_size + 1}); use a smaller --block-size or more text"
            )
        self.tokens = tokens
        self.block_size = block_size
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.order = order
        self.device = torch.device(device)
        self.batches = 0
        self._n_starts = len(tokens) - block_size
        self._offsets = np.arange(block_size + 1, dtype=np.int64)
        self._generator = torch.Generator(device="cpu")
        self._generator.manual_seed(_stream_seed(seed))
        self._pin = self.device.type == "cuda" and torch.cuda.is_available()
        # epoch order: the permutation is rebuilt from the generator state saved at its start
        self.epoch = 0
        self._epoch_pos = 0
        self._epoch_state: torch.Tensor | None = None
        self._epoch_starts: np.ndarray | None = None

    def _new_epoch(self) -> np.ndarray:
        """Start an epoch: a random offset and a permutation of the windows; its starts."""
        self._epoch_state = self._generator.get_state()
        T = self.block_size
        offset = int(torch.randint(T, (1,), generator=self._generator)[0])
        n_windows = (len(self.tokens) - 1 - offset) // T
        if n_windows < 1:  # the text is shorter than two windows: no room for an offset
            offset, n_windows = 0, 1
        perm = torch.randperm(n_windows, generator=self._generator).numpy()
        self._epoch_starts = offset + perm.astype(np.int64) * T
        self._epoch_pos = 0
        return self._epoch_starts

    def _draw_epoch(self, n: int) -> np.ndarray:
        out = []
        while n > 0:
            starts = self._epoch_starts
            if starts is None or self._epoch_pos >= len(starts):
                if starts is not None:
                    self.epoch += 1
                starts = self._new_epoch()
            take = starts[self._epoch_pos : self._epoch_pos + n]
            self._epoch_pos += len(take)
            out.append(take)
            n -= len(take)
        return np.concatenate(out)

    def _draw_starts(self) -> np.ndarray:
        B, r = self.batch_size, self.rank
        if self.order == "epoch":
            return self._draw_epoch(B * self.world_size)[r * B : (r + 1) * B]
        # Every rank draws every group so all ranks' streams stay in step.
        starts = torch.randint(
            self._n_starts, (self.world_size, B), generator=self._generator, dtype=torch.int64
        )
        return starts[r].numpy()

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y), both int64 tensors of shape (batch_size, block_size) on the device."""
        starts = self._draw_starts()
        windows = np.asarray(self.tokens[starts[:, None] + self._offsets], dtype=np.int64)
        both = torch.from_numpy(windows)
        x = both[:, :-1].contiguous()
        y = both[:, 1:].contiguous()
        self.batches += 1
        if self.device.type == "cpu":
            return x, y
        if self._pin:
            x, y = x.pin_memory(), y.pin_memory()
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        """Tensors under "generator" and "epoch_generator"; everything else JSON-safe."""
        state: dict[str, Any] = {
            "generator": self._generator.get_state(),
            "batches": self.batches,
            "seed": self.seed,
            "order": self.order,
            "world_size": self.world_size,
            "block_size": self.block_size,
            "batch_size": self.batch_size,
        }
        if self.order == "epoch" and self._epoch_state is not None:
            state["epoch_generator"] = self._epoch_state
            state["epoch"] = self.epoch
            state["epoch_pos"] = self._epoch_pos
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        gen = state.get("generator") if isinstance(state, dict) else None
        if not isinstance(gen, torch.Tensor) or gen.dtype != torch.uint8:
            raise CheckpointError("the saved batch-sampler state has no valid generator state")
        for key in ("order", "world_size", "batch_size", "block_size"):
            if key in state and state[key] != getattr(self, key):
                raise CheckpointError(
                    f"the checkpoint's batch sampler used {key}={state[key]!r}, this run "
                    f"{getattr(self, key)!r}; resume with the same settings"
                )
        try:
            if self.order == "epoch" and "epoch_generator" in state:
                # Rebuild the current epoch's permutation, then continue where it stopped.
                self._generator.set_state(state["epoch_generator"].cpu())
                self._new_epoch()
                self.epoch = int(state["epoch"])
                self._epoch_pos = int(state["epoch_pos"])
            self._generator.set_state(gen.cpu())
        except (RuntimeError, ValueError, KeyError, AttributeError) as e:
            reason = " ".join(str(e).split())
            raise CheckpointError(f"the saved batch-sampler state is invalid ({reason})") from None
        with contextlib.suppress(TypeError, ValueError):
            self.batches = int(state.get("batches", 0))

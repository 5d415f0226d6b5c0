"""`KVCache`: the keys and values of earlier positions that a model's attention layers keep
while decoding, so each new token is run through the model alone; `CacheSlot`: where a
single-token step (`GPT.step`) writes its key and value in a cache and which slots it reads."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from chargpt.errors import ConfigError

__all__ = ["CacheSlot", "KVCache"]


class CacheSlot(NamedTuple):
    """A single-token step's place in a KV cache.

    The step writes its token's key and value at `slot` of each layer's `keys[layer]` and
    `values[layer]` (B, n_head, max_len, head_dim), in place, and its query reads the first
    `n_keys` slots, or, for static shapes (a compiled step), every slot with the additive
    `mask` (max_len,): 0 where a slot is written, -inf where not yet.
    """

    keys: list[Tensor]
    values: list[Tensor]
    slot: Tensor
    """(1,) long: the token's position modulo max_len. Only rotary caches roll, so with learned
    positions this is the token's position too (its position embedding's row)."""
    n_keys: int | None = None
    mask: Tensor | None = None


class KVCache:
    """Keys and values of earlier positions, per layer, so decoding needs no recomputation.

    One key and one value tensor (B, n_head, max_len, head_dim) per layer (`k[layer]`,
    `v[layer]`) are allocated once; separate tensors, so a compiled decode step may write them
    in place. During a forward each attention layer calls `update` with its new keys and
    values, which are written at the current position, and gets back views of everything
    cached so far; after the last layer the model calls `advance(T)` once, moving the position
    on by the T new tokens.

    A `rolling` cache (for rotary models, whose keys carry only relative position) never
    overflows: once full, each single new token overwrites the oldest slot (a ring buffer) and
    the whole buffer is returned. The order of the slots does not matter to the one query of
    that step, which may see every cached key. The result is exactly sliding-window attention
    of width `max_len` in every layer. For a one-layer model that equals recomputing the last
    `max_len` tokens from scratch; with more layers it does not, because a deeper layer's
    cached key was computed while its token could still see tokens that have since rolled out
    (the model's receptive field reaches back up to n_layer * max_len tokens).
    """

    def __init__(
        self,
        n_layer: int,
        batch_size: int,
        n_head: int,
        head_dim: int,
        max_len: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        rolling: bool = False,
    ) -> None:
        shape = (batch_size, n_head, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.max_len = max_len
        self.rolling = rolling
        self.pos = 0

    @classmethod
    def for_model(
        cls,
        model: nn.Module,
        batch_size: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> KVCache:
        """A cache sized for `model` (a GPT): one slot per position up to its block_size,
        rolling when the model's positions are rotary.

        Device and dtype default to those of the model's parameters.
        """
        cfg = model.config
        param = next(model.parameters())
        return cls(
            cfg.n_layer,
            batch_size,
            cfg.n_head,
            cfg.head_dim,
            cfg.block_size,
            device=param.device if device is None else device,
            dtype=param.dtype if dtype is None else dtype,
            rolling=model.capabilities().rolling_cache,
        )

    @property
    def length(self) -> int:
        """Number of positions cached (at most max_len)."""
        return min(self.pos, self.max_len)

    @property
    def position(self) -> int:
        """Position id of the next token: tokens seen so far, rolled-out ones included."""
        return self.pos

    def update(self, layer_idx: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store new keys/values (B, nh, T, hs) after the cached ones and return all of them
        as views (B, nh, length + T, hs). Does not advance the position."""
        T = k.size(2)
        end = self.pos + T
        if end > self.max_len:
            if not (self.rolling and T == 1):
                raise ConfigError(f"KV cache overflow: {self.pos} cached + {T} new > "
                                 f"max_len {self.max_len}")
            slot = self.pos % self.max_len  # the oldest entry
            self.k[layer_idx][:, :, slot] = k[:, :, 0]
            self.v[layer_idx][:, :, slot] = v[:, :, 0]
            return self.k[layer_idx], self.v[layer_idx]
        self.k[layer_idx][:, :, self.pos : end] = k
        self.v[layer_idx][:, :, self.pos : end] = v
        return self.k[layer_idx][:, :, :end], self.v[layer_idx][:, :, :end]

    def advance(self, n: int) -> None:
        """Move past the `n` tokens every layer has just stored."""
        self.pos += n

    def reset(self) -> None:
        """Forget everything cached; the memory is kept for reuse."""
        self.pos = 0

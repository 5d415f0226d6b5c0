"""Sampling text from a trained model: the KV cache, next-token sampling and the decode loop.

`SamplingSettings` holds how to sample (temperature, top-k, top-p, seed, cache), validated
once. `generate_tokens` streams new tokens one step (one token per sequence) at a time and
`generate` collects them behind the prompt. Each step's logits come either from a full forward
over the recent context (recompute) or from a `KVCache` that holds earlier keys and values so
only the newest token is run through the model; `generate_tokens` documents exactly which
context the model sees in each case. `sample_next_token` turns logits into a token with
temperature, top-k and top-p (nucleus) filtering, drawing from an explicit `torch.Generator`
for repeatability. What a model supports is asked through `model.capabilities()` (lm.py).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import ConfigError
from .lm import eval_mode


class KVCache:
    """Keys and values of earlier positions, per layer, so decoding needs no recomputation.

    Tensors of shape (B, n_head, max_len, head_dim) are allocated once. During a forward each
    attention layer calls `update` with its new keys and values, which are written at the
    current position, and gets back views of everything cached so far; after the last layer
    the model calls `advance(T)` once, moving the position on by the T new tokens.

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
        shape = (n_layer, batch_size, n_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
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
                raise ValueError(f"KV cache overflow: {self.pos} cached + {T} new > "
                                 f"max_len {self.max_len}")
            slot = self.pos % self.max_len  # the oldest entry
            self.k[layer_idx, :, :, slot] = k[:, :, 0]
            self.v[layer_idx, :, :, slot] = v[:, :, 0]
            return self.k[layer_idx], self.v[layer_idx]
        self.k[layer_idx, :, :, self.pos : end] = k
        self.v[layer_idx, :, :, self.pos : end] = v
        return self.k[layer_idx, :, :, :end], self.v[layer_idx, :, :, :end]

    def advance(self, n: int) -> None:
        """Move past the `n` tokens every layer has just stored."""
        self.pos += n

    def reset(self) -> None:
        """Forget everything cached; the memory is kept for reuse."""
        self.pos = 0


@dataclass(frozen=True)
class SamplingSettings:
    """How to pick each next token; checked once, here, whoever builds it (CLI, server, API)."""

    temperature: float = 1.0
    """0 is greedy (argmax); otherwise the logits are divided by it."""
    top_k: int | None = None
    """Keep the k likeliest tokens (ties with the k-th too); None keeps all."""
    top_p: float | None = None
    """Keep the smallest set of likeliest tokens reaching this probability; None keeps all."""
    seed: int | None = None
    """Seed of the generator `generator()` makes; None draws a fresh random seed."""
    use_cache: bool = True
    """Decode with a KV cache (see `generate_tokens`) rather than recomputing the context."""

    def __post_init__(self) -> None:
        t, k, p = self.temperature, self.top_k, self.top_p
        if not (isinstance(t, int | float) and math.isfinite(t) and t >= 0):
            raise ConfigError(f"temperature must be >= 0, got {t}")
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ConfigError(f"top_k must be an integer >= 1, got {k!r}")
        if p is not None and not (0.0 < p <= 1.0):
            raise ConfigError(f"top_p must be in (0, 1], got {p}")

    @classmethod
    def of(cls, settings: SamplingSettings | None, **options: Any) -> SamplingSettings:
        """`settings`, or settings from keyword options; never both."""
        if settings is None:
            return cls(**options)
        if options:
            raise TypeError(f"give either settings or {', '.join(options)}, not both")
        return settings

    def generator(self, device: torch.device | str) -> torch.Generator:
        """A generator on `device` seeded with `seed` (or a fresh random seed)."""
        g = torch.Generator(device=device)
        g.manual_seed(self.seed if self.seed is not None else secrets.randbits(63))
        return g

    def with_seed(self, seed: int | None) -> SamplingSettings:
        return replace(self, seed=seed)


def sample_next_token(
    logits: Tensor,
    generator: torch.Generator | None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> Tensor:
    """Draw one token per row of `logits` (B, V); returns (B, 1) token ids.

    temperature 0 is greedy (argmax); otherwise logits are divided by it. top_k keeps the k
    largest logits (ties with the k-th are kept too); top_p keeps the smallest set of most
    likely tokens whose probabilities add up to at least top_p (never fewer than one). Both
    may be combined, top_k first. `generator` (None = torch's global one) makes draws
    repeatable; it must live on the logits' device.
    """
    return _sample(logits, generator, SamplingSettings(temperature, top_k, top_p))


def _sample(logits: Tensor, generator: torch.Generator | None, s: SamplingSettings) -> Tensor:
    """`sample_next_token` with settings checked already, for the decode loop."""
    if s.temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float()
    if s.temperature != 1.0:
        logits = logits / s.temperature
    if s.top_k is not None and s.top_k < logits.size(-1):
        kth = torch.topk(logits, s.top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p is not None and s.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
        probs = F.softmax(sorted_logits, dim=-1)
        # A token is dropped when the tokens ranked above it already reach top_p; the first
        # token has nothing above it, so at least one always survives.
        drop = (probs.cumsum(dim=-1) - probs) >= s.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


def generate_tokens(
    model: nn.Module,
    idx: Tensor,
    max_new_tokens: int,
    settings: SamplingSettings | None = None,
    *,
    generator: torch.Generator | None = None,
    **options: Any,
) -> Iterator[Tensor]:
    """Yield `max_new_tokens` new tokens, each a (B,) tensor, as soon as it is sampled.

    How to sample is `settings`, or the same fields as keywords (`temperature=`, `top_k=`,
    `top_p=`, `use_cache=`). Draws come from `generator`, else from a generator seeded with
    the settings' seed, else from torch's global generator.

    `idx` (B, T0) is the prompt, T0 >= 1; only its last `block_size` tokens are used. What the
    model sees when predicting each token:

    * `use_cache=False` (recompute): a full forward over the last `block_size` tokens every
      step, as in nanoGPT; once the text is long enough the context is exactly `block_size`.
    * `use_cache=True` with a rotary GPT (`pos_emb = "rope"`): the prompt is run once to fill
      a rolling `KVCache`, then each step feeds only the newest token; a full cache drops its
      oldest entry, so every query attends to exactly the last `block_size` tokens and no
      step is ever more than one token of work. Identical to the recompute path while prompt
      + new tokens fit in `block_size`; beyond that each layer attends to the same window as
      recomputation, but deeper layers' keys also carry what their tokens saw earlier
      (sliding-window attention, see `KVCache`), so tokens can differ from recomputation.
    * `use_cache=True` with another GPT: the prompt fills a `KVCache`, then each step feeds
      only the newest token. Absolute positions cannot slide by one, so a full cache is
      refilled from the last `block_size // 2` tokens (at least one) and decoding continues.
      Tokens are identical to the recompute path while prompt + new tokens fit in
      `block_size`; beyond that the model sees between `block_size // 2` and `block_size`
      characters of context instead of exactly `block_size`, for far less compute.
    * `use_cache=True` with a model that has no cache (the bigram): only the tokens its
      context covers are fed (for the bigram, the last one: its whole context).

    Tokens are computed a few at a time (1, 2, 4, ... up to 32) under one inference-mode
    block, then yielded one by one, so the per-token cost stays low while the first token
    still arrives at once. The model is put in eval mode while the iterator runs and its
    training mode is restored when the iterator is exhausted or closed. Arguments are checked
    here, before the first token is drawn (`ConfigError`).
    """
    settings = SamplingSettings.of(settings, **options)
    if idx.dim() != 2:
        shape = tuple(idx.shape)
        raise ConfigError(f"the prompt must be a (batch, time) tensor, got shape {shape}")
    if idx.size(1) < 1:
        raise ConfigError("the prompt is empty; give at least one character to start from")
    if max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if generator is None and settings.seed is not None:
        generator = settings.generator(idx.device)
    return _decode(model, idx, max_new_tokens, settings, generator)


MAX_CHUNK = 32  # most tokens computed before the first of them is yielded


def _decode(model: nn.Module, idx: Tensor, max_new_tokens: int, settings: SamplingSettings,
            generator: torch.Generator | None) -> Iterator[Tensor]:
    with eval_mode(model):
        # One buffer (B, prompt + new) for the whole text, so every context is a view.
        prompt = idx[:, -model.config.block_size :]
        n0 = prompt.size(1)
        seq = torch.empty(idx.size(0), n0 + max_new_tokens, dtype=torch.long, device=idx.device)
        seq[:, :n0] = prompt
        step = _stepper(model, seq, n0, settings, generator)
        n, chunk = n0, 1
        while n < n0 + max_new_tokens:
            end = min(n + chunk, n0 + max_new_tokens)
            # inference mode only around the model, never across a yield into caller code
            with torch.inference_mode():
                for t in range(n, end):
                    step(t)
            for t in range(n, end):
                yield seq[:, t].clone()  # a normal tensor, usable outside inference mode
            n, chunk = end, min(2 * chunk, MAX_CHUNK)


def _stepper(model: nn.Module, seq: Tensor, n0: int, settings: SamplingSettings,
             generator: torch.Generator | None) -> Callable[[int], None]:
    """A function step(t) that samples seq[:, t] from seq[:, :t]; one per decode strategy."""
    block_size = model.config.block_size
    caps = model.capabilities()

    def emit(t: int, logits: Tensor) -> None:
        """Sample seq[:, t] from next-token logits (B, V)."""
        seq[:, t : t + 1] = _sample(logits, generator, settings)

    if not settings.use_cache:
        def recompute(t: int) -> None:
            emit(t, model(seq[:, max(0, t - block_size) : t])[0][:, -1])
        return recompute
    if not caps.kv_cache:
        def context_only(t: int) -> None:
            emit(t, model(seq[:, max(0, t - caps.context) : t])[0][:, -1])
        return context_only

    with torch.inference_mode():
        cache = KVCache.for_model(model, seq.size(0))
    keep = max(1, block_size // 2)  # tokens kept when a full, non-rolling cache is refilled

    def cached(t: int) -> None:
        if t == n0:
            emit(t, model(seq[:, :t], kv_cache=cache)[0][:, -1])  # prefill the prompt
        elif cache.pos == block_size and not cache.rolling:
            cache.reset()
            emit(t, model(seq[:, t - keep : t], kv_cache=cache)[0][:, -1])
        elif caps.fast_decode:
            emit(t, model.decode_step(seq[:, t - 1 : t], cache))
        else:
            emit(t, model(seq[:, t - 1 : t], kv_cache=cache)[0][:, -1])
    return cached


def generate(
    model: nn.Module,
    idx: Tensor,
    max_new_tokens: int,
    settings: SamplingSettings | None = None,
    *,
    generator: torch.Generator | None = None,
    **options: Any,
) -> Tensor:
    """The prompt `idx` (B, T0), uncropped, followed by `max_new_tokens` sampled tokens.

    Takes the same arguments as `generate_tokens`."""
    new = list(generate_tokens(model, idx, max_new_tokens, settings, generator=generator,
                               **options))
    if not new:
        return idx.clone()
    return torch.cat([idx, torch.stack(new, dim=1)], dim=1)

"""The generation loop: new tokens from a model and a prompt, streamed or collected.

`generate_tokens` streams new tokens one step (one token per sequence) at a time and
`generate` collects them behind the prompt. Each step's logits come from one of three
strategies, chosen from the settings and `model.capabilities()` (lm.py): `Recompute`, a full
forward over the recent context; `Cached`, a `KVCache` that holds earlier keys and values so
that only the newest token is run through the model's forward; and `FastCached`, the same
cache with each token one `GPT.step` (decode.py: eager, compiled or the native C loop).
`generate_tokens` documents exactly which context the model sees in each case. Each token is
drawn by `SamplingSettings.pick` with noise from draw.py, a chunk of steps at a time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from chargpt.errors import ConfigError
from chargpt.generation.decode import Decoder, report_once
from chargpt.generation.draw import draw_noise
from chargpt.generation.settings import SamplingSettings
from chargpt.model.kv_cache import KVCache
from chargpt.model.lm import eval_mode

__all__ = ["MAX_NEW_TOKENS", "MAX_SEQUENCES", "Cached", "FastCached", "Recompute",
           "check_lengths", "generate", "generate_tokens"]

# The most new tokens one call generates per sequence, and the most sequences decoded at once.
# Memory grows with both: the text is one buffer of 8 bytes per token and sequence, a rotary
# model's decoder keeps a rotation row per position reached (16 bytes per head dimension), and
# each sequence has its own KV cache. A million characters is a long novel and minutes of
# decoding on a CPU; more is asked for by a slip of the keyboard, not by a reader.
MAX_NEW_TOKENS = 1_000_000
MAX_SEQUENCES = 1024


def check_lengths(batch: int, max_new_tokens: int) -> None:
    """Refuse `batch` sequences of `max_new_tokens` new tokens outside the bounds above, before
    anything is allocated (callers with a batch of prompts check before building it)."""
    if not 0 <= max_new_tokens <= MAX_NEW_TOKENS:
        raise ConfigError(f"max_new_tokens must be from 0 to {MAX_NEW_TOKENS:,}, "
                          f"got {max_new_tokens:,}")
    if not 1 <= batch <= MAX_SEQUENCES:
        raise ConfigError(f"num_samples must be from 1 to {MAX_SEQUENCES:,} (sequences "
                          f"decoded at once), got {batch:,}")


def generate_tokens(
    model: nn.Module,
    idx: Tensor,
    max_new_tokens: int,
    settings: SamplingSettings | None = None,
    *,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    **options: Any,
) -> Iterator[Tensor]:
    """Yield `max_new_tokens` new tokens, each a (B,) tensor, as soon as it is sampled.

    How to sample is `settings`, or the same fields as keywords (`temperature=`, `top_k=`,
    `top_p=`, `use_cache=`, `compile=`). Draws come from `generator`, else from a generator
    seeded with the settings' seed, else from torch's global generator; a sequence of B
    generators gives row b its own, so each row draws what it would draw alone.

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

    Single-token steps of a GPT go through decode.py (compiled with `compile=True`).
    Tokens are computed a few at a time (1, 2, 4, ... up to 32) under one inference-mode
    block, then yielded one by one, so the per-token cost stays low while the first token
    still arrives at once. The model is put in eval mode while the iterator runs and its
    training mode is restored when the iterator is exhausted or closed. Arguments are checked
    here, before the first token is drawn (`ConfigError`).
    """
    return _tokens(_chunks(model, idx, max_new_tokens, settings, generator, options))


def _chunks(model: nn.Module, idx: Tensor, max_new_tokens: int,
            settings: SamplingSettings | None,
            generator: torch.Generator | Sequence[torch.Generator] | None,
            options: dict[str, Any]) -> Iterator[Tensor]:
    """`generate_tokens`' arguments checked, then `_decode`: the new tokens in chunks."""
    settings = SamplingSettings.of(settings, **options)
    if idx.dim() != 2:
        shape = tuple(idx.shape)
        raise ConfigError(f"the prompt must be a (batch, time) tensor, got shape {shape}")
    if idx.size(1) < 1:
        raise ConfigError("the prompt is empty; give at least one character to start from")
    check_lengths(idx.size(0), max_new_tokens)
    if not (generator is None or isinstance(generator, torch.Generator)
            or len(generator) == idx.size(0)):
        raise ConfigError(f"give one generator per sequence: {len(generator)} generators "
                          f"for a batch of {idx.size(0)}")
    if generator is None and settings.seed is not None:
        generator = settings.generator(idx.device)
    return _decode(model, idx, max_new_tokens, settings, generator)


def _tokens(chunks: Iterator[Tensor]) -> Iterator[Tensor]:
    """The tokens of `_decode`'s chunks one at a time, each a normal (B,) tensor; closing this
    closes the decoding (which restores the model's training mode)."""
    with contextlib.closing(chunks):
        for chunk in chunks:
            for t in range(chunk.size(1)):
                yield chunk[:, t].clone()  # a normal tensor, usable outside inference mode


MAX_CHUNK = 32  # most tokens computed before the first of them is yielded


def _decode(model: nn.Module, idx: Tensor, max_new_tokens: int, settings: SamplingSettings,
            generator: torch.Generator | Sequence[torch.Generator] | None) -> Iterator[Tensor]:
    with eval_mode(model):
        # One buffer (B, prompt + new) for the whole text, so every context is a view.
        prompt = idx[:, -model.config.block_size :]
        n0 = prompt.size(1)
        B = idx.size(0)
        seq = torch.empty(B, n0 + max_new_tokens, dtype=torch.long, device=idx.device)
        seq[:, :n0] = prompt
        with torch.inference_mode():
            strategy = choose_strategy(model, seq, n0, settings)
        n, chunk = n0, 1
        while n < n0 + max_new_tokens:
            end = min(n + chunk, n0 + max_new_tokens)
            # inference mode only around the model, never across a yield into caller code
            with torch.inference_mode():
                # the noise of the whole chunk in one draw: the same numbers as step by step
                noise = (None if settings.temperature == 0 else
                         draw_noise(generator, (end - n, B, model.config.vocab_size), idx.device))
                strategy.fill(n, end, noise)
            yield seq[:, n:end]  # (B, end - n), read before the next chunk is asked for
            n, chunk = end, min(2 * chunk, MAX_CHUNK)


def generate(
    model: nn.Module,
    idx: Tensor,
    max_new_tokens: int,
    settings: SamplingSettings | None = None,
    *,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    **options: Any,
) -> Tensor:
    """The prompt `idx` (B, T0), uncropped, followed by `max_new_tokens` sampled tokens.

    Takes the same arguments as `generate_tokens`."""
    # whole chunks, not token by token: no per-token tensors for a caller who wants them all
    new = [chunk.clone() for chunk in _chunks(model, idx, max_new_tokens, settings, generator,
                                               options)]
    return torch.cat([idx, *new], dim=1)


def _at(noise: Tensor | None, i: int) -> Tensor | None:
    """Step i's noise (B, V) of a chunk's `noise` (n, B, V); None when greedy."""
    return None if noise is None else noise[i]


class Recompute:
    """Each token from a full forward over at most the last `context` tokens: nanoGPT's loop
    (the whole block), or a model without a cache fed its context (the bigram: one token)."""

    def __init__(self, model: nn.Module, seq: Tensor, settings: SamplingSettings,
                 context: int) -> None:
        self.model, self.seq, self.settings, self.context = model, seq, settings, context

    def fill(self, n: int, end: int, noise: Tensor | None) -> None:
        """Sample seq[:, n:end], each token from those before it; `noise` (end - n, B, V)."""
        for t in range(n, end):
            logits = self.model(self.seq[:, max(0, t - self.context) : t])[0][:, -1]
            self.seq[:, t : t + 1] = self.settings.pick(logits, _at(noise, t - n))


class Cached:
    """The prompt run once through the model's forward to fill a `KVCache`, then each token
    fed alone. A full cache that cannot roll (learned positions) is refilled from the last
    half block of tokens; a rolling one drops its oldest entry (see `generate_tokens`)."""

    def __init__(self, model: nn.Module, seq: Tensor, n0: int,
                 settings: SamplingSettings) -> None:
        self.model, self.seq, self.n0, self.settings = model, seq, n0, settings
        self.cache = KVCache.for_model(model, seq.size(0))
        self.block_size = model.config.block_size
        self.keep = max(1, self.block_size // 2)  # tokens a refilled cache starts from

    def fill(self, n: int, end: int, noise: Tensor | None) -> None:
        """Sample seq[:, n:end], each token from the one before it and the cache; `noise`
        (end - n, B, V)."""
        t, cache = n, self.cache
        while t < end:
            if t == self.n0:
                self._forward(t, 0, _at(noise, t - n))  # the prompt
            elif cache.pos == self.block_size and not cache.rolling:
                cache.reset()
                self._forward(t, t - self.keep, _at(noise, t - n))
            else:
                t = self._steps(t, end, None if noise is None else noise[t - n :])
                continue
            t += 1

    def _forward(self, t: int, start: int, noise: Tensor | None) -> None:
        """Sample seq[:, t] from a cached forward over seq[:, start:t]."""
        logits = self.model(self.seq[:, start:t], kv_cache=self.cache)[0][:, -1]
        self.seq[:, t : t + 1] = self.settings.pick(logits, noise)

    def _steps(self, t: int, end: int, noise: Tensor | None) -> int:
        """Sample seq[:, t] from the cache and the token before it, `noise[0]` its noise;
        returns the next position to sample."""
        self._forward(t, t - 1, _at(noise, 0))
        return t + 1


class FastCached(Cached):
    """`Cached` whose single tokens are `GPT.step`s of a `Decoder` (eager, compiled or the
    native C loop, as the settings ask), a chunk per call; for models whose capabilities say
    `fast_decode`."""

    def __init__(self, model: nn.Module, seq: Tensor, n0: int,
                 settings: SamplingSettings) -> None:
        super().__init__(model, seq, n0, settings)
        self.decoder = Decoder(model, self.cache, settings)

    def _steps(self, t: int, end: int, noise: Tensor | None) -> int:
        # up to the chunk's end, or until a non-rolling cache is full
        cache = self.cache
        stop = end if cache.rolling else min(end, t + self.block_size - cache.pos)
        self.decoder.fill(self.seq, t, stop, None if noise is None else noise[: stop - t])
        return stop


def choose_strategy(model: nn.Module, seq: Tensor, n0: int,
                    settings: SamplingSettings) -> Recompute | Cached:
    """How to sample seq[:, n0:] after the prompt seq[:, :n0]: from the settings and what the
    model can do. Says so when the weights asked for are not what decodes."""
    caps = model.capabilities()
    strategy: Recompute | Cached
    if not settings.use_cache:
        strategy = Recompute(model, seq, settings, model.config.block_size)
    elif not caps.kv_cache:
        strategy = Recompute(model, seq, settings, caps.context)
    elif caps.fast_decode:
        strategy = FastCached(model, seq, n0, settings)
    else:
        strategy = Cached(model, seq, n0, settings)
    native = isinstance(strategy, FastCached) and strategy.decoder.native
    if settings.weight_format != "float32" and not native:
        report_once(f"{settings.weight_format} weights are a setting of the native decode "
                    "loop, which does not decode this model here; decoding in float32")
    return strategy

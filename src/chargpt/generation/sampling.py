"""Sampling text from a trained model: the settings, next-token sampling and the decode loop.

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

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from chargpt.errors import ConfigError
from chargpt.generation.decode import Decoder, report_once
from chargpt.generation.settings import SamplingSettings
from chargpt.model.kv_cache import KVCache
from chargpt.model.lm import eval_mode


def draw_noise(generator: torch.Generator | Sequence[torch.Generator] | None,
               shape: tuple[int, ...], device: torch.device) -> Tensor:
    """Exp(1) noise of `shape` (..., B, V) for `SamplingSettings.pick`: from one generator
    (None: torch's global one), or row b from `generator[b]`. Drawing n steps at once gives
    the same numbers as n draws of one step."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.empty(shape, device=device).exponential_(generator=generator)
    rows = [torch.empty(*shape[:-2], shape[-1], device=device).exponential_(generator=g)
            for g in generator]
    return torch.stack(rows, dim=-2)


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
    """`sample_next_token` with settings checked already."""
    noise = None if s.temperature == 0 else draw_noise(generator, logits.shape, logits.device)
    return s.pick(logits, noise)


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
    if max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
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
            fill = _filler(model, seq, n0, settings)
        n, chunk = n0, 1
        while n < n0 + max_new_tokens:
            end = min(n + chunk, n0 + max_new_tokens)
            # inference mode only around the model, never across a yield into caller code
            with torch.inference_mode():
                # the noise of the whole chunk in one draw: the same numbers as step by step
                noise = (None if settings.temperature == 0 else
                         draw_noise(generator, (end - n, B, model.config.vocab_size), idx.device))
                fill(n, end, noise)
            yield seq[:, n:end]  # (B, end - n), read before the next chunk is asked for
            n, chunk = end, min(2 * chunk, MAX_CHUNK)


def _filler(model: nn.Module, seq: Tensor, n0: int,
            settings: SamplingSettings) -> Callable[[int, int, Tensor | None], None]:
    """fill(n, end, noise) samples seq[:, n:end] token by token; one per decode strategy."""
    block_size = model.config.block_size
    caps = model.capabilities()

    def check_weights(decoder: Decoder | None) -> None:
        """Say so when the weights asked for are not what decodes."""
        if settings.weights != "float32" and (decoder is None or not decoder.native):
            report_once(f"{settings.weights} weights are a setting of the native decode loop, "
                        "which does not decode this model here; decoding in float32")

    def emit(t: int, logits: Tensor, noise: Tensor | None) -> None:
        """Sample seq[:, t] from next-token logits (B, V)."""
        seq[:, t : t + 1] = settings.pick(logits, noise)

    if not settings.use_cache or not caps.kv_cache:
        context = block_size if not settings.use_cache else caps.context

        check_weights(None)

        def recompute(n: int, end: int, noise: Tensor | None) -> None:
            for t in range(n, end):
                emit(t, model(seq[:, max(0, t - context) : t])[0][:, -1],
                     None if noise is None else noise[t - n])
        return recompute

    cache = KVCache.for_model(model, seq.size(0))
    decoder = Decoder(model, cache, settings) if caps.fast_decode else None
    check_weights(decoder)
    keep = max(1, block_size // 2)  # tokens kept when a full, non-rolling cache is refilled

    def cached(n: int, end: int, noise: Tensor | None) -> None:
        t = n
        while t < end:
            step_noise = None if noise is None else noise[t - n]
            if t == n0:
                emit(t, model(seq[:, :t], kv_cache=cache)[0][:, -1], step_noise)  # the prompt
            elif cache.pos == block_size and not cache.rolling:
                cache.reset()
                emit(t, model(seq[:, t - keep : t], kv_cache=cache)[0][:, -1], step_noise)
            elif decoder is not None:
                # single steps up to the chunk's end, or until a non-rolling cache is full
                stop = end if cache.rolling else min(end, t + block_size - cache.pos)
                decoder.fill(seq, t, stop, None if noise is None else noise[t - n : stop - n])
                t = stop
                continue
            else:
                emit(t, model(seq[:, t - 1 : t], kv_cache=cache)[0][:, -1], step_noise)
            t += 1
    return cached


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

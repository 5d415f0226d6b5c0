"""The draw of each next token: Exp(1) noise and `sample_next_token`.

A token is drawn from softmax(logits) as argmax(p / noise) with noise ~ Exp(1), which is how
`torch.multinomial` draws one sample on the CPU: the same generator gives the same tokens.
`draw_noise` draws that noise from an explicit `torch.Generator` (or one per row of a batch),
a chunk of steps at once; `SamplingSettings.pick` (settings.py) turns logits and noise into
tokens. `sample_next_token` is the two together, for a caller with logits of its own.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from chargpt.generation.settings import SamplingSettings

__all__ = ["draw_noise", "sample_next_token"]


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
    settings = SamplingSettings(temperature, top_k, top_p)
    noise = None if temperature == 0 else draw_noise(generator, logits.shape, logits.device)
    return settings.pick(logits, noise)

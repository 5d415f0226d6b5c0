"""`SamplingSettings`: how to pick each next token (temperature, top-k, top-p, seed) and how to
decode (KV cache, compiled or native step, weight storage), checked once, here, for every
caller; `pick` is the draw itself, as tensor operations a compiled step can include."""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from chargpt.config.values import check_seed
from chargpt.errors import ConfigError

__all__ = ["WEIGHT_KINDS", "SamplingSettings"]

WEIGHT_KINDS = ("float32", "bfloat16", "int8")  # how the native loop may store weight matrices
# The smallest temperature and top_p other than 0: both loops sample in float32, where a
# temperature of 1e-39 turns the logits infinite (NaN after the softmax: token 0 every time)
# and a top_p of 1e-46 rounds to 0 and drops every token. At 1e-6 the draw is already the
# argmax for any two logits float32 can tell apart, so nothing smaller is worth meaning.
SMALLEST = 1e-6


@dataclass(frozen=True)
class SamplingSettings:
    """How to pick each next token; checked once, here, whoever builds it (CLI, server, API)."""

    temperature: float = 1.0
    """0 is greedy (argmax); otherwise (at least 1e-6) the logits are divided by it."""
    top_k: int | None = None
    """Keep the k likeliest tokens (ties with the k-th too); None keeps all."""
    top_p: float | None = None
    """Keep the smallest set of likeliest tokens reaching this probability (1e-6 to 1, never
    fewer than one token); None keeps all."""
    seed: int | None = None
    """Seed of the generator `generator()` makes, 0 to 2**63 - 1; None draws a fresh random
    seed."""
    use_cache: bool = True
    """Decode with a KV cache (see `generate_tokens`) rather than recomputing the context."""
    compile: bool = False
    """Decode with a compiled step (torch.compile, see decode.py): seconds to a minute of
    compiling the first time, several times faster per token after; eager where unavailable."""
    native: bool = True
    """Decode with chargpt's C loop (generation/native/) where the model allows it (a float32
    pre-norm GPT on the CPU) and a C compiler is found: built once per machine in about a
    second, many times faster per token than the torch step. Off: the torch step (`compile`
    picks which)."""
    weight_format: str = "float32"
    """How the native loop stores weight matrices: 'float32'; 'bfloat16' (each weight rounded to
    8 significant bits: half the memory a token reads); or 'int8' (one scale per output, each
    weight rounded to 1/127 of its row's largest: a quarter). Faster for models whose weights
    outgrow the CPU's caches; tokens may then differ from float32's. The arithmetic stays
    float32 (native.layout.stored_weights); needs the native loop."""

    def __post_init__(self) -> None:
        t, k, p = self.temperature, self.top_k, self.top_p
        if not (isinstance(t, int | float) and math.isfinite(t) and t >= 0):
            raise ConfigError(f"temperature must be >= 0, got {t}")
        if 0 < t < SMALLEST:
            raise ConfigError(f"temperature must be 0 (greedy) or at least {SMALLEST:g}, "
                              f"got {t:g}")
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ConfigError(f"top_k must be an integer >= 1, got {k!r}")
        if p is not None and not (SMALLEST <= p <= 1.0):
            raise ConfigError(f"top_p must be in [{SMALLEST:g}, 1], got {p:g}")
        if self.seed is not None:
            check_seed(self.seed)
        if self.weight_format not in WEIGHT_KINDS:
            raise ConfigError(f"weights must be one of {', '.join(WEIGHT_KINDS)}, "
                              f"got {self.weight_format!r}")
        kind = self.weight_format
        if kind != "float32" and not (self.native and self.use_cache):
            raise ConfigError(f"{kind} weights are a setting of the native decode loop, "
                              "which needs the KV cache and native decoding on")

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

    def pick(self, logits: Tensor, noise: Tensor | None) -> Tensor:
        """Token ids (B, 1) from next-token logits (B, V) and `noise` (B, V) ~ Exp(1) (None
        when greedy). argmax(p / noise) is a draw from p, exactly how torch.multinomial draws
        one sample on the CPU, so the same noise gives the same tokens; written as tensor
        operations only, so a compiled decode step can include it."""
        if self.temperature == 0 or noise is None:
            return logits.argmax(dim=-1, keepdim=True)
        logits = logits.float()
        if self.temperature != 1.0:
            logits = logits / self.temperature
        if self.top_k is not None and self.top_k < logits.size(-1):
            kth = torch.topk(logits, self.top_k, dim=-1).values[:, -1:]  # (B, 1)
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p is not None and self.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
            probs = F.softmax(sorted_logits, dim=-1)
            # A token is dropped when the tokens ranked above it already reach top_p; the
            # first token has nothing above it, so at least one always survives.
            drop = (probs.cumsum(dim=-1) - probs) >= self.top_p
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
        return (F.softmax(logits, dim=-1) / noise).argmax(dim=-1, keepdim=True)

"""`NativeLoop`: a model's decode loop in C, a chunk of tokens per call, sampling included.

At chargpt's sizes one token is well under a megaflop, so a framework's per-operation cost, not
arithmetic, decides how fast text comes out: the eager step runs dozens of small operators per
token, torch.compile's kernels still leave most of the time outside the arithmetic. The loop
hands whole chunks to `chargpt_fill` (native_decode.c), with the model's weights in the C
layout (layout.py) and the KV cache the model's cached forward filled from the prompt. Every
array's shape is checked here before a pointer is handed over; `supports` says which models
the C code computes.
"""

from __future__ import annotations

import ctypes
import functools
import os
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from chargpt.errors import ConfigError
from chargpt.generation.native.build import library
from chargpt.generation.native.layout import floats, prepared
from chargpt.generation.native.structs import (
    ACTIVATIONS,
    FILL_ERRORS,
    MAX_HEAD_DIM,
    NORMS,
    Cache,
    Chunk,
    Config,
)
from chargpt.generation.settings import WEIGHT_KINDS, SamplingSettings

if TYPE_CHECKING:
    from chargpt.model.kv_cache import KVCache

__all__ = ["BIG", "NativeLoop", "supports"]

# weights of a matrix past which it outgrows the caches (512 KB): when a call decodes one
# sequence, the C code reads such a matrix as it is, row by row in memory order, split over
# threads (1.5x faster than transposed there); otherwise it reads every matrix transposed,
# the layout in which a block of weights serves many sequences while it is cached
BIG = 1 << 17
_NEVER = 2**31 - 1


def supports(model: nn.Module) -> bool:
    """Whether the C loop computes this model: a float32 GPT on the CPU with the fast step's
    wiring (pre-norm or none, residuals) and heads the C code's buffers hold."""
    if not model.capabilities().fast_decode:
        return False
    param = next(model.parameters())
    return (param.device.type == "cpu" and param.dtype == torch.float32
            and model.config.head_dim <= MAX_HEAD_DIM)


@functools.lru_cache(maxsize=1)
def _pool() -> ThreadPoolExecutor:
    """The threads that sample a batch's other rows, shared by every loop."""
    return ThreadPoolExecutor(max(1, (os.cpu_count() or 1) - 1), thread_name_prefix="chargpt")


def _config(model: nn.Module, cache: KVCache, settings: SamplingSettings, big: int) -> Config:
    """The C loop's fixed numbers for this model, cache and way of picking tokens."""
    cfg, tr = model.config, model.transformer
    tiny = torch.finfo(torch.float32).eps
    return Config(
        n_layer=cfg.n_layer, n_head=cfg.n_head, head_dim=cfg.head_dim, n_embd=cfg.n_embd,
        hidden=cfg.mlp_ratio * cfg.n_embd, vocab_size=cfg.vocab_size, max_len=cache.max_len,
        n_positions=_learned_positions(model) or 0,
        batch=cache.k[0].size(0), norm=NORMS.index("none" if cfg.norm == "none" else
                                                   cfg.norm_type),
        activation=ACTIVATIONS.index(cfg.activation), qk_norm=int(cfg.qk_norm),
        weight_format=WEIGHT_KINDS.index(settings.weight_format), big=big,
        norm_eps=float(getattr(tr.ln_f, "eps", None) or tiny), qk_eps=tiny,
        attn_scale=float(tr.h[0].attn.scale), logit_softcap=float(cfg.logit_softcap),
        temperature=float(settings.temperature), top_k=settings.top_k or 0,
        top_p=float(settings.top_p if settings.top_p is not None else 1.0))


def _learned_positions(model: nn.Module) -> int | None:
    """Rows of the model's table of learned positions; None without one."""
    return model.config.block_size if "wpe" in model.transformer else None


def _cache(model: nn.Module, cache: KVCache) -> tuple[Cache, list[ctypes.Array]]:
    """The KV cache's tensors for the C loop (each checked), and the arrays that hold them."""
    cfg = model.config
    if not (len(cache.k) == len(cache.v) == cfg.n_layer and cache.max_len >= 1
            and cache.k[0].dim() == 4 and cache.k[0].size(0) >= 1):
        raise ConfigError(f"native decode: the KV cache must hold {cfg.n_layer} layers of keys "
                          "and values, of one position and one row at least")
    expected = (cache.k[0].size(0), cfg.n_head, cache.max_len, cfg.head_dim)
    for t in (*cache.k, *cache.v):
        if tuple(t.shape) != expected or t.dtype != torch.float32 or not t.is_contiguous():
            raise ConfigError(f"native decode: the KV cache is not float32 {expected} and "
                              "contiguous")
    k, v = ((ctypes.POINTER(ctypes.c_float) * len(ts))(*map(floats, ts))
            for ts in (cache.k, cache.v))
    return Cache(k, v), [k, v]


class NativeLoop:
    """A model's decode loop in C, for one KV cache and one way of picking tokens.

    The weights are copied into the C code's layout, the weight matrices as
    `settings.weight_format` says (`layout.stored_weights`), once per model and layout while
    no parameter changes (`layout.prepared`); the cache's tensors are shared with the model's
    cached forward, which fills them from the prompt."""

    def __init__(self, model: nn.Module, cache: KVCache, settings: SamplingSettings) -> None:
        if not supports(model):
            raise ConfigError("this model has no native decode loop (see native.loop.supports)")
        self.lib, self.cache = library(), cache
        self._cache, self._cache_arrays = _cache(model, cache)
        batch = cache.k[0].size(0)
        # rows never interact: with several threads, each samples its share of the batch (the
        # C call releases the GIL), so --num-samples N uses every core torch is allowed; a
        # share's large products are split over the threads left over (batch 1, big models)
        threads = max(1, torch.get_num_threads())
        shares = min(threads, batch)
        self._rows = [(batch * i // shares, batch * (i + 1) // shares) for i in range(shares)]
        self._threads = max(1, threads // shares)
        big = BIG if batch == shares else _NEVER  # one sequence per call: big matrices by rows
        self._weights = prepared(model, settings.weight_format, big)
        self._config = _config(model, cache, settings, big)
        size = self.lib.chargpt_work_size(ctypes.byref(self._config))
        self._work = [torch.empty(size) for _ in self._rows]
        self.batch, self.vocab = batch, model.config.vocab_size
        self.rope, self.head_dim = model.use_rope, model.config.head_dim
        self.positions = None if cache.rolling else cache.max_len  # slots before a refill
        self.learned = _learned_positions(model)

    def _check(self, seq: Tensor, start: int, end: int, rot: Tensor | None,
               noise: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
        """The arguments of `fill` checked; `rot` and `noise` as the C code reads them."""
        n, pos = end - start, self.cache.pos
        if (seq.dtype != torch.long or seq.device.type != "cpu" or not seq.is_contiguous()
                or seq.dim() != 2 or seq.size(0) != self.batch
                or not 1 <= start <= end <= seq.size(1)):
            raise ConfigError("native decode: seq must be a contiguous (batch, n) long tensor "
                              "holding the positions asked for")
        if pos < 0 or (self.positions is not None and pos + n > self.positions):
            raise ConfigError("native decode: the cache is full; refill it first")
        if self.learned is not None and pos + n > self.learned:
            raise ConfigError(f"native decode: positions up to {pos + n - 1} are past the "
                              f"model's {self.learned} learned positions")
        if self.rope:
            if rot is None or tuple(rot.shape) != (n, 2, self.head_dim):
                raise ConfigError("native decode: one rotary row per token is needed")
            rot = rot.to(torch.float32).contiguous()
        else:
            rot = None
        if noise is not None:
            if tuple(noise.shape) != (n, self.batch, self.vocab):
                raise ConfigError(f"native decode: noise must be {(n, self.batch, self.vocab)}")
            noise = noise.to(torch.float32).contiguous()
        return rot, noise

    def fill(self, seq: Tensor, start: int, end: int, rot: Tensor | None,
             noise: Tensor | None) -> None:
        """Sample seq[:, start:end] (start >= 1) token by token; the cache advances.

        `rot` (end - start, 2, head_dim) holds the rotary rows of the cache's next positions
        (rotary models); `noise` (end - start, B, V) the draws' Exp(1) noise, None for greedy."""
        if end - start <= 0:
            return
        rot, noise = self._check(seq, start, end, rot, noise)
        seq_ptr = ctypes.cast(seq.data_ptr(), ctypes.POINTER(ctypes.c_int64))
        chunks = [Chunk(seq=seq_ptr, stride=seq.size(1), start=start, end=end,
                        pos=self.cache.pos, rot=floats(rot), noise=floats(noise),
                        work=floats(work), row0=row0, row1=row1, threads=self._threads)
                  for work, (row0, row1) in zip(self._work, self._rows, strict=True)]

        def run(chunk: Chunk) -> int:
            return self.lib.chargpt_fill(ctypes.byref(self._config),
                                         ctypes.byref(self._weights.model),
                                         ctypes.byref(self._cache), ctypes.byref(chunk))

        others = [_pool().submit(run, chunk) for chunk in chunks[1:]]
        status = [run(chunks[0]), *(f.result() for f in others)]
        refused = next((s for s in status if s), 0)
        if refused:
            raise ConfigError(f"native decode: {FILL_ERRORS[-refused - 1][1]}")
        self.cache.advance(end - start)

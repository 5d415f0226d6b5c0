"""One token at a time: a GPT's decode step from its KV cache, eager or compiled.

Sampling runs the prompt through `GPT.forward` once to fill a `KVCache`; every later token is
one `GPT.step`, the model's own single-token path (the same modules as its forward, without
dropout, shape checks or cache bookkeeping), told where in the cache to write and read by a
`CacheSlot`. At the default model's size a token costs about 1.6 MFLOP, so its time goes to
per-operation overhead, not arithmetic. `Decoder` with `compile` set therefore traces
`static_logits` once (attention over every slot of the cache under an additive mask; the write
slot and rotation computed from the position tensor; the cache written in place) and lets
`torch.compile` fuse it, sampling included, into a few C++ kernels; at batch 1 its
matrix-vector products are written as multiply-and-sum (`fused_linear`) so that they fuse too.
Where compilation is unavailable or fails, the eager step runs instead and a warning says why.
Models without `capabilities().fast_decode` (post-norm, no residuals) have no step: the
generation loop decodes them through the cached forward.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from chargpt.errors import ChargptError, warn
from chargpt.generation.native import build, loop
from chargpt.model.attention import Linear
from chargpt.model.compiling import compiled
from chargpt.model.kv_cache import CacheSlot
from chargpt.model.rope import rope_rows

if TYPE_CHECKING:
    from chargpt.generation.settings import SamplingSettings
    from chargpt.model.kv_cache import KVCache

__all__ = ["Decoder", "fused_linear", "report_once", "rotation_table", "static_logits"]


def rotation_table(config: Any, n: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """The (cos, sin) rows of `rope_rows` for positions 0..n-1, stacked (n, 2, head_dim): a
    row per position, as the eager step and the native loop read them."""
    rows = rope_rows(torch.arange(n, device=device), config.head_dim, config.rope_base)
    return torch.stack(rows, 1).to(dtype)


def fused_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`F.linear` as multiply-and-sum, which torch.compile fuses with its neighbours at batch 1
    instead of calling a matrix library once per layer (in eager mode it is slower)."""
    y = (x.unsqueeze(-2) * weight).sum(-1)  # (B, out)
    return y if bias is None else y + bias


def static_logits(model: nn.Module, tok: Tensor, keys: list[Tensor], values: list[Tensor],
                  pos: Tensor, linear: Linear = F.linear) -> Tensor:
    """`GPT.step` with static shapes, for torch.compile: logits (B, vocab_size) after `tok`
    (B,) at position `pos` (a 0-d long tensor), which gives the write slot, the rotation and
    the mask over every slot of the cache `keys`/`values`, all computed here, so a step needs
    no other per-token input."""
    cfg, max_len = model.config, keys[0].size(2)
    slots = torch.arange(max_len, device=pos.device)  # (max_len,)
    mask = torch.zeros(max_len, device=pos.device, dtype=keys[0].dtype)
    mask = mask.masked_fill(slots > pos, float("-inf"))  # slots not written yet
    rope = None
    if model.use_rope:
        cos, sin = rope_rows(pos.view(1), cfg.head_dim, cfg.rope_base)  # (1, hs) each
        rope = cos[0].to(keys[0].dtype), sin[0].to(keys[0].dtype)
    at = CacheSlot(keys, values, (pos % max_len).view(1), mask=mask)
    return model.step(tok, at, rope, linear)


class _CompiledSteps(nn.Module):
    """`UNROLL` steps of `static_logits` and `settings.pick`, each token feeding the next, as
    one module to compile: one call per `UNROLL` tokens spreads the call's fixed cost."""

    def __init__(self, model: nn.Module, settings: SamplingSettings, linear: Linear) -> None:
        super().__init__()
        self.model, self.settings, self.linear = model, settings, linear

    def forward(self, tok: Tensor, noise: Tensor | None, keys: list[Tensor],
                values: list[Tensor], pos: Tensor) -> Tensor:
        out = []
        for i in range(UNROLL):
            logits = static_logits(self.model, tok, keys, values, pos + i, self.linear)
            tok = self.settings.pick(logits, None if noise is None else noise[i])[:, 0]  # (B,)
            out.append(tok)
        return torch.stack(out, dim=1)  # (B, UNROLL)


# what the user has been told already about decoding other than asked (once per process)
_REPORTED: set[str] = set()


def report_once(message: str) -> None:
    """Warn that decoding differs from what was asked, once per process (a server samples
    many times with the same settings)."""
    if message not in _REPORTED:
        _REPORTED.add(message)
        warn(message)


# compiled steps per model and static shape; compiling one costs seconds to a minute
_COMPILED: weakref.WeakKeyDictionary[nn.Module, dict[tuple, Callable[..., Tensor]]] = (
    weakref.WeakKeyDictionary())
# inductor options of the compiled steps: no per-call Python checks of buffer shapes
COMPILE_OPTIONS = {"size_asserts": False}
UNROLL = 4  # tokens per compiled call: 4 cut the per-token time by ~20% for 3x the compiling


def _fresh(tok: Tensor) -> Tensor:
    """A copy with standard strides, so that every call sees the same strides (no recompile):
    `clone` alone keeps the stride of a one-element row of a longer buffer."""
    return tok.clone(memory_format=torch.contiguous_format)


class Decoder:
    """Decodes tokens one at a time from a prompt-filled `KVCache`.

    `logits(tok)` is one eager step; `fill(seq, start, end, noise)` samples seq[:, start:end]
    token by token with `settings.pick`: through the native C loop (generation/native/) when the
    settings ask for it and the model and machine allow, else through the compiled step when
    `settings.compile` is set, else eagerly. Positions past the cache's length roll (rotary
    models); callers refill a non-rolling cache before it is full.
    """

    def __init__(self, model: nn.Module, cache: KVCache, settings: SamplingSettings) -> None:
        self.model, self.cache, self.settings = model, cache, settings
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.rotary = model.use_rope
        self.slots = torch.arange(cache.max_len, device=self.device)  # slots[i : i + 1]: (1,)
        self._table: Tensor | None = None
        self._native = self._native_loop()
        self._step: Callable[..., Tensor] | None = None
        if settings.compile and self._native is None:
            try:
                self._step = self._compiled()
            except ChargptError as e:  # where its code would be kept is not the user's alone
                self._no_compile(str(e))

    def _native_loop(self) -> loop.NativeLoop | None:
        """The C loop, if the settings ask for it and it computes this model here."""
        if not self.settings.native or not loop.supports(self.model):
            return None
        try:
            return loop.NativeLoop(self.model, self.cache, self.settings)
        except build.Unavailable as e:
            report_once(f"the native decode loop is unavailable here: {e}; decoding with the "
                        "slower torch step (--no-native hides this)")
            return None

    @property
    def native(self) -> bool:
        """Whether tokens are decoded by the native C loop."""
        return self._native is not None

    def _rotations(self, last: int) -> Tensor:
        """The rotation rows (n, 2, hs) of positions 0 to at least `last`: a table grown by
        doubling (angles computed once per doubling, not once per token)."""
        if self._table is None or self._table.size(0) <= last:
            size = max(2 * self.cache.max_len, 2 * (last + 1))
            self._table = rotation_table(self.model.config, size, self.device, self.dtype)
        return self._table

    def logits(self, tok: Tensor) -> Tensor:
        """Eager step: logits (B, vocab_size) after `tok` (B,); the cache advances."""
        pos, max_len = self.cache.pos, self.cache.max_len
        slot = pos % max_len
        rope = self._rotations(pos)[pos].unbind(0) if self.rotary else None  # (hs,) each
        at = CacheSlot(self.cache.k, self.cache.v, self.slots[slot : slot + 1],
                       min(pos + 1, max_len))
        logits = self.model.step(tok, at, rope)
        self.cache.advance(1)
        return logits

    def fill(self, seq: Tensor, start: int, end: int, noise: Tensor | None) -> None:
        """Sample seq[:, start:end] (start >= 1), each token from the one before it and the
        cache; `noise` (end - start, B, V) is the draws' Exp(1) noise, None when greedy."""
        if self._native is not None:
            pos, n = self.cache.pos, end - start
            rot = self._rotations(pos + n - 1)[pos : pos + n] if self.rotary else None
            self._native.fill(seq, start, end, rot, noise)
            return
        noises = [None] * (end - start) if noise is None else noise.unbind(0)
        first = start
        if self._step is not None:
            try:
                start = self._fill_compiled(self._step, seq, start, end, noises)
            except Exception as e:  # noqa: BLE001 - any compiler failure: decode eagerly
                self._no_compile(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        for t in range(start, end):  # eagerly: what whole compiled calls do not cover
            seq[:, t : t + 1] = self.settings.pick(self.logits(seq[:, t - 1]), noises[t - first])

    def _no_compile(self, reason: str) -> None:
        """Decode eagerly from now on, and say why once."""
        report_once(f"torch.compile is not available for decoding here ({reason}); "
                    "decoding eagerly")
        self._step = None
        _COMPILED.pop(self.model, None)

    def _fill_compiled(self, step: Callable[..., Tensor], seq: Tensor, start: int, end: int,
                       noises: list) -> int:
        """Fill seq[:, start:] in whole calls of the compiled `step`; returns where it stopped.

        Guards are checked on the first call only: the later calls of the loop pass tensors of
        the very same shapes, so their guards cannot fail (and cost ~15% of a call)."""
        calls = (end - start) // UNROLL
        if not calls:
            return start
        keys, values, pos = self.cache.k, self.cache.v, self.cache.pos
        positions = torch.arange(pos, pos + calls * UNROLL, UNROLL,
                                 device=self.device).unbind(0)
        noise = (None if noises[0] is None
                 else torch.stack(noises[: calls * UNROLL]).split(UNROLL))
        tok, out = _fresh(seq[:, start - 1]), []
        with contextlib.ExitStack() as stack:
            for i, where in enumerate(positions):
                if i == 1:
                    stack.enter_context(torch.compiler.set_stance(
                        "default", skip_guard_eval_unsafe=True))
                block = step(tok, None if noise is None else noise[i], keys, values, where)
                tok = _fresh(block[:, -1])
                out.append(block)
        seq[:, start : start + calls * UNROLL] = torch.cat(out, dim=1)
        self.cache.advance(calls * UNROLL)
        return start + calls * UNROLL

    def _compiled(self) -> Callable[..., Tensor]:
        """The compiled step for this model, batch, cache length and way of picking tokens."""
        s = self.settings
        batch, max_len = self.cache.k[0].size(0), self.cache.max_len
        key = (batch, max_len, self.device, self.dtype, s.temperature, s.top_k, s.top_p)
        steps = _COMPILED.setdefault(self.model, {})
        if key not in steps:
            linear = fused_linear if batch == 1 else F.linear
            module = _CompiledSteps(self.model, s, linear)
            steps[key] = compiled(module, fullgraph=True, dynamic=False,
                                  options=COMPILE_OPTIONS)
        return steps[key]

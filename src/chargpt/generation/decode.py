"""One token at a time: a GPT's decode step from its KV cache, eager or compiled.

Sampling runs the prompt through `GPT.forward` once to fill a `KVCache`; every later token is
one step here, the arithmetic of the cached forward for a single token written as functional
calls on the weights (no module dispatch, dropout, shape checks or cache bookkeeping). At the
default model's size a token costs about 1.6 MFLOP, so its time goes to per-operation overhead,
not arithmetic. `Decoder(..., compile=True)` therefore traces the step once with static shapes
(attention over every slot of the cache under an additive mask; the write slot, rotation and
position passed in as tensors; the cache written in place) and lets `torch.compile` fuse it,
sampling included, into a few C++ kernels; at batch 1 its matrix-vector products are written as
multiply-and-sum so that they fuse too. Where compilation is unavailable or fails, the eager step
runs instead and a warning says why. `supports(model)` says which models have this fast path;
the others (post-norm, no residuals) decode through the general cached forward.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from chargpt.errors import warn
from chargpt.generation.native import build, loop
from chargpt.model.rope import rope_angles

if TYPE_CHECKING:
    from chargpt.generation.settings import SamplingSettings
    from chargpt.model.kv_cache import KVCache

__all__ = ["Decoder", "decode_step", "fused_linear", "report_once", "rotation_table",
           "static_logits", "step_logits", "supports"]

Linear = Callable[[Tensor, Tensor, "Tensor | None"], Tensor]


def supports(model: nn.Module) -> bool:
    """Whether `model` has a fast single-token step: a GPT with pre-norm (or none) residuals."""
    return model.capabilities().fast_decode


def rotation_table(config: Any, n: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Rotary rows (n, 2, head_dim) for positions 0..n-1: [cos | cos] and [sin | -sin], so that
    x * row[0] + (x with its halves swapped) * row[1] rotates each pair (x[i], x[i + hs/2])."""
    cos, sin = rope_angles(torch.arange(n, device=device), config.head_dim, config.rope_base)
    return torch.stack((torch.cat((cos, cos), -1), torch.cat((sin, -sin), -1)), 1).to(dtype)


def fused_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`F.linear` as multiply-and-sum, which torch.compile fuses with its neighbours at batch 1
    instead of calling a matrix library once per layer (in eager mode it is slower)."""
    y = (x.unsqueeze(-2) * weight).sum(-1)  # (B, out)
    return y if bias is None else y + bias


def step_logits(model: nn.Module, tok: Tensor, keys: list[Tensor], values: list[Tensor],
                slot: Tensor, rot: Tensor | None = None, pos: Tensor | None = None,
                mask: Tensor | None = None, n_keys: int | None = None,
                linear: Linear = F.linear) -> Tensor:
    """Logits (B, vocab_size) of the token after `tok` (B,), in eval mode.

    The token's keys and values are written at slot `slot` (a 0-d long tensor) of each layer's
    `keys[l]`/`values[l]` (B, nh, max_len, hs). `rot` (2, hs) is its row of `rotation_table`
    (rotary models); `pos` (0-d) its learned position. Attention reads the first `n_keys`
    slots, or all of them with the additive `mask` (max_len,) for static shapes.
    """
    cfg = model.config
    B, C, nh, hs = tok.size(0), cfg.n_embd, cfg.n_head, cfg.head_dim
    tr = model.transformer
    x = F.embedding(tok, tr.wte.weight)  # (B, C)
    if pos is not None:
        x = x + F.embedding(pos, tr.wpe.weight)
    for layer, block in enumerate(tr.h):
        attn = block.attn
        qkv = linear(block.ln_1(x), attn.c_attn.weight, attn.c_attn.bias)  # (B, 3C)
        if "ve" in tr:
            ve = F.embedding(tok, tr.ve[layer].weight)  # (B, C)
            qkv = torch.cat((qkv[:, : 2 * C], qkv[:, 2 * C :] + ve), dim=-1)
        qkv = qkv.view(B, 3, nh, hs)
        qk = qkv[:, :2]  # (B, 2, nh, hs): queries and keys, transformed together
        if attn.qk_norm:
            qk = F.rms_norm(qk, (hs,))
        if rot is not None:
            qk = torch.addcmul(qk * rot[0], qk.roll(hs // 2, dims=-1), rot[1])
        k_all, v_all = keys[layer], values[layer]
        k_all.index_copy_(2, slot.view(1), qk[:, 1].unsqueeze(2))  # (B, nh, 1, hs) at `slot`
        v_all.index_copy_(2, slot.view(1), qkv[:, 2].unsqueeze(2))
        if n_keys is not None:
            k_all, v_all = k_all[:, :, :n_keys], v_all[:, :, :n_keys]
        q = qk[:, 0].unsqueeze(2)  # (B, nh, 1, hs)
        att = (q @ k_all.transpose(-2, -1)) * attn.scale  # (B, nh, 1, n)
        if mask is not None:
            att = att + mask
        y = (att.softmax(dim=-1) @ v_all).view(B, C)  # heads side by side
        x = x + (y if attn.c_proj is None else linear(y, attn.c_proj.weight, attn.c_proj.bias))
        if block.mlp is not None:
            mlp = block.mlp
            h = mlp.act(linear(block.ln_2(x), mlp.c_fc.weight, mlp.c_fc.bias))
            x = x + (h if mlp.c_proj is None else linear(h, mlp.c_proj.weight, mlp.c_proj.bias))
    head = model.lm_head
    return model._logits(linear(tr.ln_f(x), head.weight, head.bias))  # (B, vocab_size)


def decode_step(model: nn.Module, idx: Tensor, cache: KVCache) -> Tensor:
    """Logits (B, vocab_size) of the token after `idx` (B, 1) given the cached context: what
    `model(idx, kv_cache=cache)[0][:, -1]` computes in eval mode, and the cache advances."""
    return Decoder(model, cache).logits(idx[:, 0])


def static_logits(model: nn.Module, tok: Tensor, keys: list[Tensor], values: list[Tensor],
                  pos: Tensor, linear: Linear = F.linear) -> Tensor:
    """`step_logits` with static shapes, for torch.compile: the token's position `pos` (a 0-d
    long tensor) gives its write slot, rotation, learned position and the mask over every
    slot of the cache, all computed here, so a step needs no other per-token input."""
    cfg, max_len = model.config, keys[0].size(2)
    slots = torch.arange(max_len, device=pos.device)  # (max_len,)
    mask = torch.zeros(max_len, device=pos.device, dtype=keys[0].dtype)
    mask = mask.masked_fill(slots > pos, float("-inf"))  # slots not written yet
    rot = None
    if model.use_rope:
        cos, sin = rope_angles(pos.view(1), cfg.head_dim, cfg.rope_base)  # (1, hs/2)
        rot = torch.stack((torch.cat((cos, cos), -1), torch.cat((sin, -sin), -1)), 1)[0]
        rot = rot.to(keys[0].dtype)
    where = pos if "wpe" in model.transformer else None
    return step_logits(model, tok, keys, values, pos % max_len, rot, where, mask,
                       linear=linear)


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
    `compile` is set, else eagerly. Positions past the cache's length roll (rotary models);
    callers refill a non-rolling cache before it is full.
    """

    def __init__(self, model: nn.Module, cache: KVCache,
                 settings: SamplingSettings | None = None, compile: bool = False) -> None:
        self.model, self.cache, self.settings = model, cache, settings
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.slots = torch.arange(cache.max_len, device=self.device)  # slots[i]: 0-d index
        self._table: Tensor | None = None
        self._native = self._native_loop()
        self._step = (self._compiled() if compile and settings is not None
                      and self._native is None else None)

    def _native_loop(self) -> loop.NativeLoop | None:
        """The C loop, if the settings ask for it and it computes this model here."""
        if self.settings is None or not self.settings.native or not loop.supports(self.model):
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

    def _rotation(self, pos: int, n: int | None = None) -> Tensor:
        """This position's rotation rows (or those of `n` positions from it), from a table
        grown by doubling (angles computed once per doubling, not once per token)."""
        last = pos + (n or 1) - 1
        if self._table is None or self._table.size(0) <= last:
            size = max(2 * self.cache.max_len, 2 * (last + 1))
            self._table = rotation_table(self.model.config, size, self.device, self.dtype)
        return self._table[pos] if n is None else self._table[pos : pos + n]

    def _inputs(self, pos: int) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Write slot, rotation rows and learned position of the token at `pos`."""
        slot = self.slots[pos % self.cache.max_len]
        rot = self._rotation(pos) if self.model.use_rope else None
        return slot, rot, (self.slots[pos] if "wpe" in self.model.transformer else None)

    def logits(self, tok: Tensor) -> Tensor:
        """Eager step: logits (B, vocab_size) after `tok` (B,); the cache advances."""
        pos = self.cache.pos
        slot, rot, where = self._inputs(pos)
        logits = step_logits(self.model, tok, self.cache.k, self.cache.v, slot, rot, where,
                             n_keys=min(pos + 1, self.cache.max_len))
        self.cache.advance(1)
        return logits

    def fill(self, seq: Tensor, start: int, end: int, noise: Tensor | None) -> None:
        """Sample seq[:, start:end] (start >= 1), each token from the one before it and the
        cache; `noise` (end - start, B, V) is the draws' Exp(1) noise, None when greedy."""
        assert self.settings is not None
        if self._native is not None:
            rot = self._rotation(self.cache.pos, end - start) if self.model.use_rope else None
            self._native.fill(seq, start, end, rot, noise)
            return
        noises = [None] * (end - start) if noise is None else noise.unbind(0)
        first = start
        if self._step is not None:
            try:
                start = self._fill_compiled(seq, start, end, noises)
            except Exception as e:  # noqa: BLE001 - any compiler failure: decode eagerly
                reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                warnings.warn(f"torch.compile is not available for decoding here ({reason});"
                              " decoding eagerly", RuntimeWarning, stacklevel=2)
                self._step = None
                _COMPILED.pop(self.model, None)
        for t in range(start, end):  # eagerly: what whole compiled calls do not cover
            seq[:, t : t + 1] = self.settings.pick(self.logits(seq[:, t - 1]), noises[t - first])

    def _fill_compiled(self, seq: Tensor, start: int, end: int, noises: list) -> int:
        """Fill seq[:, start:] in whole calls of the compiled steps; returns where it stopped.

        Guards are checked on the first call only: the later calls of the loop pass tensors of
        the very same shapes, so their guards cannot fail (and cost ~15% of a call)."""
        assert self._step is not None
        calls = (end - start) // UNROLL
        if not calls:
            return start
        step, keys, values, pos = self._step, self.cache.k, self.cache.v, self.cache.pos
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
        assert s is not None
        batch, max_len = self.cache.k[0].size(0), self.cache.max_len
        key = (batch, max_len, self.device, self.dtype, s.temperature, s.top_k, s.top_p)
        steps = _COMPILED.setdefault(self.model, {})
        if key not in steps:
            linear = fused_linear if batch == 1 else F.linear
            module = _CompiledSteps(self.model, s, linear)
            steps[key] = torch.compile(module, fullgraph=True, dynamic=False,
                                       options=COMPILE_OPTIONS)
        return steps[key]

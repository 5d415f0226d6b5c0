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

import warnings
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .model import rope_angles

if TYPE_CHECKING:
    from .sampling import KVCache, SamplingSettings

__all__ = ["Decoder", "decode_step", "rotation_table", "step_logits", "supports"]

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


class _CompiledStep(nn.Module):
    """The step and the pick of the next token as one module, for torch.compile."""

    def __init__(self, model: nn.Module, settings: SamplingSettings, linear: Linear) -> None:
        super().__init__()
        self.model, self.settings, self.linear = model, settings, linear

    def forward(self, tok: Tensor, noise: Tensor | None, keys: list[Tensor],
                values: list[Tensor], slot: Tensor, rot: Tensor | None, pos: Tensor | None,
                mask: Tensor) -> Tensor:
        logits = step_logits(self.model, tok, keys, values, slot, rot, pos, mask,
                             linear=self.linear)
        return self.settings.pick(logits, noise)[:, 0]  # (B,)


# compiled steps per model and static shape; compiling one costs seconds to a minute
_COMPILED: weakref.WeakKeyDictionary[nn.Module, dict[tuple, Callable[..., Tensor]]] = (
    weakref.WeakKeyDictionary())


class Decoder:
    """Decodes the token after each sequence's last one from a prompt-filled `KVCache`.

    `logits(tok)` is the eager step; `next_token(tok, noise)` picks the token too, with
    `settings.pick`, through the compiled step when `compile` is set. Positions past the
    cache's length roll (rotary models); callers refill a non-rolling cache before it is full.
    """

    def __init__(self, model: nn.Module, cache: KVCache,
                 settings: SamplingSettings | None = None, compile: bool = False) -> None:
        self.model, self.cache, self.settings = model, cache, settings
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.slots = torch.arange(cache.max_len, device=self.device)  # slots[i]: 0-d index
        self.rope = model.use_rope
        self.learned = "wpe" in model.transformer
        self._table: Tensor | None = None
        self._step: Callable[..., Tensor] | None = None
        self._masks = torch.empty(0)
        if compile and settings is not None:
            self._step, self._masks = self._compiled(), self._static_masks()

    def _rotation(self, pos: int) -> Tensor:
        """This position's rotation rows, from a table grown by doubling (angles computed once
        per doubling, not once per token)."""
        if self._table is None or self._table.size(0) <= pos:
            n = max(2 * self.cache.max_len, 2 * (pos + 1))
            self._table = rotation_table(self.model.config, n, self.device, self.dtype)
        return self._table[pos]

    def _inputs(self, pos: int) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Write slot, rotation rows and learned position of the token at `pos`."""
        slot = self.slots[pos % self.cache.max_len]
        rot = self._rotation(pos) if self.rope else None
        return slot, rot, (self.slots[pos] if self.learned else None)

    def logits(self, tok: Tensor) -> Tensor:
        """Eager step: logits (B, vocab_size) after `tok` (B,); the cache advances."""
        pos = self.cache.pos
        slot, rot, where = self._inputs(pos)
        logits = step_logits(self.model, tok, self.cache.k, self.cache.v, slot, rot, where,
                             n_keys=min(pos + 1, self.cache.max_len))
        self.cache.advance(1)
        return logits

    def next_token(self, tok: Tensor, noise: Tensor | None) -> Tensor:
        """The next token (B, 1) after `tok` (B,), picked with the settings and `noise`."""
        assert self.settings is not None
        if self._step is None:
            return self.settings.pick(self.logits(tok), noise)
        pos = self.cache.pos
        slot, rot, where = self._inputs(pos)
        mask = self._masks[min(pos, self.cache.max_len - 1)]
        try:
            out = self._step(tok, noise, self.cache.k, self.cache.v, slot, rot, where, mask)
        except Exception as e:  # noqa: BLE001 - any compiler failure: decode eagerly instead
            warnings.warn(f"torch.compile is not available for decoding here ({type(e).__name__}:"
                          f" {str(e).splitlines()[0] if str(e) else ''}); decoding eagerly",
                          RuntimeWarning, stacklevel=2)
            self._step = None
            _COMPILED.pop(self.model, None)
            return self.next_token(tok, noise)
        self.cache.advance(1)
        return out.unsqueeze(1)

    def _static_masks(self) -> Tensor:
        """Row i (max_len,): 0 for the slots 0..i already written, -inf for the rest."""
        n = self.cache.max_len
        return torch.full((n, n), float("-inf"), device=self.device,
                          dtype=self.dtype).triu(1)

    def _compiled(self) -> Callable[..., Tensor]:
        """The compiled step for this model, batch, cache length and way of picking tokens."""
        s = self.settings
        assert s is not None
        batch = self.cache.k[0].size(0)
        key = (batch, self.cache.max_len, self.device, self.dtype, s.temperature, s.top_k,
               s.top_p)
        steps = _COMPILED.setdefault(self.model, {})
        if key not in steps:
            linear = fused_linear if batch == 1 else F.linear
            module = _CompiledStep(self.model, s, linear)
            steps[key] = torch.compile(module, fullgraph=True, dynamic=False)
        return steps[key]

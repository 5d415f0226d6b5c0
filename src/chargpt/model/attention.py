"""Causal self-attention: the GPT's one module that moves information between positions.

`CausalSelfAttention.forward` attends over a whole sequence (after the keys and values a
`KVCache` holds, if one is given) through PyTorch's fused `scaled_dot_product_attention`; an
explicit masked-softmax path computes the same thing and is used to check the fused path and to
return the attention probabilities for heatmaps. `CausalSelfAttention.step` is the same layer
for a single token in eval mode, written for decoding speed: the cache is written in place at
a slot and read under an optional additive mask, so the step has static shapes for
`torch.compile`. Both run the same pieces: the projection to queries, keys and values (value
embeddings added), QK-norm and the rotation of queries and keys, and the output projection.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from chargpt.config.schema import ModelConfig
from chargpt.model.rope import apply_rope

if TYPE_CHECKING:
    from chargpt.model.kv_cache import CacheSlot, KVCache

__all__ = ["CausalSelfAttention", "Linear", "causal_mask"]

# how a step multiplies by a weight matrix: F.linear, or a variant a compiler fuses better
Linear = Callable[[Tensor, Tensor, "Tensor | None"], Tensor]


def causal_mask(t_q: int, t_k: int, device: torch.device) -> Tensor:
    """Boolean (t_q, t_k) mask, True where attention is allowed.

    The queries are the last `t_q` of `t_k` positions (the first `t_k - t_q` keys come from a
    cache), so query i may see keys up to and including its own position `t_k - t_q + i`.
    """
    return torch.ones(t_q, t_k, dtype=torch.bool, device=device).tril(diagonal=t_k - t_q)


class CausalSelfAttention(nn.Module):
    """Multi-head masked self-attention: every position attends to itself and earlier ones.

    Queries, keys and values come from one fused projection `c_attn`; the heads' outputs are
    concatenated and mixed by `c_proj`. With a `KVCache` the new keys and values are appended
    to those of earlier calls, so a forward over only the newest token still sees the whole
    context. Set `use_sdpa = False` (or ask for the attention probabilities) to use the
    explicit masked-softmax path.
    """

    def __init__(self, config: ModelConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.head_dim = config.head_dim
        self.layer_idx = layer_idx
        self.dropout = config.dropout
        self.qk_norm = config.qk_norm
        self.use_sdpa = True
        # the lecture's code divides by sqrt(n_embd) (a slip): keep it reproducible
        self.scale = 1.0 / math.sqrt(config.head_dim if config.attn_scale == "head"
                                     else config.n_embd)
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd,
                                bias=config.bias and config.qkv_bias)
        # without a projection the heads' outputs, side by side, are the result
        self.c_proj = (nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
                       if config.attn_proj else None)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)

    def _heads(self, x: Tensor, rope: tuple[Tensor, Tensor] | None, ve: Tensor | None,
               linear: Linear, float32: bool = False) -> tuple[Tensor, Tensor]:
        """Queries and keys side by side (..., 2nh, hs), normalised and rotated as the config
        says, and values (..., nh, hs) of `x` (..., C); the value embeddings `ve` (..., C) are
        added to the values, `rope` is the (cos, sin) rows of the tokens' positions. With
        `float32` the queries and keys are normalised and rotated in float32."""
        C, lead, c_attn = self.n_embd, x.shape[:-1], self.c_attn
        qkv = linear(x, c_attn.weight, c_attn.bias)  # (..., 3C)
        if ve is not None:
            qkv = torch.cat((qkv[..., : 2 * C], qkv[..., 2 * C :] + ve), dim=-1)
        # queries and keys side by side, so each transform runs once for both
        qk = qkv[..., : 2 * C].view(*lead, 2 * self.n_head, self.head_dim)  # (..., 2nh, hs)
        v = qkv[..., 2 * C :].view(*lead, self.n_head, self.head_dim)  # (..., nh, hs)
        if float32:
            qk = qk.float()
        if self.qk_norm:
            qk = F.rms_norm(qk, (self.head_dim,))
        if rope is not None:
            qk = apply_rope(qk, *rope)
        return qk, v

    def _out(self, y: Tensor, linear: Linear) -> Tensor:
        """The heads' outputs `y` (..., C), side by side, mixed by the output projection."""
        proj = self.c_proj
        return y if proj is None else linear(y, proj.weight, proj.bias)

    def forward(
        self,
        x: Tensor,
        kv_cache: KVCache | None = None,
        need_att: bool = False,
        rope: tuple[Tensor, Tensor] | None = None,
        ve: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Return the attention output (B, T, C) and, if `need_att`, the attention
        probabilities (B, nh, T, T_total), where T_total counts cached positions too. `rope`
        is the (cos, sin) rows (T, 1, hs) of the new tokens' positions when positions are
        rotary; `ve` (B, T, C), the tokens' value embeddings, is added to the values."""
        B, T, C = x.shape
        # the attention of a CPU's autocast runs in float32 (`_fused`); a CPU's elementwise
        # kernels are faster in float32 too, so the queries and keys go up before their norm
        # and rotation (the default's forward and backward 1.07x faster, 2026-12-05)
        qk, v = self._heads(x, rope, ve, F.linear, float32=_cpu_autocast(x))
        q, k = qk.transpose(1, 2).split(self.n_head, dim=1)  # (B, nh, T, hs) each
        v = v.transpose(1, 2)  # (B, nh, T, hs)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, nh, T_total, hs)
            # a cache kept in another dtype than autocast's output must not break the matmuls
            k, v = k.to(q.dtype), v.to(q.dtype)
        t_total = k.size(2)

        probs = None
        if self.use_sdpa and not need_att:
            y = self._fused(q, k, v)
        else:
            att = (q @ k.transpose(-2, -1)) * self.scale  # (B, nh, T, T_total)
            att = att.masked_fill(~causal_mask(T, t_total, x.device), float("-inf"))
            att = F.softmax(att, dim=-1)
            if need_att:
                probs = att
            y = self.attn_dropout(att) @ v  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side
        return self.resid_dropout(self._out(y, F.linear)), probs

    def _fused(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """PyTorch's fused attention of (B, nh, T, hs) queries over (B, nh, T_total, hs) keys
        and values. A CPU's fused kernels are slower in bfloat16 than in float32 at these head
        sizes (its backward about 5x at the default's: 4.5 ms a layer against 0.9, 2026-12-05),
        so under a CPU's bfloat16 autocast the attention runs in float32; the matmuls around
        it keep bfloat16."""
        if _cpu_autocast(q):
            with torch.autocast("cpu", enabled=False):
                return self._fused(q.float(), k.float(), v.float())
        T, t_total = q.size(2), k.size(2)
        p = self.dropout if self.training else 0.0
        if t_total == T:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True,
                                                  scale=self.scale)
        if T == 1:  # the single newest query may see every cached key: nothing to mask
            return F.scaled_dot_product_attention(q, k, v, dropout_p=p, scale=self.scale)
        # is_causal aligns its triangle to the top-left, wrong when keys precede queries
        mask = causal_mask(T, t_total, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p,
                                              scale=self.scale)

    def step(self, x: Tensor, at: CacheSlot, rope: tuple[Tensor, Tensor] | None,
             ve: Tensor | None, linear: Linear) -> Tensor:
        """`forward` for one token `x` (B, C) in eval mode: its key and value are written at
        `at.slot` of this layer's cache, in place, and its query attends to the slots `at`
        allows. `rope` is the (cos, sin) rows (hs,) of its position; returns (B, C)."""
        nh = self.n_head
        qk, v = self._heads(x, rope, ve, linear)  # (B, 2nh, hs), (B, nh, hs)
        keys, values = at.keys[self.layer_idx], at.values[self.layer_idx]
        keys.index_copy_(2, at.slot, qk[:, nh:].unsqueeze(2))  # (B, nh, 1, hs) at the slot
        values.index_copy_(2, at.slot, v.unsqueeze(2))
        if at.n_keys is not None:
            keys, values = keys[:, :, : at.n_keys], values[:, :, : at.n_keys]
        att = (qk[:, :nh].unsqueeze(2) @ keys.transpose(-2, -1)) * self.scale  # (B, nh, 1, n)
        if at.mask is not None:
            att = att + at.mask
        y = (att.softmax(dim=-1) @ values).view(-1, self.n_embd)  # (B, C): heads side by side
        return self._out(y, linear)


def _cpu_autocast(x: Tensor) -> bool:
    """Whether `x` is computed under a CPU's autocast (a lower precision for matmuls)."""
    return x.device.type == "cpu" and torch.is_autocast_enabled("cpu")

"""Rotary position embeddings (RoPE): the angles of each position and the rotation itself.

Each pair of a head's query (or key) features is rotated by an angle proportional to the
token's position, with one frequency per pair; the dot product of a query rotated by m and a
key rotated by n then depends only on n - m. `rope_rows` turns positions into the two rows
`apply_rope` multiplies by; the model's forward (a whole sequence) and its single-token step
(one position) both rotate through `apply_rope`.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["apply_rope", "rope_angles", "rope_rows"]


def rope_angles(positions: Tensor, head_dim: int, base: float) -> tuple[Tensor, Tensor]:
    """cos and sin (T, head_dim // 2) of the rotary angles for integer `positions` (T,).

    Computed in float64: at positions in the thousands float32 angles would be off by ~1e-4
    rad, and a rolled KV cache would then no longer match recomputation from position 0.
    """
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = positions.to(torch.float64)[:, None] * inv_freq.to(positions.device)[None, :]
    return angles.cos().float(), angles.sin().float()


def rope_rows(positions: Tensor, head_dim: int, base: float) -> tuple[Tensor, Tensor]:
    """The rows (T, head_dim) `apply_rope` multiplies by for `positions` (T,): [cos | cos] and
    [sin | -sin] of their angles."""
    cos, sin = rope_angles(positions, head_dim, base)
    return torch.cat((cos, cos), dim=-1), torch.cat((sin, -sin), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate each pair (x[..., i], x[..., i + hs/2]) of `x` (..., hs) by its position's angle.

    `cos` and `sin` are rows of `rope_rows`, shaped to broadcast against `x` (for example
    (T, 1, hs) for x (B, T, H, hs)). x * cos + (x with its halves swapped) * sin is
    (x1 cos + x2 sin, x2 cos - x1 sin): a query rotated by m and a key rotated by n have a dot
    product that depends only on n - m, which is what makes positions relative.
    """
    if cos.dtype != x.dtype:  # the rows of an autocast forward; a decode step's already match
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.addcmul(x * cos, x.roll(x.size(-1) // 2, dims=-1), sin)

"""Rotary position embeddings (RoPE): the angles of each position and the rotation itself.

Each pair of a head's query (or key) features is rotated by an angle proportional to the
token's position, with one frequency per pair; the dot product of a query rotated by m and a
key rotated by n then depends only on n - m. The model (model.py) rotates whole sequences with
`apply_rope`; the single-token decode step (decode.py) uses the same angles.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["apply_rope", "rope_angles"]


def rope_angles(positions: Tensor, head_dim: int, base: float) -> tuple[Tensor, Tensor]:
    """cos and sin (T, head_dim // 2) of the rotary angles for integer `positions` (T,).

    Computed in float64: at positions in the thousands float32 angles would be off by ~1e-4
    rad, and a rolled KV cache would then no longer match recomputation from position 0.
    """
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = positions.to(torch.float64)[:, None] * inv_freq.to(positions.device)[None, :]
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate each pair (x[i], x[i + hs/2]) of `x` (B, T, H, hs) by its position's angle.

    `cos` and `sin` are (T, hs/2). A query rotated by m and a key rotated by n have a dot
    product that depends only on n - m, which is what makes positions relative.
    """
    cos, sin = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)  # (T, 1, hs/2)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)

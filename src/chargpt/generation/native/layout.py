"""A model's weights in the layout the native loop reads, and how each weight kind is stored.

`stored_weights` is how a weight matrix is kept in each of the `WEIGHT_KINDS` (float32;
bfloat16; int8 with a scale per row). `prepared` copies a model's weights into the C code's
layout: float32 and contiguous, each matrix in its kind, transposed to (in, out) unless it has
`big` weights or more, every shape checked, the whole held in a `structs.Model`. It is made
once per model and layout and reused (a server's requests) while no parameter changes.
"""

from __future__ import annotations

import ctypes
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from chargpt.errors import ConfigError
from chargpt.generation.native.structs import Layer, Linear, Model, Norm

__all__ = ["Prepared", "floats", "prepared", "stored_weights"]


def stored_weights(weight: Tensor, kind: str) -> tuple[Tensor, Tensor | None]:
    """A weight matrix W (out, in) as the C loop stores it for `kind`
    (SamplingSettings.weight_format), and the scales of an int8 matrix: float32; bfloat16 (each
    weight rounded to nearest); or int8 with one scale per row, max |W[j]| / 127, each weight
    rounded to the nearest multiple of it. The loop computes in float32 on these widened
    (times its row's scale, for int8), exactly."""
    weight = weight.to(torch.float32)
    if kind == "float32":
        return weight, None
    if kind == "bfloat16":
        return weight.to(torch.bfloat16), None
    scale = weight.abs().amax(dim=1) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row stays zero
    q = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def floats(t: Tensor | None) -> Any:
    """A float pointer into `t`'s memory (NULL for None), for a struct's field."""
    return None if t is None else ctypes.cast(t.data_ptr(), ctypes.POINTER(ctypes.c_float))


@dataclass
class Prepared:
    """A model's weights for the C loop: the `Model` struct, the array of its layers and the
    tensors they point into, kept alive together."""

    model: Model
    layers: ctypes.Array
    keep: list[Tensor]


# each model's prepared weights, by (weight kind, big-matrix threshold), with the identity and
# version of every parameter they were made from: a server's requests reuse them, and a model
# trained or loaded into since gets new ones
_PREPARED: weakref.WeakKeyDictionary[nn.Module, dict[tuple, tuple[tuple, Prepared]]] = (
    weakref.WeakKeyDictionary())


def prepared(model: nn.Module, kind: str, big: int) -> Prepared:
    """`model`'s weights for the C loop, stored as `kind`, matrices of `big` weights or more by
    rows: made once and reused while no parameter changes."""
    try:
        stamp = tuple((p.data_ptr(), p._version) for p in model.parameters())
    except RuntimeError:  # parameters made in inference mode have no version: never reused
        return _prepare(model, kind, big)
    layouts = _PREPARED.setdefault(model, {})
    made = layouts.get((kind, big))
    if made is not None and made[0] == stamp:
        return made[1]
    weights = _prepare(model, kind, big)
    if len(layouts) >= 2:  # at most two layouts at once (batch 1 and a batch, say)
        layouts.clear()
    layouts[(kind, big)] = (stamp, weights)
    return weights


class _Copies:
    """Copies of a model's tensors in the C code's layout, each shape checked, kept alive in
    `keep`; weight matrices stored as `kind`, by rows from `big` weights on."""

    def __init__(self, kind: str, big: int, n_embd: int) -> None:
        self.kind, self.big, self.n_embd = kind, big, n_embd
        self.keep: list[Tensor] = []

    def array(self, t: Tensor | None, shape: tuple[int, ...],
              transpose: bool = False) -> Tensor | None:
        if t is None:
            return None
        t = t.detach()
        if t.dtype not in (torch.bfloat16, torch.int8):
            t = t.to(torch.float32)
        t = (t.t() if transpose else t).contiguous()
        if tuple(t.shape) != shape:
            raise ConfigError(f"native decode: expected shape {shape}, got {tuple(t.shape)}")
        self.keep.append(t)
        return t

    def floats(self, t: Tensor | None, shape: tuple[int, ...]) -> Any:
        return floats(self.array(t, shape))

    def norm(self, m: nn.Module | None) -> Norm:
        C = self.n_embd
        return Norm(self.floats(getattr(m, "weight", None), (C,)),
                    self.floats(getattr(m, "bias", None), (C,)))

    def linear(self, m: nn.Module | None, n_in: int, n_out: int) -> Linear:
        if m is None:
            return Linear()
        w, scale = stored_weights(m.weight.detach(), self.kind)
        rows = n_in * n_out >= self.big
        w = self.array(w, (n_out, n_in) if rows else (n_in, n_out), transpose=not rows)
        return Linear(w.data_ptr(), self.floats(scale, (n_out,)),
                      self.floats(m.bias, (n_out,)))


def _prepare(model: nn.Module, kind: str, big: int) -> Prepared:
    """Copy `model`'s weights into the C code's layout (see `prepared`)."""
    cfg, tr = model.config, model.transformer
    C, V, H = cfg.n_embd, cfg.vocab_size, cfg.mlp_ratio * cfg.n_embd
    copy = _Copies(kind, big, C)
    layers = []
    for i, block in enumerate(tr.h):
        attn, mlp = block.attn, block.mlp
        if mlp is not None and mlp.c_proj is None and H != C:
            raise ConfigError("native decode: an MLP without projection must be n_embd wide")
        layers.append(Layer(
            ln_1=copy.norm(block.ln_1), c_attn=copy.linear(attn.c_attn, C, 3 * C),
            ve=copy.floats(tr.ve[i].weight if "ve" in tr else None, (V, C)),
            attn_proj=copy.linear(attn.c_proj, C, C),
            ln_2=copy.norm(block.ln_2 if mlp is not None else None),
            c_fc=copy.linear(mlp.c_fc if mlp is not None else None, C, H),
            mlp_proj=copy.linear(mlp.c_proj if mlp is not None else None, H, C)))
    array = (Layer * len(layers))(*layers)
    weights = Model(wte=copy.floats(tr.wte.weight, (V, C)),
                    wpe=copy.floats(tr.wpe.weight if "wpe" in tr else None, (cfg.block_size, C)),
                    ln_f=copy.norm(tr.ln_f), lm_head=copy.linear(model.lm_head, C, V),
                    layers=ctypes.cast(array, ctypes.POINTER(Layer)))
    return Prepared(weights, array, copy.keep)

"""The interface between Python and `native_decode.c`, as one table: ctypes Structures.

Each Structure's `_fields_` is the only list of its fields. `header()` writes the C side from
them (the typedefs, the constants the C code switches on, and `chargpt_layout`, which reports
the C compiler's size and offsets of every struct), and `build.py` compiles `native_decode.c`
with that header, so the two sides cannot drift apart: a field the C code names but the table
lacks fails the build, and `layout()` against `chargpt_layout` catches a compiler that lays a
struct out differently from ctypes.
"""

from __future__ import annotations

import ctypes
from ctypes import POINTER, c_float, c_int32, c_int64, c_void_p

from chargpt.generation.settings import WEIGHT_KINDS

__all__ = ["ACTIVATIONS", "FILL_ERRORS", "MAX_HEAD_DIM", "NORMS", "STRUCTS", "Cache", "Chunk",
           "Config", "Layer", "Linear", "Model", "Norm", "header", "layout"]

NORMS = ("none", "layernorm", "rmsnorm")  # the C code's NORM_* constants, in this order
ACTIVATIONS = ("relu", "relu2", "gelu")  # ACT_*
MAX_HEAD_DIM = 1024  # the C code rotates a head in a buffer of this many floats
# what chargpt_fill returns, -1, -2, ..., for a call it refuses (FILL_* in C), and why: loop.py
# checks every call before it is made, and the C code checks what it can again
FILL_ERRORS = (("BAD_TOKEN", "a token id is outside the vocabulary"),
               ("PAST_POSITIONS", "a position is past the model's learned positions"),
               ("BAD_CHUNK", "the chunk's rows, tokens or positions are outside its arrays"))
_floats = POINTER(c_float)


class Config(ctypes.Structure):
    """A loop's fixed numbers: the model's sizes and wiring, its cache, the way tokens are
    picked."""

    _fields_ = [
        ("n_layer", c_int32), ("n_head", c_int32), ("head_dim", c_int32), ("n_embd", c_int32),
        ("hidden", c_int32),  # the MLP's width
        ("vocab_size", c_int32),
        ("max_len", c_int32),  # positions of the KV cache
        ("n_positions", c_int32),  # rows of Model.wpe (0 without learned positions)
        ("batch", c_int32),  # rows of the KV cache and of the noise
        ("norm", c_int32),  # NORM_*
        ("activation", c_int32),  # ACT_*
        ("qk_norm", c_int32),  # 1: RMSNorm on each head's query and key
        ("weight_format", c_int32),  # W_*: how the weight matrices are stored
        ("big", c_int64),  # weights of a matrix from which it is stored (out, in), read by rows
        ("norm_eps", c_float), ("qk_eps", c_float),
        ("attn_scale", c_float), ("logit_softcap", c_float),  # softcap 0: none
        ("temperature", c_float), ("top_k", c_int32), ("top_p", c_float),  # top_k 0: all
    ]


class Norm(ctypes.Structure):
    """A normalisation's weight and bias (NULL where it has none)."""

    _fields_ = [("weight", _floats), ("bias", _floats)]


class Linear(ctypes.Structure):
    """A weight matrix as `Config.weight_format` stores it, (in, out) below `Config.big`
    weights, else (out, in); the scales of an int8 matrix (one per output); the bias. A NULL
    weight: the model has no such layer."""

    _fields_ = [("weight", c_void_p), ("scale", _floats), ("bias", _floats)]


class Layer(ctypes.Structure):
    """A block's weights, GPT-2's names (`ve`: the value embeddings, (vocab, n_embd))."""

    _fields_ = [("ln_1", Norm), ("c_attn", Linear), ("ve", _floats), ("attn_proj", Linear),
                ("ln_2", Norm), ("c_fc", Linear), ("mlp_proj", Linear)]


class Model(ctypes.Structure):
    """A model's weights: embeddings (`wpe` NULL without learned positions), the final norm
    and head, and `n_layer` Layers."""

    _fields_ = [("wte", _floats), ("wpe", _floats), ("ln_f", Norm), ("lm_head", Linear),
                ("layers", POINTER(Layer))]


class Cache(ctypes.Structure):
    """The KV cache: per layer, the keys and the values (batch, n_head, max_len, head_dim)."""

    _fields_ = [("k", POINTER(_floats)), ("v", POINTER(_floats))]


class Chunk(ctypes.Structure):
    """One call: sample seq[row, start:end] (seq is (batch, stride)) for rows row0 <= row <
    row1, the cache's next position being `pos`; `rot` holds the rotary rows (end - start, 2,
    head_dim) (NULL without rotary positions), `noise` the draws' Exp(1) noise (end - start,
    batch, vocab_size) (NULL: greedy); `work` is chargpt_work_size floats of this call's own;
    `threads` split each big product."""

    _fields_ = [("seq", POINTER(c_int64)), ("stride", c_int64), ("start", c_int64),
                ("end", c_int64), ("pos", c_int64), ("rot", _floats), ("noise", _floats),
                ("work", _floats), ("row0", c_int32), ("row1", c_int32), ("threads", c_int32)]


STRUCTS = (Config, Norm, Linear, Layer, Model, Cache, Chunk)  # each before its first use
_SCALARS = {c_int32: "int32_t", c_int64: "int64_t", c_float: "float", c_void_p: "const void *"}


def _declaration(name: str, ctype: type) -> str:
    """The C declaration of a field `name` of type `ctype` (a scalar, a Structure, or a pointer
    to either)."""
    if ctype in _SCALARS:
        spelled = _SCALARS[ctype]
        return f"{spelled}{name}" if spelled.endswith("*") else f"{spelled} {name}"
    if issubclass(ctype, ctypes.Structure):
        return f"{ctype.__name__} {name}"
    if issubclass(ctype, ctypes._Pointer):
        return _declaration(f"*{name}", ctype._type_)
    raise TypeError(f"no C spelling for {ctype.__name__}")


def _enum(prefix: str, names: tuple[str, ...]) -> str:
    return "enum { " + ", ".join(f"{prefix}{n.upper()}" for n in names) + " };"


def layout() -> list[int]:
    """Each struct's size, then its fields' offsets, in the order of STRUCTS: what ctypes
    reads and writes, to be compared with what the C compiler made (`chargpt_layout`)."""
    return [n for s in STRUCTS
            for n in (ctypes.sizeof(s), *(getattr(s, f).offset for f, _ in s._fields_))]


def header() -> str:
    """The C header `native_decode.c` is compiled with."""
    lines = ["/* Generated from chargpt/generation/native/structs.py, the one table of the",
             " * interface between Python and native_decode.c: edit that file, not this. */",
             "#ifndef CHARGPT_STRUCTS_H", "#define CHARGPT_STRUCTS_H",
             "#include <stddef.h>", "#include <stdint.h>", "",
             f"#define MAX_HEAD_DIM {MAX_HEAD_DIM}", _enum("NORM_", NORMS),
             _enum("ACT_", ACTIVATIONS), _enum("W_", WEIGHT_KINDS),
             "enum { " + ", ".join(f"FILL_{name} = {-i}" for i, (name, _) in
                                   enumerate(FILL_ERRORS, 1)) + " };", ""]
    for struct in STRUCTS:
        lines += ["typedef struct {",
                  *(f"    {_declaration(f, t)};" for f, t in struct._fields_),
                  f"}} {struct.__name__};", ""]
    sizes = [f"sizeof({s.__name__})" for s in STRUCTS]
    offsets = [[f"offsetof({s.__name__}, {f})" for f, _ in s._fields_] for s in STRUCTS]
    entries = [x for size, fields in zip(sizes, offsets, strict=True) for x in (size, *fields)]
    lines += ["/* out[:n] = layout() of structs.py as this compiler lays the structs out; the",
              " * number of entries */",
              "int64_t chargpt_layout(int64_t *out, int64_t n)", "{",
              "    const int64_t entries[] = {",
              *(f"        {e}," for e in entries),
              "    };",
              "    const int64_t count = sizeof entries / sizeof entries[0];",
              "    for (int64_t i = 0; i < n && i < count; i++) out[i] = entries[i];",
              "    return count;", "}", "#endif", ""]
    return "\n".join(lines)

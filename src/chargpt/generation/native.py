"""The native decode loop: `native_decode.c` built with this machine's C compiler, then called.

At chargpt's sizes one token is well under a megaflop, so a framework's per-operation cost, not
arithmetic, decides how fast text comes out: the eager step runs dozens of small operators per
token, torch.compile's kernels still leave most of the time outside the arithmetic. This module
compiles the C loop once per machine (about a second; `$CC`, else cc, gcc or clang, tuned with
`-march=native`), keeps the library in chargpt's cache directory under a name that hashes the
source, the compiler, its flags and the CPU, and loads it with ctypes. `NativeLoop` holds a
model's weights in the layout the C code reads (float32, contiguous, small matrices transposed) and
samples runs of tokens in one call each, sampling included. Every array's shape is checked here
before a pointer is handed over. `available()` says whether the library could be built, and
why not.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from chargpt.generation.settings import WEIGHT_KINDS, SamplingSettings

if TYPE_CHECKING:
    from chargpt.model.kv_cache import KVCache

__all__ = ["NativeLoop", "Unavailable", "available", "dequantized", "library",
           "library_dir", "stored_weights", "supports"]

SOURCE = Path(__file__).with_name("native_decode.c")
# flag sets tried in order: tuned for this CPU (gcc/clang on x86, Linux on ARM; Apple's clang on
# ARM), with OpenMP where the compiler has it (macOS's clang does not), then portable
_TUNINGS = (("-march=native", "-fopenmp"), ("-march=native",), ("-mcpu=native", "-fopenmp"),
            ("-mcpu=native",), ("-fopenmp",), ())
_BASE_FLAGS = ("-O3", "-fPIC", "-shared", "-fno-math-errno", "-ffp-contract=fast", "-std=c99")
_MAX_HEAD_DIM = 1024  # the C code rotates a head in a buffer of this many floats
# weights of a matrix past which it outgrows the caches (512 KB): when a call decodes one
# sequence, the C code reads such a matrix as it is, row by row in memory order, split over
# threads (1.5x faster than transposed there); otherwise it reads every matrix transposed,
# the layout in which a block of weights serves many sequences while it is cached
BIG = 1 << 17
_NEVER = 2**31 - 1
# what SamplingSettings.weight_format names: the kinds of weight matrix the C code reads, in the
# order of its W_* constants

# order of the C code's dims[] and params[] (native_decode.c)
_DIMS = ("layers", "heads", "head_dim", "embd", "hidden", "vocab", "norm", "act", "qk_norm",
         "rope", "wpe", "max_len", "batch", "top_k", "big", "weights")
_NORMS = {"none": 0, "layernorm": 1, "rmsnorm": 2}
_ACTS = {"relu": 0, "relu2": 1, "gelu": 2}


class Unavailable(RuntimeError):
    """The native library cannot be built or loaded here; the message says why."""


def _compiler() -> str | None:
    """The C compiler: `$CC` (the usual way to choose one), else the first of cc, gcc, clang."""
    cc = os.environ.get("CC")
    if cc:
        return shutil.which(cc)
    return next((p for p in map(shutil.which, ("cc", "gcc", "clang")) if p), None)


def _cpu_identity() -> str:
    """What a library tuned with -march=native depends on: the machine and its CPU features
    (a home directory shared by different machines keeps one library per CPU)."""
    ident = [platform.machine(), platform.processor()]
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            ident += sorted({line for line in f if line.startswith(("flags", "Features",
                                                                    "model name"))})
    except OSError:
        pass
    return "\n".join(ident)


def _build(cc: str, out_dir: Path) -> Path:
    """Compile the source into `out_dir` (kept across runs); returns the library's path."""
    source = SOURCE.read_bytes()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True,
                             timeout=60).stdout
    errors = []
    for tuning in _TUNINGS:
        flags = (*_BASE_FLAGS, *tuning)
        key = hashlib.sha256(b"\0".join(
            [source, cc.encode(), version.encode(), " ".join(flags).encode(),
             _cpu_identity().encode()])).hexdigest()[:20]
        path = out_dir / f"native_decode-{key}.so"
        if path.exists():
            return path
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
            built = Path(tmp) / "lib.so"
            run = subprocess.run([cc, *flags, "-o", str(built), str(SOURCE), "-lm"],
                                 capture_output=True, text=True, timeout=300)
            if run.returncode == 0:
                os.replace(built, path)  # atomic: a concurrent build writes the same bytes
                return path
        errors.append((run.stderr.strip().splitlines() or ["no message"])[-1])
    raise Unavailable(f"{Path(cc).name} could not build it: {errors[-1]}")


def library_dir() -> Path:
    """Where built libraries are kept: `native/` in chargpt's cache directory."""
    from chargpt.data.datasets import cache_dir

    return cache_dir() / "native"


@functools.lru_cache(maxsize=1)
def _load() -> ctypes.CDLL | Unavailable:
    """The library, or why it cannot be had (kept, so a failed build is tried once)."""
    cc = _compiler()
    if cc is None:
        return Unavailable("no C compiler found (install one, or name it in $CC)")
    try:
        lib = ctypes.CDLL(str(_build(cc, library_dir())))
    except Unavailable as e:
        return e
    except (OSError, subprocess.SubprocessError) as e:
        return Unavailable(f"{type(e).__name__}: {e}")
    i32p, f32p, i64p = (ctypes.POINTER(ctypes.c_int32), ctypes.POINTER(ctypes.c_float),
                        ctypes.POINTER(ctypes.c_int64))
    lib.chargpt_work_size.argtypes, lib.chargpt_work_size.restype = [i32p], ctypes.c_int64
    lib.chargpt_fill.argtypes = [i32p, f32p, ctypes.POINTER(ctypes.c_void_p), i64p,
                                 ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                 f32p, f32p, f32p, ctypes.c_int32, ctypes.c_int32,
                                 ctypes.c_int32]
    lib.chargpt_fill.restype = ctypes.c_int
    return lib


def library() -> ctypes.CDLL:
    """The loaded native library, built on first use; `Unavailable` says why it cannot be."""
    lib = _load()
    if isinstance(lib, Unavailable):
        raise Unavailable(str(lib))
    return lib


def available() -> tuple[bool, str]:
    """Whether the native library can be used here, and if not, why."""
    try:
        library()
    except Unavailable as e:
        return False, str(e)
    return True, ""


def supports(model: nn.Module) -> bool:
    """Whether the C loop computes this model: a float32 GPT on the CPU with the fast step's
    wiring (pre-norm or none, residuals) and heads the C code's buffers hold."""
    if not model.capabilities().fast_decode:
        return False
    param = next(model.parameters())
    return (param.device.type == "cpu" and param.dtype == torch.float32
            and model.config.head_dim <= _MAX_HEAD_DIM)


@functools.lru_cache(maxsize=1)
def _pool() -> ThreadPoolExecutor:
    """The threads that sample a batch's other rows, shared by every loop."""
    return ThreadPoolExecutor(max(1, (os.cpu_count() or 1) - 1), thread_name_prefix="chargpt")


def stored_weights(weight: Tensor, kind: str) -> tuple[Tensor, Tensor | None]:
    """A weight matrix W (out, in) as the C loop stores it for `kind`
    (SamplingSettings.weight_format), and the scales of an int8 matrix: float32; bfloat16
    (each weight rounded to nearest); or int8 with one scale per row, max |W[j]| / 127, each
    weight rounded to the nearest multiple of it. The loop computes with `dequantized(...)` of
    these, exactly."""
    weight = weight.to(torch.float32)
    if kind == "float32":
        return weight, None
    if kind == "bfloat16":
        return weight.to(torch.bfloat16), None
    scale = weight.abs().amax(dim=1) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row stays zero
    q = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantized(weight: Tensor, kind: str) -> Tensor:
    """The float32 weights the C loop computes with when it stores `weight` as `kind`."""
    stored, scale = stored_weights(weight, kind)
    return stored.to(torch.float32) if scale is None else stored.to(torch.float32) * scale[:, None]


def _ptr(t: Tensor | None, dtype: type = ctypes.c_float):
    return None if t is None else ctypes.cast(t.data_ptr(), ctypes.POINTER(dtype))


@dataclass
class _Weights:
    """A model's arrays in the C code's layout: pointers to the global ones and to each layer's
    (in the order of native_decode.c's G_* and L_* constants, the cache's two left out), and
    the tensors they point into, kept alive."""

    globals: list[int | None]
    layers: list[list[int | None]]
    keep: list[Tensor]


# each model's prepared weights, by (weight kind, big-matrix threshold), with the identity and
# version of every parameter they were made from: a server's requests reuse them, and a model
# trained or loaded into since gets new ones
_PREPARED: weakref.WeakKeyDictionary[nn.Module, dict[tuple, tuple[tuple, _Weights]]] = (
    weakref.WeakKeyDictionary())


def _prepared(model: nn.Module, kind: str, big: int) -> _Weights:
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


def _prepare(model: nn.Module, kind: str, big: int) -> _Weights:
    """Copy `model`'s weights into the C code's layout (see `_prepared`)."""
    cfg, tr = model.config, model.transformer
    C, V, H = cfg.n_embd, cfg.vocab_size, cfg.mlp_ratio * cfg.n_embd
    keep: list[Tensor] = []

    def arr(t: Tensor | None, shape: tuple[int, ...], transpose: bool = False):
        if t is None:
            return None
        t = t.detach()
        if t.dtype not in (torch.bfloat16, torch.int8):
            t = t.to(torch.float32)
        t = (t.t() if transpose else t).contiguous()
        if tuple(t.shape) != shape:
            raise ValueError(f"native decode: expected shape {shape}, got {tuple(t.shape)}")
        keep.append(t)
        return t.data_ptr()

    def norm(m: nn.Module | None) -> tuple[int | None, int | None]:
        w, b = getattr(m, "weight", None), getattr(m, "bias", None)
        return arr(w, (C,)), arr(b, (C,))

    def linear(m: nn.Module | None, n_in: int, n_out: int) -> tuple[int | None, ...]:
        """Pointers to the weights, their int8 scales (or None) and the bias."""
        if m is None:
            return None, None, None
        w, scale = stored_weights(m.weight.detach(), kind)
        rows = n_in * n_out >= big
        return (arr(w, (n_out, n_in) if rows else (n_in, n_out), transpose=not rows),
                arr(scale, (n_out,)), arr(m.bias, (n_out,)))

    globals_ = [arr(tr.wte.weight, (V, C)),
                arr(tr.wpe.weight, (cfg.block_size, C)) if "wpe" in tr else None,
                *norm(tr.ln_f), *linear(model.lm_head, C, V)]
    layers = []
    for layer, block in enumerate(tr.h):
        attn, mlp = block.attn, block.mlp
        if mlp is not None and mlp.c_proj is None and H != C:
            raise ValueError("native decode: an MLP without projection must be n_embd wide")
        layers.append([*norm(block.ln_1), *linear(attn.c_attn, C, 3 * C),
                       arr(tr.ve[layer].weight, (V, C)) if "ve" in tr else None,
                       *linear(attn.c_proj, C, C),
                       *(norm(block.ln_2) if mlp is not None else (None, None)),
                       *linear(mlp.c_fc if mlp is not None else None, C, H),
                       *linear(mlp.c_proj if mlp is not None else None, H, C)])
    return _Weights(globals_, layers, keep)


class NativeLoop:
    """A model's decode loop in C, for one KV cache and one way of picking tokens.

    The weights are copied into the C code's layout, the weight matrices as
    `settings.weight_format` says (`stored_weights`), once per model and layout while no
    parameter changes (`_prepared`); the cache's tensors are shared with the model's cached forward,
    which fills them from the prompt."""

    def __init__(self, model: nn.Module, cache: KVCache, settings: SamplingSettings) -> None:
        if not supports(model):
            raise ValueError("this model has no native decode loop (see native.supports)")
        self.lib, self.cache = library(), cache
        cfg, tr = model.config, model.transformer
        C, V, T = cfg.n_embd, cfg.vocab_size, cache.max_len
        H, batch = cfg.mlp_ratio * C, cache.k[0].size(0)
        # rows never interact: with several threads, each samples its share of the batch (the
        # C call releases the GIL), so --num-samples N uses every core torch is allowed; a
        # share's large products are split over the threads left over (batch 1, big models)
        threads = max(1, torch.get_num_threads())
        shares = min(threads, batch)
        self._rows = [(batch * i // shares, batch * (i + 1) // shares) for i in range(shares)]
        self._threads = max(1, threads // shares)
        big = BIG if batch == shares else _NEVER  # one sequence per call: big matrices by rows
        weights = _prepared(model, settings.weight_format, big)
        norm_kind = "none" if cfg.norm == "none" else cfg.norm_type
        ptrs = list(weights.globals)
        for layer, layer_ptrs in enumerate(weights.layers):
            for cache_t in (cache.k[layer], cache.v[layer]):
                expected = (batch, cfg.n_head, T, cfg.head_dim)
                if (tuple(cache_t.shape) != expected or cache_t.dtype != torch.float32
                        or not cache_t.is_contiguous()):
                    raise ValueError("native decode: the KV cache is not float32 "
                                     f"{expected} and contiguous")
            ptrs += [*layer_ptrs, cache.k[layer].data_ptr(), cache.v[layer].data_ptr()]
        dims = dict(layers=cfg.n_layer, heads=cfg.n_head, head_dim=cfg.head_dim, embd=C,
                    hidden=H, vocab=V, norm=_NORMS[norm_kind], act=_ACTS[cfg.activation],
                    qk_norm=int(cfg.qk_norm), rope=int(model.use_rope), wpe=int("wpe" in tr),
                    max_len=T, batch=batch, top_k=settings.top_k or 0, big=big,
                    weights=WEIGHT_KINDS.index(settings.weight_format))
        eps = float(getattr(tr.ln_f, "eps", None) or torch.finfo(torch.float32).eps)
        params = [eps, torch.finfo(torch.float32).eps, float(tr.h[0].attn.scale),
                  float(cfg.logit_softcap), float(settings.temperature),
                  float(settings.top_p if settings.top_p is not None else 1.0)]
        self._dims = torch.tensor([dims[k] for k in _DIMS], dtype=torch.int32)
        self._params = torch.tensor(params, dtype=torch.float32)
        self._ptrs = (ctypes.c_void_p * len(ptrs))(*ptrs)
        size = self.lib.chargpt_work_size(_ptr(self._dims, ctypes.c_int32))
        self._work = [torch.empty(size) for _ in self._rows]
        self._keep, self.batch, self.vocab = weights, batch, V
        self.rope, self.head_dim = model.use_rope, cfg.head_dim
        self.positions = None if cache.rolling else T  # learned rows / slots before a refill

    def fill(self, seq: Tensor, start: int, end: int, rot: Tensor | None,
             noise: Tensor | None) -> None:
        """Sample seq[:, start:end] (start >= 1) token by token; the cache advances.

        `rot` (end - start, 2, head_dim) holds the rotary rows of the cache's next positions
        (rotary models); `noise` (end - start, B, V) the draws' Exp(1) noise, None for greedy."""
        n = end - start
        if n <= 0:
            return
        if (seq.dtype != torch.long or seq.device.type != "cpu" or not seq.is_contiguous()
                or seq.size(0) != self.batch or not 1 <= start <= end <= seq.size(1)):
            raise ValueError("native decode: seq must be a contiguous (batch, n) long tensor "
                             "holding the positions asked for")
        if self.positions is not None and self.cache.pos + n > self.positions:
            raise ValueError("native decode: the cache is full; refill it first")
        if self.rope:
            if rot is None or tuple(rot.shape) != (n, 2, self.head_dim):
                raise ValueError("native decode: one rotary row per token is needed")
            rot = rot.to(torch.float32).contiguous()
        else:
            rot = None
        if noise is not None:
            if tuple(noise.shape) != (n, self.batch, self.vocab):
                raise ValueError(f"native decode: noise must be {(n, self.batch, self.vocab)}")
            noise = noise.to(torch.float32).contiguous()
        args = (_ptr(self._dims, ctypes.c_int32), _ptr(self._params), self._ptrs,
                _ptr(seq, ctypes.c_int64), seq.size(1), start, end, self.cache.pos, _ptr(rot),
                _ptr(noise))

        def run(part: int) -> int:
            return self.lib.chargpt_fill(*args, _ptr(self._work[part]), *self._rows[part],
                                         self._threads)

        others = [_pool().submit(run, part) for part in range(1, len(self._rows))]
        status = [run(0), *(f.result() for f in others)]
        if any(status):
            raise ValueError("native decode: a token id is outside the vocabulary")
        self.cache.advance(n)

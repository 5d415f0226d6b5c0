"""The native loop's entry point fuzzed from Python: `NativeLoop(model, cache, settings)` and
its `fill(seq, start, end, rot, noise)` with random shapes, dtypes, lengths, positions and
caches, mostly right and each now and then wrong. Every call must work (and write tokens of the
vocabulary) or raise a `ChargptError`; anything else, or a crash, is a failure.

test_native_fuzz.py runs `fuzz` in its own process, and runs this file as a script in a
subprocess that preloads AddressSanitizer's runtime:

    python native_fuzz.py CACHE_DIR EXAMPLES [overflow]

which builds the loop with `-fsanitize=address` (the flags injected with monkeypatch) into
CACHE_DIR and fuzzes that library, so that a read or write outside any array the C code is
handed ends the process with ASan's report. `overflow` instead makes one call that reads past
the table of learned positions (the C code lied to about its length), to show that the
sanitizer is watching.
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent))
from test_sampling import V, rope_gpt, tiny_gpt  # noqa: E402

from chargpt.errors import ChargptError  # noqa: E402
from chargpt.generation.native import build, layout, loop, structs  # noqa: E402
from chargpt.generation.settings import SamplingSettings  # noqa: E402
from chargpt.model.kv_cache import KVCache  # noqa: E402

SANITIZE = ("-fsanitize=address", "-fno-omit-frame-pointer", "-g")


def models() -> list[torch.nn.Module]:
    """Learned positions (block 12), rotary positions with value embeddings, no positions."""
    return [tiny_gpt().eval(),
            rope_gpt(value_embeds=True, logit_softcap=5.0).eval(),
            tiny_gpt(pos_emb="none", mlp=False, norm="none", tie_weights=True).eval()]


def near(data: st.DataObject, value: int, low: int = 0) -> int:
    """Mostly `value`; one draw in five, a number within 2 of it (at least `low`)."""
    if data.draw(st.integers(0, 4)):
        return value
    return data.draw(st.integers(max(low, value - 2), value + 2))


def draw_cache(data: st.DataObject, model: torch.nn.Module) -> KVCache:
    """A KV cache, mostly the model's shape; its position anywhere near its length."""
    cfg = model.config
    block = cfg.block_size
    max_len = near(data, data.draw(st.sampled_from([block, block, 2 * block, 1])))
    batch = near(data, data.draw(st.integers(1, 3)))
    dtype = torch.float64 if not data.draw(st.integers(0, 9)) else torch.float32
    cache = KVCache(near(data, cfg.n_layer), batch, near(data, cfg.n_head),
                    near(data, cfg.head_dim), max_len, dtype=dtype,
                    rolling=data.draw(st.booleans()))
    if cache.k and not data.draw(st.integers(0, 9)):  # one layer laid out otherwise
        cache.k[-1] = torch.zeros(tuple(cache.k[-1].shape)[::-1], dtype=dtype).permute(3, 2, 1, 0)
    if cache.v and not data.draw(st.integers(0, 19)):
        cache.v.pop()
    cache.pos = data.draw(st.integers(-1, 3 * max_len + 1) | st.integers(0, max(0, max_len - 1)))
    return cache


def draw_seq(data: st.DataObject, batch: int) -> torch.Tensor:
    """Token ids, mostly (batch, length) of the vocabulary."""
    length = data.draw(st.integers(0, 30))
    shape = data.draw(st.sampled_from([(near(data, batch), length)] * 4 + [(length,),
                                                                        (batch, length, 1)]))
    high = V if data.draw(st.integers(0, 9)) else V + 3
    seq = torch.randint(-1 if high > V else 0, high, shape)
    if not data.draw(st.integers(0, 9)):
        seq = seq.to(torch.int32)
    if seq.dim() == 2 and not data.draw(st.integers(0, 9)):
        seq = seq.t().contiguous().t()  # the same values, not contiguous
    return seq


def draw_rot(data: st.DataObject, n: int, head_dim: int, rotary: bool) -> torch.Tensor | None:
    """Rotary rows (n, 2, head_dim), mostly, for a rotary model; mostly None for another."""
    if not rotary and data.draw(st.integers(0, 4)):
        return None
    if data.draw(st.integers(0, 4)):
        return torch.rand(near(data, n), 2, near(data, head_dim))
    return torch.rand(near(data, n), near(data, head_dim))


def one_case(data: st.DataObject, model: torch.nn.Module, counts: dict[str, int]) -> None:
    """A loop made for a drawn cache and settings, then a few fills; each works or refuses."""
    cache = draw_cache(data, model)
    try:
        settings = SamplingSettings(temperature=data.draw(st.sampled_from([0.0, 0.8, 1.0])),
                                    top_k=data.draw(st.sampled_from([None, 1, 5, V + 4])),
                                    weight_format=data.draw(st.sampled_from(["float32", "int8"])))
        native_loop = loop.NativeLoop(model, cache, settings)
    except ChargptError:
        counts["refused"] += 1
        return
    batch, head_dim = cache.k[0].size(0), model.config.head_dim
    for _ in range(data.draw(st.integers(1, 3))):
        seq = draw_seq(data, batch)
        length = seq.size(-1)
        start = data.draw(st.integers(1, max(1, length)) | st.integers(-1, length + 2))
        end = data.draw(st.integers(start, max(start, length)) | st.integers(start - 1, length + 2))
        n = max(0, end - start)
        rot = draw_rot(data, n, head_dim, model.use_rope)
        noise = None
        if data.draw(st.booleans()):
            noise = torch.empty(near(data, n), near(data, batch), near(data, V)).exponential_()
        try:
            native_loop.fill(seq, start, end, rot, noise)
        except ChargptError:
            counts["refused"] += 1
            continue
        counts["worked"] += 1
        if n:
            written = seq[:, start:end]
            assert bool(((written >= 0) & (written < V)).all()), written


def fuzz(examples: int, seed: int = 0) -> dict[str, int]:
    """`examples` drawn cases over the three models; how many fills worked and were refused."""
    counts = {"worked": 0, "refused": 0}
    cases = models()

    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.data())
    def check(data: st.DataObject) -> None:
        torch.manual_seed(seed)
        one_case(data, data.draw(st.sampled_from(cases)), counts)

    check()
    return counts


def overflow() -> None:
    """One call that reads the row just past the table of learned positions: the C code is
    told the table is longer than it is, and the Python checks are passed by."""
    model = tiny_gpt().eval()
    block = model.config.block_size
    cache = KVCache.for_model(model, 1)
    native_loop = loop.NativeLoop(model, cache, SamplingSettings())
    native_loop._config.n_positions = 10 * block
    seq = torch.zeros(1, 2, dtype=torch.long)
    work = torch.empty(native_loop.lib.chargpt_work_size(ctypes.byref(native_loop._config)))
    chunk = structs.Chunk(seq=ctypes.cast(seq.data_ptr(), ctypes.POINTER(ctypes.c_int64)),
                          stride=2, start=1, end=2, pos=block, work=layout.floats(work), row0=0,
                          row1=1, threads=1)
    native_loop.lib.chargpt_fill(ctypes.byref(native_loop._config),
                                 ctypes.byref(native_loop._weights.model),
                                 ctypes.byref(native_loop._cache), ctypes.byref(chunk))


def main(cache_dir: str, examples: int, what: str = "fuzz") -> None:
    """Build the loop with AddressSanitizer into `cache_dir`, then fuzz it (or overflow)."""
    os.environ.pop("LD_PRELOAD", None)  # for this process only: not for the compiler it runs
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CHARGPT_CACHE", cache_dir)
        mp.setattr(build, "_BASE_FLAGS", (*build._BASE_FLAGS, *SANITIZE))
        build._load.cache_clear()
        print("library:", build.library()._name, flush=True)
        if what == "overflow":
            overflow()
        else:
            print("calls:", fuzz(examples), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), *sys.argv[3:])

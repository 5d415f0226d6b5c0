"""The native C decode loop against its reference, the torch step: the same tokens for every
wiring the loop computes (greedy, temperature, top-k, top-p; past the block, rolled or
refilled), a batch split over threads against one thread, bfloat16 and int8 weights against
float32 decoding of the rounded weights, the library built once and checked, and bad input
refused before the C code. These need a C compiler; what happens without one, and what needs
none, is test_native_fallback.py."""

from __future__ import annotations

import ctypes

import pytest
import torch
from conftest import train_serve_run
from test_native_fallback import both, dequantized
from test_sampling import gen, prompt, rope_gpt, tiny_gpt

import chargpt.generation.decode as decode_module
from chargpt.cli.commands import main
from chargpt.errors import ConfigError
from chargpt.generation.loop import generate
from chargpt.generation.native import build, layout, loop, structs
from chargpt.generation.settings import SMALLEST, SamplingSettings
from chargpt.model.kv_cache import KVCache

if not build.available()[0]:
    pytest.skip(f"no native decode loop here ({build.available()[1]}): install a C compiler "
                "(gcc or clang, or name one in $CC) to test it", allow_module_level=True)

WIRINGS = [
    dict(),  # the lecture's GPT: LayerNorm, GELU, learned positions, a refilled cache
    dict(bias=True, activation="relu"),
    dict(pos_emb="rope", qk_norm=True, activation="relu2", norm_type="rmsnorm", bias=False),
    dict(pos_emb="rope", value_embeds=True, logit_softcap=5.0, head_bias=True, qkv_bias=False),
    dict(pos_emb="none", mlp=False, norm="none", tie_weights=True),
    dict(attn_proj=False, mlp_proj=False, mlp_ratio=1, attn_scale="embd", init="torch"),
]
PICKS = [dict(temperature=0.0), dict(temperature=1.0), dict(temperature=0.8, top_k=7),
         dict(temperature=1.2, top_p=0.85), dict(top_k=20, top_p=0.9)]


@pytest.mark.parametrize("overrides", WIRINGS)
def test_native_loop_samples_what_the_torch_step_samples(overrides):
    model = tiny_gpt(**overrides).eval()
    assert loop.supports(model)
    n = 3 * model.config.block_size  # past the block: the cache rolls or is refilled
    for batch in (1, 3):
        idx = prompt(batch, 3)
        for options in PICKS:
            got, expected = both(model, idx, n, **options)
            assert torch.equal(got, expected), (batch, options)


def test_the_smallest_temperature_and_top_p_draw_the_greedy_text_in_both_loops():
    """Sampled in float32, a temperature or top_p near float32's smallest numbers once gave
    token 0 over and over; the smallest SamplingSettings accepts gives the argmax instead."""
    model = rope_gpt(n_layer=2, n_head=2, n_embd=32, block_size=16, bias=False).eval()
    idx = prompt(2, 3)
    greedy, _ = both(model, idx, 40, temperature=0.0)
    for options in (dict(temperature=SMALLEST), dict(top_p=SMALLEST)):
        got, expected = both(model, idx, 40, **options)
        assert torch.equal(got, greedy) and torch.equal(expected, greedy), options


def test_default_model_matches_the_torch_step_over_a_long_run():
    # the default wiring at a size where sums are long enough for rounding to show, if it did
    model = rope_gpt(n_layer=3, n_head=4, n_embd=96, block_size=64, bias=False).eval()
    got, expected = both(model, prompt(2, 5), 400, temperature=1.0)
    assert torch.equal(got, expected)


def test_a_batch_split_over_threads_is_the_batch_on_one_thread():
    model = rope_gpt().eval()
    idx = prompt(5, 3)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = generate(model, idx, 60, generator=gen(3), temperature=0.9)
        torch.set_num_threads(3)
        native_loop = loop.NativeLoop(model, KVCache.for_model(model, 5), SamplingSettings())
        assert len(native_loop._rows) == 3  # three shares of the batch: 0-1, 1-3, 3-5
        split = generate(model, idx, 60, generator=gen(3), temperature=0.9)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(split, one)


def test_a_big_product_split_over_threads_is_the_product_on_one_thread():
    # 192 wide: the MLP's matrices hold 147,456 weights, past the size the C code splits by
    # columns over OpenMP threads at batch 1
    model = rope_gpt(n_embd=192, n_head=4, n_layer=1, block_size=16).eval()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = generate(model, prompt(1, 3), 40, generator=gen(3), temperature=0.9)
        torch.set_num_threads(2)
        native_loop = loop.NativeLoop(model, KVCache.for_model(model, 1), SamplingSettings())
        assert native_loop._threads == 2
        split = generate(model, prompt(1, 3), 40, generator=gen(3), temperature=0.9)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(split, one)
    assert torch.equal(split, generate(model, prompt(1, 3), 40, generator=gen(3),
                                       temperature=0.9, native=False))


def test_weights_are_prepared_once_per_model_until_a_parameter_changes(monkeypatch):
    made = []
    prepare = layout._prepare
    monkeypatch.setattr(layout, "_prepare", lambda *a: made.append(a[1:]) or prepare(*a))
    model = rope_gpt().eval()
    first = generate(model, prompt(1, 3), 30, generator=gen(4))
    assert torch.equal(generate(model, prompt(1, 3), 30, generator=gen(4)), first)
    generate(model, prompt(1, 3), 30, generator=gen(4), weight_format="int8")
    assert [kind for kind, _ in made] == ["float32", "int8"]  # one each, the second call reused
    with torch.no_grad():
        model.lm_head.weight.mul_(-1.0)  # trained further: the next call must see it
    flipped = generate(model, prompt(1, 3), 30, generator=gen(4))
    assert len(made) == 3 and not torch.equal(flipped, first)
    assert torch.equal(flipped, generate(model, prompt(1, 3), 30, generator=gen(4),
                                         native=False))
    with torch.inference_mode():
        fresh = rope_gpt().eval()  # inference tensors have no version: prepared every time
    for _ in range(2):
        generate(fresh, prompt(1, 3), 5, generator=gen(4))
    assert len(made) == 5


def test_the_library_is_built_once_and_reused(fresh_library):
    lib = build.library()
    built = list(fresh_library.glob("native_decode-*.so"))
    assert len(built) == 1 and lib._name == str(built[0])
    build._load.cache_clear()
    mtime = built[0].stat().st_mtime_ns
    assert build.library()._name == str(built[0])
    assert built[0].stat().st_mtime_ns == mtime  # loaded again, not rebuilt


def test_the_c_structs_are_the_ctypes_table():
    # the header is written from structs.py's table: every struct and field of it is declared
    # there, and the compiler lays each out where ctypes reads and writes it
    text = structs.header()
    for struct in structs.STRUCTS:
        assert f"}} {struct.__name__};" in text
        assert all(f"offsetof({struct.__name__}, {field})" in text
                   for field, _ in struct._fields_)
    assert build.compiled_layout(build.library()) == structs.layout()
    assert len(structs.layout()) == sum(1 + len(s._fields_) for s in structs.STRUCTS)


def test_a_library_whose_structs_disagree_with_ctypes_is_refused(fresh_library, monkeypatch):
    build.library()  # built and loaded as it is
    build._load.cache_clear()
    swapped = structs.layout()
    swapped[1], swapped[2] = swapped[2], swapped[1]  # Config's first two fields, swapped
    monkeypatch.setattr(build, "layout", lambda: swapped)
    ok, why = build.available()
    assert not ok and "lays out the loop's structs differently from ctypes" in why


def test_bad_input_never_reaches_the_c_code():
    model = rope_gpt().eval()
    cache = KVCache.for_model(model, 2)
    with torch.no_grad():
        model(prompt(2, 3), kv_cache=cache)
    native_loop = loop.NativeLoop(model, cache, SamplingSettings())
    seq = torch.zeros(2, 10, dtype=torch.long)
    rot = decode_module.rotation_table(model.config, 20, torch.device("cpu"), torch.float32)
    seq[1, 3] = 10_000  # a token id the model does not have
    with pytest.raises(ConfigError, match="outside the vocabulary"):
        native_loop.fill(seq, 4, 6, rot[3:5], None)
    with pytest.raises(ConfigError, match="one rotary row per token"):
        native_loop.fill(seq, 4, 6, rot[3:4], None)
    with pytest.raises(ConfigError, match="noise must be"):
        native_loop.fill(seq, 4, 6, rot[3:5], torch.ones(2, 1, 65))
    with pytest.raises(ConfigError, match="contiguous"):
        native_loop.fill(seq[:1], 4, 6, rot[3:5], None)
    with pytest.raises(ConfigError, match="contiguous"):
        native_loop.fill(seq, 4, 11, None, None)
    learned = tiny_gpt().eval()
    full = KVCache.for_model(learned, 1)
    full.advance(learned.config.block_size)
    with pytest.raises(ConfigError, match="the cache is full"):
        loop.NativeLoop(learned, full, SamplingSettings()).fill(seq[:1].clone(), 1, 2, None,
                                                                  None)


def test_positions_past_the_learned_table_are_refused_in_python_and_in_c():
    # a non-rolling cache longer than the model's block: the slots exist, the positions do not
    model = tiny_gpt().eval()
    cfg, block = model.config, model.config.block_size
    cache = KVCache(cfg.n_layer, 2, cfg.n_head, cfg.head_dim, 4 * block)
    native_loop = loop.NativeLoop(model, cache, SamplingSettings())
    seq = torch.zeros(2, 4 * block + 1, dtype=torch.long)
    with pytest.raises(ConfigError, match=f"past the model's {block} learned positions"):
        native_loop.fill(seq, 1, block + 2, None, None)
    native_loop.fill(seq, 1, block + 1, None, None)  # every learned position: fine
    assert cache.pos == block
    with pytest.raises(ConfigError, match=f"positions up to {block} are past"):
        native_loop.fill(seq, block + 1, block + 2, None, None)
    # the C code refuses the same call by itself, and chunks outside their arrays
    codes = {name: -i for i, (name, _) in enumerate(structs.FILL_ERRORS, 1)}
    work = torch.empty(native_loop.lib.chargpt_work_size(ctypes.byref(native_loop._config)))

    def fill(**fields) -> int:
        chunk = structs.Chunk(seq=ctypes.cast(seq.data_ptr(), ctypes.POINTER(ctypes.c_int64)),
                              stride=seq.size(1), work=layout.floats(work),
                              **{"start": block + 1, "end": block + 2, "pos": block, "row0": 0,
                                 "row1": 2, "threads": 1, **fields})
        return native_loop.lib.chargpt_fill(ctypes.byref(native_loop._config),
                                            ctypes.byref(native_loop._weights.model),
                                            ctypes.byref(native_loop._cache), ctypes.byref(chunk))

    assert fill() == codes["PAST_POSITIONS"]
    assert fill(pos=block - 1) == 0  # the last learned position
    for bad in (dict(row1=3), dict(row0=-1), dict(start=0, pos=0), dict(end=4 * block + 2),
                dict(pos=-1), dict(start=3, end=2), dict(threads=0)):
        assert fill(**bad) == codes["BAD_CHUNK"], bad


def test_cli_samples_the_same_text_with_and_without_the_native_loop(tmp_path, capsys):
    run = train_serve_run(tmp_path)
    capsys.readouterr()
    args = ["sample", str(run), "--prompt", "ROMEO:", "--max-new-tokens", "80", "--seed", "3",
            "--top-k", "5", "--num-samples", "2"]
    texts = []
    for extra in ([], ["--no-native"]):
        assert main([*args, *extra]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1]
    assert texts[0].count("ROMEO:") >= 2 and "\n---\n" in texts[0]


# --- bfloat16 and int8 weights ------------------------------------------------------------


def stored_as(model: torch.nn.Module, kind: str) -> torch.nn.Module:
    """A copy whose weight matrices hold what the loop computes with when it stores them as
    `kind` (SamplingSettings.weight_format)."""
    copy = __import__("copy").deepcopy(model)
    with torch.no_grad():
        for module in copy.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(dequantized(module.weight, kind))
    return copy


@pytest.mark.parametrize("kind", ["bfloat16", "int8"])
@pytest.mark.parametrize("overrides", [WIRINGS[0], WIRINGS[3], WIRINGS[5]])
def test_narrow_weights_compute_in_float32_on_the_rounded_weights(overrides, kind, monkeypatch):
    # the reference: float32 decoding of a model whose weights were rounded beforehand; the
    # same tokens, bit for bit, for the transposed (small) and the row-wise (big) layout
    model = tiny_gpt(**overrides).eval()
    rounded = stored_as(model, kind)
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), rounded.parameters(),
                                                     strict=True))
    for big in (loop.BIG, 1):  # 1: every matrix is "big", read by rows, split over threads
        monkeypatch.setattr(loop, "BIG", big)
        for batch in (1, 3):
            idx = prompt(batch, 3)
            for options in (PICKS[1], PICKS[3]):
                got = generate(model, idx, 40, generator=gen(5), weight_format=kind, **options)
                expected = generate(rounded, idx, 40, generator=gen(5), **options)
                assert torch.equal(got, expected), (big, batch, options)


def test_cli_samples_with_bfloat16_weights(tmp_path, capsys):
    run = train_serve_run(tmp_path)
    capsys.readouterr()
    args = ["sample", str(run), "--prompt", "ROMEO:", "--max-new-tokens", "60", "--seed", "3"]
    for kind in ("bfloat16", "int8"):
        assert main([*args, "--weights", kind]) == 0
        out = capsys.readouterr()
        assert out.out.startswith("ROMEO:") and len(out.out) >= 66 and "warning" not in out.err
    assert main([*args, "--weights", "int4"]) == 1
    err = capsys.readouterr().err
    assert "chargpt: error: weights must be one of float32, bfloat16, int8" in err

"""Tests for chargpt.data.preparation (`prepare`) and chargpt.data.sources: content and splits of a
prepared directory, any Unicode, Tiny Shakespeare as in the lecture, bad input, bounded memory."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import SHAKESPEARE_SHA256, all_text, corpus_text, require_shakespeare, write
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from chargpt.data import outdir, preparation, splits
from chargpt.data.preparation import prepare
from chargpt.data.prepared import load_prepared
from chargpt.errors import ConfigError, DataError, VocabError
from chargpt.text.tokenizer import CharTokenizer

# Text prepare accepts: any code point but surrogates (not encodable) and NUL (means binary).
TEXT_CHAR = st.characters(exclude_categories=("Cs",), exclude_characters="\x00")


# --- prepare: content and splits ------------------------------------------------------------


def test_split_sizes_and_meta(tmp_path: Path) -> None:
    text = "abcdefghij" * 100
    src = write(tmp_path / "in.txt", text)
    meta = prepare(src, tmp_path / "out")
    d = load_prepared(tmp_path / "out")
    assert (len(d.train), len(d.val)) == (900, 100)
    assert d.train.dtype == np.uint16 and d.val.dtype == np.uint16
    assert d.meta == meta
    assert meta["format"] == "chargpt-data" and meta["version"] == 1
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 10
    assert meta["train_tokens"] == 900 and meta["val_tokens"] == 100
    assert meta["total_chars"] == 1000 and meta["val_fraction"] == 0.1
    assert meta["vocab_fingerprint"] == d.tokenizer.fingerprint()
    sha = hashlib.sha256(text.encode()).hexdigest()
    assert meta["source_sha256"] == sha
    assert meta["sources"] == [{"path": os.path.abspath(src), "bytes": 1000, "sha256": sha}]
    assert d.tokenizer.decode(d.train) == text[:900]
    assert d.tokenizer.decode(d.val) == text[900:]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "meta.json", "train.npy", "val.npy", "vocab.json"]
    # real .npy files, read-only maps
    assert np.load(tmp_path / "out" / "train.npy", allow_pickle=False).shape == (900,)
    assert not d.train.flags.writeable


@pytest.mark.parametrize(("total", "frac", "n_val"), [(10, 0.9, 9), (10, 0.3, 3), (7, 0.5, 4)])
def test_split_rounding(tmp_path: Path, total: int, frac: float, n_val: int) -> None:
    meta = prepare(write(tmp_path / "a.txt", "x" * total), tmp_path / "o", val_fraction=frac)
    assert (meta["train_tokens"], meta["val_tokens"]) == (total - n_val, n_val)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.text(TEXT_CHAR, min_size=2, max_size=300), chunk=st.integers(1, 40))
def test_prepare_round_trip_any_unicode(text: str, chunk: int) -> None:
    assume(not text.startswith("\ufeff"))  # a leading BOM is dropped on purpose
    with tempfile.TemporaryDirectory() as tmp:
        src = write(Path(tmp) / "in.txt", text)
        prepare(src, Path(tmp) / "out", chunk_bytes=chunk)
        d = load_prepared(Path(tmp) / "out")
        assert all_text(d) == text
        assert d.tokenizer == CharTokenizer.from_text(text)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    docs=st.lists(st.text(TEXT_CHAR, min_size=1, max_size=50), min_size=1, max_size=3),
    sep=st.text(TEXT_CHAR, max_size=3),
)
def test_prepare_joins_documents(docs: list[str], sep: str) -> None:
    assume(not any(doc.startswith("\ufeff") for doc in docs))
    expected = sep.join(docs)
    assume(len(expected) >= 2)
    with tempfile.TemporaryDirectory() as tmp:
        files = [write(Path(tmp) / f"{i}.txt", doc) for i, doc in enumerate(docs)]
        prepare(files, Path(tmp) / "out", separator=sep, chunk_bytes=7)
        assert all_text(load_prepared(Path(tmp) / "out")) == expected


def test_scripts_and_emoji_survive(tmp_path: Path) -> None:
    text = "Şişli ığdır İzmir Ğ ş ğ ı İ\n東京都の天気 🙂 👩‍💻 family: 👨‍👩‍👧\n" * 3
    prepare(write(tmp_path / "t.txt", text), tmp_path / "out", chunk_bytes=5)
    d = load_prepared(tmp_path / "out")
    assert all_text(d) == text
    assert {"ş", "ğ", "ı", "İ", "東", "🙂", "\u200d"} <= set(d.tokenizer.chars)


def test_wide_vocabulary_uses_uint32(tmp_path: Path) -> None:
    cps = [c for c in range(0x100, 0x100 + 70_000) if not 0xD800 <= c <= 0xDFFF]
    text = "a" + "".join(map(chr, cps))
    meta = prepare(write(tmp_path / "wide.txt", text), tmp_path / "out")
    d = load_prepared(tmp_path / "out")
    assert meta["dtype"] == "uint32" and d.train.dtype == np.uint32
    assert meta["vocab_size"] == len(cps) + 1 > 65535
    assert all_text(d) == text


def test_directory_glob_and_list_sources(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    write(corpus / "b.txt", "BBB")
    write(corpus / "a.txt", "AAA")
    write(corpus / "sub" / "c.txt", "CCC")
    write(corpus / ".hidden" / "h.txt", "HHH")
    write(corpus / "notes.md", "MMM")
    prepare(corpus, tmp_path / "dir", separator="|")
    assert all_text(load_prepared(tmp_path / "dir")) == "AAA|BBB|CCC"
    meta = prepare(str(corpus / "*.txt"), tmp_path / "glob")
    assert all_text(load_prepared(tmp_path / "glob")) == "AAA\n\nBBB"
    assert [Path(s["path"]).name for s in meta["sources"]] == ["a.txt", "b.txt"]
    assert meta["source_sha256"] == hashlib.sha256(b"AAABBB").hexdigest()
    prepare(str(corpus / "**" / "c.txt"), tmp_path / "rec")
    assert all_text(load_prepared(tmp_path / "rec")) == "CCC"
    prepare([corpus / "sub", corpus / "b.txt"], tmp_path / "list", separator="--")
    assert all_text(load_prepared(tmp_path / "list")) == "CCC--BBB"


def test_bom_stripped_and_crlf_preserved(tmp_path: Path) -> None:
    src = write(tmp_path / "bom.txt", b"\xef\xbb\xbfline one\r\nline two\r\n")
    meta = prepare(src, tmp_path / "out", chunk_bytes=1)
    d = load_prepared(tmp_path / "out")
    assert all_text(d) == "line one\r\nline two\r\n"
    assert "\ufeff" not in d.tokenizer.chars and "\r" in d.tokenizer.chars
    assert meta["sources"][0]["bytes"] == 23  # the hash and size cover the file as it is


def test_fixed_vocabulary(tmp_path: Path) -> None:
    vocab = CharTokenizer(list("zyxabc"))
    prepare(write(tmp_path / "a.txt", "abcabc"), tmp_path / "out", vocab=vocab)
    d = load_prepared(tmp_path / "out")
    assert d.tokenizer == vocab and d.train.tolist() == [3, 4, 5, 3, 4]
    with pytest.raises(VocabError, match="2 characters not in the vocabulary: 'd'"):
        prepare(write(tmp_path / "b.txt", "abcdé"), tmp_path / "out2", vocab=vocab)


def test_replaces_previous_output_only_when_asked_and_leaves_no_temp(tmp_path: Path) -> None:
    out = tmp_path / "out"
    prepare(write(tmp_path / "a.txt", "aaaaaaaaaa"), out)
    b = write(tmp_path / "b.txt", "bcbcbcbcbcbc")
    with pytest.raises(DataError, match=r"out already holds prepared data of other text; "
                       "refusing to replace it: .* --overwrite"):
        prepare(b, out)
    assert all_text(load_prepared(out)) == "aaaaaaaaaa"
    prepare(b, out, overwrite=True)
    assert all_text(load_prepared(out)) == "bcbcbcbcbcbc"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt", "out"]


@pytest.mark.parametrize(("change", "says"), [
    ({"val_fraction": 0.2}, "val_fraction 0.1 \\(not 0.2\\)"),
    ({"unit": "byte"}, "unit 'char' \\(not 'byte'\\)"),
    ({"vocab": CharTokenizer(list("zab"))}, "another vocabulary"),
], ids=["setting", "unit", "vocabulary"])
def test_other_settings_are_refused_without_overwrite(tmp_path: Path, change, says) -> None:
    src, out = write(tmp_path / "a.txt", "abababababab"), tmp_path / "out"
    before = prepare(src, out)
    with pytest.raises(DataError, match=says):
        prepare(src, out, **change)
    assert load_prepared(out).meta == before


def test_the_same_data_is_prepared_again_which_repairs_it(tmp_path: Path) -> None:
    # "run `chargpt prepare` again" is the advice for damaged token files: with the same
    # text and settings it is allowed, even for a run's own data, and repairs them.
    src, out = write(tmp_path / "a.txt", "abcabcabcabc"), tmp_path / "run" / "data"
    meta = prepare(src, out)
    (tmp_path / "run" / "config.json").write_text("{}")
    np.save(out / "val.npy", np.full(2, 60000, dtype=np.uint16))
    with pytest.raises(DataError, match="damaged"):
        load_prepared(out)
    assert prepare(src, out) == meta
    assert all_text(load_prepared(out)) == "abcabcabcabc"


@pytest.mark.parametrize("marker", ["config.json", "best", "last"])
def test_a_runs_own_data_is_never_replaced(tmp_path: Path, marker: str) -> None:
    run, a = tmp_path / "run", write(tmp_path / "a.txt", "aaaaaaaaaa")
    prepare(a, run / "data")
    (run / marker).mkdir() if marker != "config.json" else (run / marker).write_text("{}")
    for overwrite in (False, True):
        with pytest.raises(DataError, match=r"run/data is the data of the run in .*run and "
                           "holds other text; replacing it would break that run"):
            prepare(write(tmp_path / "b.txt", "bbbbbbbbbb"), run / "data", overwrite=overwrite)
    assert all_text(load_prepared(run / "data")) == "aaaaaaaaaa"
    prepare(write(tmp_path / "c.txt", "cccccccccc"), tmp_path / "data")  # no run: a new dir


def test_other_text_is_refused_before_it_is_read(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "out"
    prepare(write(tmp_path / "a.txt", "aaaaaaaaaa"), out)

    def no_reading(*args):
        raise AssertionError("the corpus was read")

    monkeypatch.setattr(preparation, "iter_units", no_reading)
    with pytest.raises(DataError, match="other text"):
        prepare(write(tmp_path / "b.txt", "bbbbbbbbbbbb"), out)


def test_damaged_metadata_is_replaced_only_when_asked(tmp_path: Path) -> None:
    src, out = write(tmp_path / "a.txt", "aaaaaaaaaa"), tmp_path / "out"
    prepare(src, out)
    (out / "meta.json").write_text("{")
    with pytest.raises(DataError, match="holds prepared data of unreadable metadata"):
        prepare(src, out)
    prepare(src, out, overwrite=True)
    assert all_text(load_prepared(out)) == "aaaaaaaaaa"


def test_an_interrupted_replacement_leaves_the_old_data(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "out"
    prepare(write(tmp_path / "a.txt", "aaaaaaaaaa"), out)

    def fail(self, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(CharTokenizer, "save", fail)
    with pytest.raises(DataError, match="No space left on device"):
        prepare(write(tmp_path / "b.txt", "bbbbbbbbbb"), out, overwrite=True)
    assert all_text(load_prepared(out)) == "aaaaaaaaaa"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt", "out"]


def test_run_markers_agree_with_the_run_directory() -> None:
    # data/outdir cannot import runs/rundir (a lower layer): the names are spelled out twice.
    from chargpt.runs import rundir

    assert outdir.RUN_FILES == rundir.CONFIG_FILE
    assert outdir.RUN_CHECKPOINTS == rundir.CHECKPOINTS
    assert outdir.RUN_DATA == rundir.DATA_SUBDIR


def test_refuses_to_replace_unrelated_directory(tmp_path: Path) -> None:
    write(tmp_path / "mine" / "thesis.tex", "precious")
    with pytest.raises(DataError, match="not a prepared data directory"):
        prepare(write(tmp_path / "a.txt", "hello world"), tmp_path / "mine")
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"


def test_failure_while_writing_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    def fail(self, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(CharTokenizer, "save", fail)
    with pytest.raises(DataError, match="No space left on device"):
        prepare(write(tmp_path / "a.txt", "hello world"), tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_write_error_on_helper_thread(tmp_path: Path, monkeypatch) -> None:
    def full(self, ids):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(splits.SplitWriter, "write", full)
    with pytest.raises(DataError, match="cannot write prepared data .*No space left"):
        prepare(write(tmp_path / "a.txt", "hello world" * 1000), tmp_path / "out", chunk_bytes=8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_progress_flag_is_harmless(tmp_path: Path, capsys) -> None:
    # With a progress bar asked for, the prepared data is what it is without one, and off a
    # terminal (pytest's captured streams) the bar draws nothing.
    corpus = write(tmp_path / "a.txt", "hello world\n" * 500)
    with_bar = prepare(corpus, tmp_path / "bar", progress=True)
    without = prepare(corpus, tmp_path / "plain", progress=False)
    assert {k: v for k, v in with_bar.items() if k != "created"} == \
        {k: v for k, v in without.items() if k != "created"}
    for name in ("train.npy", "val.npy", "vocab.json"):
        assert (tmp_path / "bar" / name).read_bytes() == (tmp_path / "plain" / name).read_bytes()
    assert capsys.readouterr().err == ""


# --- Tiny Shakespeare -----------------------------------------------------------------------


def test_tiny_shakespeare(tmp_path: Path) -> None:
    corpus = require_shakespeare()  # the numbers below are the real corpus's
    meta = prepare(corpus, tmp_path / "out")
    assert meta["vocab_size"] == 65
    assert meta["train_tokens"] == 1_003_854 and meta["val_tokens"] == 111_540
    assert meta["source_sha256"] == SHAKESPEARE_SHA256
    d = load_prepared(tmp_path / "out")
    text = corpus.read_text(encoding="utf-8")
    # identical to the lecture's: stoi over sorted(set(text)), data[:int(0.9 * len(data))]
    chars = sorted(set(text))
    assert d.tokenizer.chars == tuple(chars)
    stoi = {c: i for i, c in enumerate(chars)}
    lecture = np.array([stoi[c] for c in text], dtype=np.int64)
    n = int(0.9 * len(lecture))
    assert np.array_equal(d.train, lecture[:n]) and np.array_equal(d.val, lecture[n:])


# --- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"", "is empty"),
        (b"\xef\xbb\xbf", "contains no text"),
        (b"hello \xe9t\xe9", "not valid UTF-8: invalid continuation byte .* at byte offset 6"),
        (b"abc\xff", "not valid UTF-8: invalid start byte \\(byte 0xff\\) at byte offset 3"),
        (b"abc\xe2\x82", "not valid UTF-8: unexpected end of data .*offset 3"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "looks like a binary file"),
        (b"text\x00more", "looks like a binary file \\(NUL byte at offset 4\\)"),
    ],
)
@pytest.mark.parametrize("chunk", [1, 2, 16 * 2**20])
def test_bad_files(tmp_path: Path, content: bytes, match: str, chunk: int) -> None:
    src = write(tmp_path / "bad.txt", content)
    with pytest.raises(DataError, match=match) as info:
        prepare(src, tmp_path / "out", chunk_bytes=chunk)
    assert str(src) in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_bad_file_among_many_is_named(tmp_path: Path) -> None:
    write(tmp_path / "c" / "a.txt", "fine")
    bad = write(tmp_path / "c" / "b.txt", b"\xff")
    with pytest.raises(DataError, match=f"{bad}.*byte offset 0"):
        prepare(tmp_path / "c", tmp_path / "out")


@pytest.mark.parametrize(
    ("source", "match"),
    [
        ("missing.txt", "input not found: .*missing.txt"),
        ("nodir/*.txt", "no files match .*nodir"),
        ("emptydir", "no .txt files found under .*emptydir"),
    ],
)
def test_missing_sources(tmp_path: Path, source: str, match: str) -> None:
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(DataError, match=match):
        prepare(str(tmp_path / source), tmp_path / "out")


@pytest.mark.parametrize("frac", [0.0, 1.0, -0.1, 1.5])
def test_val_fraction_out_of_range(tmp_path: Path, frac: float) -> None:
    with pytest.raises(ConfigError, match="val_fraction"):
        prepare(write(tmp_path / "a.txt", "hello"), tmp_path / "out", val_fraction=frac)


def test_too_small_to_split(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="too few to split"):
        prepare(write(tmp_path / "a.txt", "a"), tmp_path / "out")


def test_unreadable_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # chmod(0) does not stop root (CI runs as root), so simulate the permission error.
    src = write(tmp_path / "a.txt", "hello")
    real_open = open

    def deny(path, *args, **kwargs):
        if Path(path) == src:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", deny)
    with pytest.raises(DataError, match="cannot read .*Permission denied"):
        prepare(src, tmp_path / "out")


# --- memory ---------------------------------------------------------------------------------

_MEMORY_CHILD = textwrap.dedent(
    """
    import resource, sys
    from chargpt.data import prepare

    def peak_kb():
        # VmHWM belongs to this process image only; ru_maxrss can carry over the parent's
        # (large, torch-laden) footprint across fork + exec.
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1])
        except OSError:
            pass
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss // 1024 if sys.platform == "darwin" else rss

    base = peak_kb()
    prepare(sys.argv[1], sys.argv[2])
    print(base, peak_kb())
    """
)


def test_prepare_memory_does_not_grow_with_corpus(tmp_path: Path) -> None:
    unit = corpus_text(1_000_000).encode("utf-8")
    corpus = tmp_path / "big.txt"
    with open(corpus, "wb") as f:
        for _ in range(60_000_000 // len(unit) + 1):
            f.write(unit)
    corpus_mb = corpus.stat().st_size / 2**20
    proc = subprocess.run(
        [sys.executable, "-c", _MEMORY_CHILD, str(corpus), str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    base_kb, peak_kb = map(int, proc.stdout.split())
    extra_mb, peak_mb = (peak_kb - base_kb) / 1024, peak_kb / 1024
    # Holding the text (60 MB) and its uint16 ids (120 MB) would need ~180 MB extra.
    assert extra_mb < 100, f"prepare used {extra_mb:.0f} MB extra for a {corpus_mb:.0f} MB corpus"
    assert peak_mb < 250, f"peak RSS {peak_mb:.0f} MB"
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["total_chars"] == corpus.stat().st_size


# --- file names whose bytes are not UTF-8 ---------------------------------------------------


def test_a_file_name_that_is_not_utf8_is_prepared(tmp_path: Path) -> None:
    # Linux paths are bytes; Python gives b"\xff" as the lone surrogate "\udcff".
    name = os.fsdecode(b"bad\xff.txt")
    src = write(tmp_path / name, "hello world")
    meta = prepare(src, tmp_path / os.fsdecode(b"out\xfe"))
    assert meta["sources"][0]["path"] == os.path.abspath(src)
    assert load_prepared(tmp_path / os.fsdecode(b"out\xfe")).meta == meta  # read back exactly
    assert prepare(src, tmp_path / os.fsdecode(b"out\xfe")) == meta  # the same data again


def test_cli_prepare_shows_such_a_name_and_refuses_such_a_separator(tmp_path: Path,
                                                                    capsys) -> None:
    from chargpt.cli.commands import main

    src = write(tmp_path / os.fsdecode(b"bad\xff.txt"), "hello world")
    out = tmp_path / os.fsdecode(b"q\xff")
    assert main(["prepare", "--input", str(src), "--out", str(out)]) == 0
    assert capsys.readouterr().out.endswith(f"-> {tmp_path}/q\\xff\n")
    code = main(["prepare", "--input", str(src), "--out", str(tmp_path / "q"),
                 "--separator", os.fsdecode(b"\xff")])
    assert code == 1
    assert capsys.readouterr().err == \
        "chargpt: error: the separator \\xff is not valid UTF-8 text\n"


def test_a_file_named_twice_is_refused(tmp_path: Path) -> None:
    a = write(tmp_path / "docs" / "a.txt", "hello world")
    for twice in ([a, a], [tmp_path / "docs", a], [a, tmp_path / "docs" / ".." / "docs" / "a.txt"]):
        with pytest.raises(DataError, match="names .*a.txt more than once.*give each file once"):
            prepare(twice, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_pipe_is_refused_with_the_reason(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(DataError, match="not a regular file .* reads its input twice"):
        prepare(fifo, tmp_path / "out")

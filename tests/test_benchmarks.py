"""The character-level benchmarks: byte-level tokens, the test split, the standard split, and
a run trained on an enwik8 stand-in fetched through the real download path, scored on its test
split in bits per byte."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import corpus_text, one_line_error, register_dataset, tiny_flags, write, zip_bytes

from chargpt.cli.commands import main
from chargpt.data.datasets import Archive, Digest
from chargpt.data.preparation import prepare
from chargpt.data.prepared import load_prepared
from chargpt.data.splits import split_counts
from chargpt.errors import ConfigError, DataError, VocabError
from chargpt.runs.run import load_run
from chargpt.text.textfiles import encode_file
from chargpt.text.textstream import TextStream
from chargpt.text.tokenizer import CharTokenizer

MULTI = "Grüße aus 東京 🙂, naïve café!\n"  # 1-, 2-, 3- and 4-byte UTF-8


# --- byte-level tokens ---------------------------------------------------------------------


def test_byte_tokenizer_round_trips_multibyte_utf8(tmp_path: Path) -> None:
    raw = MULTI.encode()
    tok = CharTokenizer.from_bytes(sorted(set(raw)))
    assert tok.unit == "byte" and tok.vocab_size == len(set(raw))
    ids = tok.encode(MULTI)
    assert len(ids) == len(raw) > len(MULTI)  # one token per byte, not per character
    assert [tok.chars[i] for i in ids] == [chr(b) for b in raw]
    assert tok.decode(ids) == MULTI
    assert tok.decode(np.array(ids)) == MULTI
    tok.save(tmp_path / "vocab.json")
    saved = json.loads((tmp_path / "vocab.json").read_text())
    assert saved == {"format": "chargpt-vocab", "version": 2, "unit": "byte",
                     "bytes": sorted(set(raw))}
    assert CharTokenizer.load(tmp_path / "vocab.json") == tok


def test_byte_and_char_vocabularies_never_match() -> None:
    chars = CharTokenizer(list("abc"))
    as_bytes = CharTokenizer.from_bytes(b"abc")
    assert chars.chars == as_bytes.chars  # the same code points 0-255...
    assert chars != as_bytes and chars.fingerprint() != as_bytes.fingerprint()  # ...not equal
    # a character vocabulary keeps its old fingerprint (old runs still match their data)
    assert chars.fingerprint() == hashlib.sha256(b'["a","b","c"]').hexdigest()


def test_byte_unknowns_are_named_as_bytes() -> None:
    tok = CharTokenizer.from_bytes(b"ab ")
    with pytest.raises(VocabError, match="prompt has 2 bytes not in the vocabulary: "
                                         "byte 0xC3, byte 0xA9"):
        tok.encode("abé", what="prompt")
    assert tok.encode("abé", unknown="skip") == tok.encode("ab")
    assert tok.encode("aé", unknown="replace") == tok.encode("a  ")  # each byte replaced
    with pytest.raises(ConfigError, match="one byte"):
        tok.encode("é", unknown="replace", replacement="é")
    with pytest.raises(DataError, match="not a byte"):
        CharTokenizer(["ğ"], unit="byte")


def test_streaming_bytes_never_breaks_on_invalid_utf8() -> None:
    tok = CharTokenizer.from_bytes(range(256))
    stream = TextStream(tok)
    assert [stream.feed(b) for b in "é🙂".encode()] == ["", "é", "", "", "", "🙂"]
    assert stream.flush() == ""
    # a stray continuation byte, an invalid lead byte, then a character cut off at the end
    stream = TextStream(tok)
    pieces = [stream.feed(b) for b in b"a\x80b\xff" + "🙂".encode()[:2]]
    assert "".join(pieces) + stream.flush() == "a\ufffdb\ufffd\ufffd"
    assert tok.decode(list(b"a\x80b\xff")) == "a\ufffdb\ufffd"  # the same rule, all at once
    chars = CharTokenizer(list("ab"))
    char_stream = TextStream(chars)
    assert [char_stream.feed(i) for i in (0, 1)] == ["a", "b"] and char_stream.flush() == ""


def test_prepare_bytes(tmp_path: Path) -> None:
    text = MULTI * 50
    meta = prepare(write(tmp_path / "in.txt", text), tmp_path / "out", unit="byte")
    d = load_prepared(tmp_path / "out")
    raw = text.encode()
    assert meta["unit"] == "byte" and d.tokenizer.unit == "byte"
    assert meta["total_chars"] == len(raw) and meta["vocab_size"] == len(set(raw))
    tokens = np.concatenate([d.train, d.val])
    assert bytes(ord(d.tokenizer.chars[i]) for i in tokens) == raw
    assert d.tokenizer.decode(tokens) == text
    # the file is read back the same way for `eval --input`
    assert np.array_equal(encode_file(tmp_path / "in.txt", d.tokenizer), tokens)


def test_bytes_need_not_be_utf8(tmp_path: Path) -> None:
    raw = b"\xff\xfeabc\x00\x80" * 20
    src = write(tmp_path / "in.bin", raw)
    with pytest.raises(DataError):
        prepare(src, tmp_path / "chars")  # characters must be UTF-8 text
    prepare(src, tmp_path / "bytes", unit="byte")
    d = load_prepared(tmp_path / "bytes")
    tokens = np.concatenate([d.train, d.val])
    assert bytes(ord(d.tokenizer.chars[i]) for i in tokens) == raw
    with pytest.raises(VocabError, match="unit 'char'"):
        prepare(src, tmp_path / "again", unit="byte", vocab=CharTokenizer(list("abc")))


# --- the test split ------------------------------------------------------------------------


@pytest.mark.parametrize(("total", "val", "test", "expected"), [
    (1000, 0.1, 0.0, (900, 100, 0)),
    (1000, 0.05, 0.05, (900, 50, 50)),
    (10, 0.3, 0.3, (4, 3, 3)),
    (7, 0.2, 0.2, (4, 1, 2)),
])
def test_split_counts(total, val, test, expected) -> None:
    assert split_counts(total, val, test) == expected
    assert sum(split_counts(total, val, test)) == total


def test_standard_split_takes_val_and_test_from_the_end() -> None:
    # enwik8 and text8: 10^8 units, the first 90 M train, the next 5 M val, the last 5 M test
    assert split_counts(100_000_000, 0.1, 0.0, (5_000_000, 5_000_000)) == (
        90_000_000, 5_000_000, 5_000_000)


def test_prepare_with_a_test_split(tmp_path: Path) -> None:
    text = corpus_text(2000)
    meta = prepare(write(tmp_path / "in.txt", text), tmp_path / "out", val_fraction=0.05,
                   test_fraction=0.05)
    d = load_prepared(tmp_path / "out")
    assert (meta["train_tokens"], meta["val_tokens"], meta["test_tokens"]) == (1800, 100, 100)
    assert d.tokenizer.decode(d.train) == text[:1800]
    assert d.tokenizer.decode(d.val) == text[1800:1900]
    assert d.tokenizer.decode(d.split("test")) == text[1900:]
    assert (tmp_path / "out" / "test.npy").is_file()


def test_heldout_split_on_a_scaled_down_stand_in(tmp_path: Path) -> None:
    raw = (MULTI * 200).encode()
    prepare(write(tmp_path / "in.txt", raw), tmp_path / "out", unit="byte",
            heldout=(300, 200))
    d = load_prepared(tmp_path / "out")
    as_bytes = [bytes(ord(d.tokenizer.chars[i]) for i in split)
                for split in (d.train, d.val, d.test)]
    assert as_bytes == [raw[:-500], raw[-500:-200], raw[-200:]]
    with pytest.raises(DataError, match="too few to split with the last 5000 \\+ 5000"):
        prepare(write(tmp_path / "small.txt", raw[:9000]), tmp_path / "x", unit="byte",
                heldout=(5000, 5000))


def test_data_prepared_before_the_test_split_still_loads(tmp_path: Path) -> None:
    prepare(write(tmp_path / "in.txt", corpus_text(1000)), tmp_path / "out")
    meta_path = tmp_path / "out" / "meta.json"
    meta = json.loads(meta_path.read_text())
    for key in ("unit", "test_tokens", "test_fraction"):
        del meta[key]  # what an older chargpt wrote
    meta_path.write_text(json.dumps(meta))
    d = load_prepared(tmp_path / "out")
    assert d.test is None and len(d.split("val")) == 100
    with pytest.raises(DataError, match="has no test split .*--test-fraction"):
        d.split("test")


# --- end to end: enwik8 stand-in -> train -> eval --split test --------------------------------


def test_enwik8_stand_in_trained_and_scored_on_its_test_split(
        file_server, dataset_cache, monkeypatch, tmp_path, capsys) -> None:
    """The done-when of issue 13: a test-split bits-per-byte figure for a run trained on a
    (test-sized) enwik8 stand-in that came through the real download path."""
    corpus = (corpus_text(6000) + MULTI * 20).encode() * 3  # ~20 KB, multi-byte UTF-8
    url, handler = file_server
    handler.files["/enwik8.zip"] = archive = zip_bytes({"enwik8": corpus})
    register_dataset(monkeypatch, "enwik8", url=f"{url}/enwik8.zip", size=len(archive),
                     sha256=hashlib.sha256(archive).hexdigest(), filename="enwik8",
                     archive=Archive("enwik8", len(corpus),
                                     Digest("sha1", hashlib.sha1(corpus).hexdigest())),
                     split=(1000, 1000))
    run = tmp_path / "run"
    flags = [*tiny_flags(max_steps=20, sample_chars=0), "--no-progress"]
    assert main(["train", "--dataset", "enwik8", "--unit", "byte", "--out", str(run),
                 *flags]) == 0
    out = capsys.readouterr().out
    assert "enwik8's standard split: the last 1,000 bytes are test" in out
    assert re.search(r"step 20: .* val bpb \d\.\d{3}", out)
    assert handler.requests == ["/enwik8.zip"]

    assert main(["eval", str(run), "--split", "test"]) == 0
    line = capsys.readouterr().out.strip()
    m = re.fullmatch(r"the test split: loss (\d+\.\d{4}), (\d+\.\d{3}) bits/byte over 999 "
                     r"predictions \(.*best, step \d+\)", line)
    assert m, line
    # the reference: the last 1,000 bytes of the corpus, scored directly
    r = load_run(run)
    ids = r.tokenizer.encode_array(np.frombuffer(corpus[-1000:], dtype=np.uint8))
    loss = r.evaluate_ids(ids)
    assert float(m.group(1)) == pytest.approx(loss, abs=1e-4)
    assert float(m.group(2)) == pytest.approx(loss / np.log(2), abs=1e-3)
    assert loss / np.log(2) < 8.0  # better than a uniform guess over 256 byte values

    # sampling a byte-level run streams text, whatever bytes the model picks
    assert main(["sample", str(run), "--max-new-tokens", "200", "--seed", "1",
                 "--prompt", "Grüße"]) == 0
    assert capsys.readouterr().out.startswith("Grüße")
    # a byte vocabulary has no transformers character tokenizer: export says so, writes nothing
    code = main(["export", str(run), "--to", "hf", str(tmp_path / "hf")])
    assert "cannot export a byte-level run" in one_line_error(capsys, code)
    assert not (tmp_path / "hf").exists()


def test_eval_test_split_without_one_is_one_line(tmp_path, capsys) -> None:
    run = tmp_path / "run"
    corpus = write(tmp_path / "c.txt", corpus_text(4000))
    flags = [*tiny_flags(max_steps=2, eval_interval=2, sample_chars=0), "--no-progress"]
    assert main(["train", "--input", str(corpus), "--out", str(run), *flags]) == 0
    capsys.readouterr()
    code = main(["eval", str(run), "--split", "test"])
    assert "has no test split" in one_line_error(capsys, code)


# --- the command line and the config -------------------------------------------------------


def test_prepare_command_with_bytes_and_a_test_split(tmp_path, capsys) -> None:
    src = write(tmp_path / "in.txt", MULTI * 40)
    assert main(["prepare", "--input", str(src), "--out", str(tmp_path / "out"), "--unit",
                 "byte", "--val-fraction", "0.1", "--test-fraction", "0.1"]) == 0
    n = len((MULTI * 40).encode())
    out = capsys.readouterr().out
    assert out.startswith(f"prepared {n:,} bytes (")
    d = load_prepared(tmp_path / "out")
    assert f"{len(d.train):,} train / {len(d.val):,} val / {len(d.test):,} test tokens" in out
    assert len(d.train) + len(d.val) + len(d.test) == n and len(d.test) == n // 10 + (n % 10 > 0)


def test_config_checks_dataset_and_fractions() -> None:
    from chargpt.config.resolve import resolve_config

    with pytest.raises(ConfigError, match="unknown dataset 'enwik9'"):
        resolve_config(overrides={"data": {"dataset": "enwik9"}})
    with pytest.raises(ConfigError, match="test_fraction must be in"):
        resolve_config(overrides={"data": {"val_fraction": 0.5, "test_fraction": 0.5}})
    cfg = resolve_config("enwik8-cpu")
    assert (cfg.data.dataset, cfg.data.unit) == ("enwik8", "byte")
    assert (resolve_config("text8-gpu").data.dataset, resolve_config("text8-gpu").data.unit) == (
        "text8", "char")


def test_estimate_takes_sizes_from_the_presets_dataset(capsys) -> None:
    assert main(["estimate", "--preset", "enwik8-gpu"]) == 0
    out = capsys.readouterr().out
    assert "12 layers, 8 heads, 512 embd, block 512, vocab 256" in out
    assert "one epoch of 90,000,000 characters = 5,493 steps" in out
    assert main(["estimate", "--preset", "text8-cpu", "--vocab-size", "30"]) == 0
    assert "vocab 30" in capsys.readouterr().out
    assert main(["estimate"]) == 0  # the default preset: Tiny Shakespeare, as before
    out = capsys.readouterr().out
    assert "vocab 65" in out and "one epoch of 1,003,854 characters" in out

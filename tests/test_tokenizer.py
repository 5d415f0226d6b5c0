"""Tests for chargpt.text.tokenizer: round trips in any script, unknown characters, persistence."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from chargpt.errors import ChargptError, ConfigError, DataError, VocabError
from chargpt.text.tokenizer import CharTokenizer, check_same_vocab

# Every code point except surrogates, which cannot occur in UTF-8 text.
ANY_CHAR = st.characters(exclude_categories=("Cs",))
ANY_TEXT = st.text(alphabet=ANY_CHAR)


@given(ANY_TEXT)
def test_round_trip_any_unicode(text: str) -> None:
    tok = CharTokenizer.from_text(text or "x")
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert len(ids) == len(text)
    assert all(0 <= i < tok.vocab_size for i in ids)


@given(ANY_TEXT)
def test_encode_array_matches_encode(text: str) -> None:
    tok = CharTokenizer.from_text(text or "x")
    cps = np.array([ord(c) for c in text], dtype=np.uint32)
    ids = tok.encode_array(cps)
    assert ids.dtype == tok.id_dtype
    assert ids.tolist() == tok.encode(text)
    if text.isascii():
        assert tok.encode_array(cps.astype(np.uint8)).tolist() == tok.encode(text)


def test_from_text_is_sorted_code_points() -> None:
    tok = CharTokenizer.from_text("hello world")
    assert tok.chars == (" ", "d", "e", "h", "l", "o", "r", "w")
    assert tok.vocab_size == 8 == len(tok)
    assert tok.encode("hello") == [3, 2, 4, 4, 5]


def test_scripts_and_emoji_survive() -> None:
    text = "Şişli'de ığdır İstanbul 東京 👩‍💻 é"  # combining accent on the last e
    tok = CharTokenizer.from_text(text)
    assert tok.decode(tok.encode(text)) == text
    # a ZWJ emoji sequence is several code points, hence several tokens
    assert len(tok.encode("👩‍💻")) == 3
    assert "İ" in tok and "ı" in tok


def test_decode_accepts_lists_arrays_and_tensors() -> None:
    tok = CharTokenizer.from_text("abc")
    assert tok.decode([0, 1, 2]) == "abc"
    assert tok.decode(np.array([2, 1], dtype=np.uint16)) == "cb"
    assert tok.decode(torch.tensor([0, 0, 2])) == "aac"
    assert tok.decode(iter([1])) == "b"
    assert tok.decode([]) == ""


@pytest.mark.parametrize("bad", [3, -1, 1000])
def test_decode_out_of_range(bad: int) -> None:
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(VocabError, match=f"token id {bad} is out of range"):
        tok.decode([0, bad])


# --- unknown characters ---------------------------------------------------------------------


def test_unknown_error_names_the_characters() -> None:
    tok = CharTokenizer.from_text("abc ")
    with pytest.raises(VocabError) as info:
        tok.encode("a é—b é", what="prompt")
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith("prompt has 2 characters not in the vocabulary: ")
    assert "'é'" in msg and "'—'" in msg and "U+2014" in msg
    assert "--unknown skip" in msg and "--unknown replace" in msg


def test_unknown_error_lists_at_most_ten() -> None:
    tok = CharTokenizer.from_text("a")
    with pytest.raises(VocabError) as info:
        tok.encode("a" + "".join(chr(0x4E00 + i) for i in range(25)))
    msg = str(info.value)
    assert "has 25 characters" in msg and "and 15 more" in msg
    assert msg.count("U+") == 10


def test_unknown_skip_and_replace() -> None:
    tok = CharTokenizer.from_text("ab ")
    assert tok.decode(tok.encode("a?b!", unknown="skip")) == "ab"
    assert tok.decode(tok.encode("a?b!", unknown="replace")) == "a b "
    assert tok.decode(tok.encode("a?b", unknown="replace", replacement="b")) == "abb"
    no_space = CharTokenizer.from_text("xy")
    assert no_space.decode(no_space.encode("x?", unknown="replace")) == "xx"


def test_unknown_policies_on_arrays() -> None:
    tok = CharTokenizer.from_text("ab ")
    cps = np.array([ord(c) for c in "a?b"], dtype=np.uint32)
    with pytest.raises(VocabError, match="'\\?'"):
        tok.encode_array(cps)
    assert tok.decode(tok.encode_array(cps, unknown="skip")) == "ab"
    assert tok.decode(tok.encode_array(cps, unknown="replace")) == "a b"
    with pytest.raises(VocabError, match="'\\?'"):
        tok.encode_array(cps.astype(np.uint8))


def test_bad_policy_and_replacement() -> None:
    tok = CharTokenizer.from_text("ab")
    with pytest.raises(ConfigError, match="policy"):
        tok.encode("ab", unknown="ignore")
    with pytest.raises(VocabError, match="replacement"):
        tok.encode("a?", unknown="replace", replacement="z")
    with pytest.raises(ConfigError, match="one character"):
        tok.encode("a?", unknown="replace", replacement="ab")


# --- construction and persistence -----------------------------------------------------------


@pytest.mark.parametrize(
    ("chars", "match"),
    [([], "empty"), (["a", "bc"], "exactly one character"), (["a", "a"], "twice"),
     (["a", 1], "exactly one character"), (["\ud800"], "surrogate")],
)
def test_invalid_vocabularies(chars: list, match: str) -> None:
    with pytest.raises(DataError, match=match):
        CharTokenizer(chars)


def test_ids_follow_given_order() -> None:
    tok = CharTokenizer(["z", "a", "ğ"])
    assert tok.encode("ağz") == [1, 2, 0]


def test_fingerprint_identifies_vocabulary() -> None:
    a = CharTokenizer.from_text("abc")
    assert a.fingerprint() == CharTokenizer(["a", "b", "c"]).fingerprint()
    assert a.fingerprint() != CharTokenizer(["b", "a", "c"]).fingerprint()
    assert a.fingerprint() != CharTokenizer.from_text("abd").fingerprint()
    assert len(a.fingerprint()) == 64


def test_id_dtype() -> None:
    assert CharTokenizer.from_text("ab").id_dtype == np.uint16
    wide = CharTokenizer.from_codepoints(range(0x10000, 0x10000 + 65536))
    assert wide.id_dtype == np.uint32


def test_save_load_round_trip(tmp_path) -> None:
    tok = CharTokenizer.from_text("şğıİ 東京 👩‍💻\n\t\"\\")
    path = tmp_path / "vocab.json"
    tok.save(path)
    raw = path.read_text(encoding="utf-8")
    assert "ş" in raw and "東" in raw  # readable, not \u-escaped
    d = json.loads(raw)
    assert d["format"] == "chargpt-vocab" and d["version"] == 1
    loaded = CharTokenizer.load(path)
    assert loaded == tok and loaded.fingerprint() == tok.fingerprint()
    assert CharTokenizer.from_json(tok.to_json()) == tok
    assert [p.name for p in tmp_path.iterdir()] == ["vocab.json"]  # no temp file left


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"{not json", "not valid JSON"),
        (b'{"format": "other", "version": 1, "chars": ["a"]}', "not a chargpt vocabulary"),
        (b'{"format": "chargpt-vocab", "version": 9, "chars": ["a"]}', "version 9"),
        (b'{"format": "chargpt-vocab", "version": 1, "chars": ["a", "a"]}', "twice"),
        (b'{"format": "chargpt-vocab", "version": 1, "chars": "ab"}', "list"),
        (b"\xff\xfe", "UTF-8"),
    ],
)
def test_load_rejects_bad_files(tmp_path, content: bytes, match: str) -> None:
    path = tmp_path / "vocab.json"
    path.write_bytes(content)
    with pytest.raises(DataError, match=match) as info:
        CharTokenizer.load(path)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_load_missing_file(tmp_path) -> None:
    with pytest.raises(DataError, match="not found"):
        CharTokenizer.load(tmp_path / "nope.json")


def test_errors_are_chargpt_errors() -> None:
    assert issubclass(VocabError, ChargptError) and issubclass(DataError, ChargptError)


@settings(max_examples=50)
@given(st.lists(ANY_CHAR, min_size=1, max_size=50, unique=True))
def test_any_vocabulary_persists(chars: list[str]) -> None:
    tok = CharTokenizer(chars)
    assert CharTokenizer.from_json(tok.to_json()) == tok


def test_one_vocabulary_rule_for_every_pairing() -> None:
    abc = CharTokenizer("abc")
    check_same_vocab(abc, CharTokenizer("abc"), what="a and b")
    check_same_vocab(abc, 3, what="vocab and model")  # a model config records only a size
    with pytest.raises(VocabError, match="a and b use different vocabularies"):
        check_same_vocab(abc, CharTokenizer("acb"), what="a and b")  # same set, other ids
    with pytest.raises(ChargptError, match="expects 4"):
        check_same_vocab(abc, 4, what="vocab and model", error=DataError)

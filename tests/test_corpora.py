"""The benchmark corpora (benchmarks/corpora.py): built from Debian packages at run time, with
their provenance beside them; no corpus text is committed. And what benchmarks/context_worth.py
measures of them: the repeats a longer block brings within reach."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import context_worth  # noqa: E402
import corpora  # noqa: E402

from chargpt.errors import DataError  # noqa: E402


def test_fortune_separators_become_blank_lines(tmp_path):
    folder = tmp_path / "usr/share/games/fortunes"
    folder.mkdir(parents=True)
    (folder / "b").write_text("Second.\n%\nThird.\n", encoding="utf-8")
    (folder / "a").write_text("First, with ß.\n%\n", encoding="utf-8")
    (folder / "a.dat").write_bytes(b"\x00\x01")  # fortune's index: not text
    (folder / "a.u8").symlink_to(folder / "a")  # a second name of the same file
    every = corpora.Corpus("t", "pkg", "usr/share/games/fortunes")
    assert corpora._text_of(every, tmp_path) == "First, with ß.\n\n\nSecond.\n\nThird.\n"
    only_b = corpora.Corpus("t", "pkg", "usr/share/games/fortunes", ("b",))
    assert corpora._text_of(only_b, tmp_path) == "Second.\n\nThird.\n"


def test_terminal_colour_codes_are_taken_out(tmp_path):
    folder = tmp_path / "usr/share/games/fortunes"
    folder.mkdir(parents=True)
    # fortunes-zh colours its attributions; one code can hide inside another
    (folder / "zh").write_text("\x1b[32m题目\x1b[m 诗\n%\nrc\x1b\x1b[m[;m来\n", encoding="utf-8")
    corpus = corpora.Corpus("t", "pkg", "usr/share/games/fortunes", ("zh",))
    assert corpora._text_of(corpus, tmp_path) == "题目 诗\n\nrc来\n"


def test_an_unknown_corpus_is_a_one_line_error():
    with pytest.raises(DataError, match="unknown corpus 'nope'"):
        corpora.fetch("nope")


def test_a_corpus_is_built_from_its_package(tmp_path, monkeypatch):
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        pytest.skip("needs Debian's apt-get and dpkg-deb to download the fortunes package")
    monkeypatch.setenv("CHARGPT_CACHE", str(tmp_path))
    path = corpora.fetch("wisdom-en")
    text = path.read_text(encoding="utf-8")
    provenance = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
    assert provenance["package"] == "fortunes" and provenance["characters"] == len(text)
    assert len(text) > 50_000 and "\n%\n" not in text
    assert corpora.fetch("wisdom-en") == path  # cached: built once


def reachable_by_hand(text: str, k: int, block: int) -> float:
    """context_worth.reachable the slow way: every position at every offset of the block,
    searching the characters that offset sees for the k-gram."""
    total = 0
    for t in range(k - 1, len(text)):
        gram = text[t - k + 1:t + 1]
        total += sum(gram in text[max(0, t - c):t] for c in range(block))
    return total / block / max(1, len(text) - k + 1)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.text(alphabet="ab c", max_size=60), st.integers(1, 4), st.sampled_from([4, 8, 16]))
def test_repeats_within_reach_match_a_search_of_every_window(text, k, block):
    assert context_worth.reachable(text, k, block) == pytest.approx(
        reachable_by_hand(text, k, block))


def test_a_repeat_further_back_than_the_block_is_out_of_reach():
    line = "-- Fernando Pessoa\n"
    filler = "".join(map(chr, range(0x100, 0x150)))  # 80 characters, none twice
    text = line + filler + line  # the second copy's k-grams occurred 99 characters before
    assert context_worth.gained(text, 8, block=128, reference=64) > 0
    assert context_worth.reachable(text, 8, 64) == 0
    assert context_worth.spread_sample("abc") == ["abc"]

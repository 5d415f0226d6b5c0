"""What a corpus is like, as far as sizing a model for it goes: its training tokens, its
vocabulary and how predictable its text is (bits per character under lzma).

`config/sizing`'s forecast reads these three numbers; `corpus_stats` takes them from a prepared
corpus's training split, and the sweep and fit scripts in `benchmarks/` record them with every
run, so a forecast and the runs it is fitted to see a corpus alike.
"""

from __future__ import annotations

import lzma
from dataclasses import dataclass
from typing import TYPE_CHECKING

from chargpt.errors import ConfigError

if TYPE_CHECKING:
    from chargpt.data.prepared import PreparedData

__all__ = ["LZMA_SAMPLE", "CorpusStats", "corpus_bits_per_char", "corpus_stats"]

# characters compressed to price a corpus's predictability: the same amount of every corpus,
# since lzma packs a longer text better only because it has seen more of it, and the size of a
# corpus is the forecast's own term (U). A sample of up to 1 M characters made the forecast
# miss corpora it had not been fitted to by 0.061 root-mean-square; 50 K, by 0.051.
LZMA_SAMPLE = 50_000


@dataclass(frozen=True)
class CorpusStats:
    """What the sizing rule needs to know of a corpus."""

    train_tokens: int
    vocab_size: int
    bits_per_char: float


def corpus_stats(data: PreparedData) -> CorpusStats:
    """What the rule needs of a prepared corpus, from its training split."""
    sample = data.tokenizer.decode(data.train[:LZMA_SAMPLE].tolist())
    return CorpusStats(len(data.train), data.tokenizer.vocab_size, corpus_bits_per_char(sample))


def corpus_bits_per_char(text: str) -> float:
    """Bits per character lzma needs for the first `LZMA_SAMPLE` characters of `text`."""
    sample = text[:LZMA_SAMPLE]
    if not sample:
        raise ConfigError("the corpus is empty")
    return 8.0 * len(lzma.compress(sample.encode("utf-8"), preset=6)) / len(sample)

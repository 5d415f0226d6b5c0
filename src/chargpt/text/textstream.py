"""Sampled token ids turned into text one at a time, for streaming.

A character vocabulary gives one character per id. A byte vocabulary (`unit="byte"`) gives
bytes of UTF-8, and a character may take up to four of them, so `TextStream` holds a
character's bytes back until its last one arrives. A model can sample bytes that are not
UTF-8 at all; they come out as U+FFFD, the replacement character, exactly as
`CharTokenizer.decode` shows them, so a stream never stops with a decoding error.
"""

from __future__ import annotations

import codecs

from chargpt.text.tokenizer import CharTokenizer

__all__ = ["TextStream"]


class TextStream:
    """Decodes the ids of one sample: `feed` each id, then `flush` at the end.

    `feed` returns "" while a character's bytes are incomplete; `flush` turns a character
    left unfinished at the end into U+FFFD."""

    def __init__(self, tokenizer: CharTokenizer) -> None:
        self._chars = tokenizer.chars
        self._bytes = tokenizer.unit == "byte"
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id: int) -> str:
        c = self._chars[token_id]
        return self._decoder.decode(c.encode("latin-1")) if self._bytes else c

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True) if self._bytes else ""

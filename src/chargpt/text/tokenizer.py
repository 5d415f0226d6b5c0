"""Character-level tokenizer: one token per Unicode code point, or per byte.

`CharTokenizer` maps each character of a fixed vocabulary to its position in that vocabulary.
A character is one code point (a Python str of length 1), so any script works; a grapheme made of
several code points (an emoji with a zero-width joiner, a letter with a combining accent) is
several tokens. With `unit="byte"` a token is one byte of the text's UTF-8 encoding instead
(the unit enwik8 results are reported in): the vocabulary is the bytes that occur, at most 256,
held as the code points 0-255 (byte b is `chr(b)`), so the same lookup tables serve both units.
Text with characters outside the vocabulary is refused, skipped or replaced according to an
explicit policy. A vocabulary is saved as a small, human-readable JSON file and is identified by
a fingerprint so a model is never paired with a foreign vocabulary.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from chargpt.errors import ChargptError, ConfigError, DataError, VocabError
from chargpt.fileio import atomic_write_text, read_bytes

__all__ = ["UNITS", "UNKNOWN_HINT", "UNKNOWN_POLICIES", "CharTokenizer", "check_same_vocab",
           "unknown_chars_message"]

VOCAB_FORMAT = "chargpt-vocab"
VOCAB_VERSION = 1  # a vocabulary of characters, readable by every chargpt
BYTE_VOCAB_VERSION = 2  # adds "unit": a byte vocabulary, which older versions cannot use
UNITS = ("char", "byte")
UNKNOWN_POLICIES = ("error", "skip", "replace")
N_CODEPOINTS = 0x110000
_MAX_NAMED = 10
UNKNOWN_HINT = "use --unknown skip or --unknown replace"  # sample's and attention's flags


def _describe_char(c: str, unit: str = "char") -> str:
    return f"byte 0x{ord(c):02X}" if unit == "byte" else f"{c!r} (U+{ord(c):04X})"


def unknown_chars_message(what: str, chars: Sequence[str], hint: str | None = UNKNOWN_HINT,
                          unit: str = "char") -> str:
    """One line naming up to ten distinct unknown characters (or bytes) and how many there are."""
    n = len(chars)
    shown = ", ".join(_describe_char(c, unit) for c in chars[:_MAX_NAMED])
    more = f" and {n - _MAX_NAMED} more" if n > _MAX_NAMED else ""
    noun = ("byte" if unit == "byte" else "character") + ("" if n == 1 else "s")
    tail = f" ({hint})" if hint else ""
    return f"{what} has {n} {noun} not in the vocabulary: {shown}{more}{tail}"


def _check_policy(unknown: str) -> None:
    if unknown not in UNKNOWN_POLICIES:
        raise ConfigError(
            f"unknown-character policy must be one of {', '.join(UNKNOWN_POLICIES)}, "
            f"got {unknown!r}"
        )


class CharTokenizer:
    """A fixed vocabulary of single code points; token ids are positions in `chars`.

    With `unit="byte"` each entry is a byte value b held as `chr(b)`; text is encoded to UTF-8
    first and decoded from it at the end (see `decode` for bytes that are not UTF-8)."""

    def __init__(self, chars: Sequence[str], unit: str = "char") -> None:
        if unit not in UNITS:
            raise ConfigError(f"unit must be one of {', '.join(UNITS)}, got {unit!r}")
        chars = tuple(chars)
        if not chars:
            raise DataError("the vocabulary is empty")
        index: dict[str, int] = {}
        for i, c in enumerate(chars):
            if not isinstance(c, str) or len(c) != 1:
                raise DataError(
                    f"vocabulary entry {i} is {c!r}; each entry must be exactly one character"
                )
            if unit == "byte" and ord(c) > 0xFF:
                raise DataError(f"vocabulary entry {i} is U+{ord(c):04X}, not a byte (0-255)")
            if 0xD800 <= ord(c) <= 0xDFFF:
                # Lone surrogates cannot be written as UTF-8, so they can never appear in a
                # corpus or a saved vocabulary.
                raise DataError(f"vocabulary entry {i} is a surrogate code point U+{ord(c):04X}")
            if c in index:
                raise DataError(f"vocabulary has the character {c!r} twice")
            index[c] = i
        self._chars = chars
        self._unit = unit
        self._index = index
        self._lut: np.ndarray | None = None
        self._byte_tables: tuple[bytes, bytes] | None = None

    # --- construction ---------------------------------------------------------------------

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        """The sorted distinct code points of `text`."""
        return cls(sorted(set(text)))

    @classmethod
    def from_codepoints(cls, codepoints: Iterable[int]) -> CharTokenizer:
        """A vocabulary from code point numbers, kept in the given order."""
        return cls([chr(int(c)) for c in codepoints])

    @classmethod
    def from_bytes(cls, values: Iterable[int]) -> CharTokenizer:
        """A byte vocabulary from byte values (0-255), kept in the given order."""
        return cls([chr(int(b)) for b in values], unit="byte")

    # --- properties -------------------------------------------------------------------------

    @property
    def chars(self) -> tuple[str, ...]:
        """The vocabulary in id order (in byte mode, byte b is `chr(b)`)."""
        return self._chars

    @property
    def unit(self) -> str:
        """What one token is: "char" (a code point) or "byte" (a byte of UTF-8)."""
        return self._unit

    @property
    def vocab_size(self) -> int:
        return len(self._chars)

    @property
    def id_dtype(self) -> np.dtype:
        """The smallest unsigned integer type that holds every id."""
        return np.dtype(np.uint16 if self.vocab_size <= 65535 else np.uint32)

    def __len__(self) -> int:
        return len(self._chars)

    def __contains__(self, c: object) -> bool:
        return c in self._index

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, CharTokenizer) and self._chars == other._chars
                and self._unit == other._unit)

    def __hash__(self) -> int:
        return hash((self._chars, self._unit))

    def __repr__(self) -> str:
        unit = ", unit='byte'" if self._unit == "byte" else ""
        return (f"CharTokenizer(vocab_size={self.vocab_size}{unit}, "
                f"fingerprint={self.fingerprint()[:12]})")

    def units_of(self, text: str) -> str:
        """`text` as this vocabulary's units: itself, or its UTF-8 bytes as code points 0-255."""
        return text.encode("utf-8").decode("latin-1") if self._unit == "byte" else text

    # --- encoding ---------------------------------------------------------------------------

    def _replacement_id(self, replacement: str | None) -> int:
        if replacement is None:
            return self._index.get(" ", 0)
        if not isinstance(replacement, str) or len(self.units_of(replacement)) != 1:
            noun = "byte" if self._unit == "byte" else "character"
            raise ConfigError(f"the replacement must be one {noun}, got {replacement!r}")
        unit = self.units_of(replacement)
        if unit not in self._index:
            noun = "" if self._unit == "byte" else "character "
            raise VocabError(f"the replacement {noun}{_describe_char(unit, self._unit)} is not "
                             "in the vocabulary")
        return self._index[unit]

    def encode(
        self,
        text: str,
        unknown: str = "error",
        replacement: str | None = None,
        what: str = "text",
    ) -> list[int]:
        """Token ids of `text`; characters outside the vocabulary follow the `unknown` policy.

        `unknown` is "error" (raise `VocabError` naming them), "skip" (drop them) or "replace"
        (use `replacement`; by default a space if the vocabulary has one, else its first
        character). `what` names the text in error messages, e.g. "prompt". In byte mode the
        ids are those of the text's UTF-8 bytes, and the policies apply to bytes.
        """
        _check_policy(unknown)
        rep_id = self._replacement_id(replacement) if unknown == "replace" else 0
        index = self._index
        text = self.units_of(text)
        try:
            return [index[c] for c in text]
        except KeyError:
            pass
        if unknown == "error":
            missing = [c for c in dict.fromkeys(text) if c not in index]
            raise VocabError(unknown_chars_message(what, missing, unit=self._unit))
        if unknown == "skip":
            return [index[c] for c in text if c in index]
        return [index.get(c, rep_id) for c in text]

    def lookup_table(self) -> np.ndarray:
        """A read-only int32 array mapping every code point to its id, or -1 if unknown."""
        if self._lut is None:
            lut = np.full(N_CODEPOINTS, -1, dtype=np.int32)
            lut[[ord(c) for c in self._chars]] = np.arange(self.vocab_size, dtype=np.int32)
            lut.flags.writeable = False
            self._lut = lut
        return self._lut

    def _byte_translation(self) -> tuple[bytes, bytes]:
        """(table, known) for bytes.translate: code points 0-255 whose ids fit in a byte."""
        if self._byte_tables is None:
            table = bytearray(256)
            known = bytearray()
            for b in range(256):
                i = self._index.get(chr(b), 256)
                if i < 256:
                    table[b] = i
                    known.append(b)
            self._byte_tables = (bytes(table), bytes(known))
        return self._byte_tables

    def _encode_bytes(self, cps: np.ndarray) -> np.ndarray | None:
        """Fast path for uint8 code points (ASCII text): two C-speed bytes.translate calls.

        Returns None when some byte is unknown or has an id >= 256, for the general path.
        """
        table, known = self._byte_translation()
        raw = cps.tobytes()
        if raw.translate(None, known):
            return None
        return np.frombuffer(raw.translate(table), dtype=np.uint8).astype(self.id_dtype)

    def encode_array(
        self,
        codepoints: np.ndarray,
        unknown: str = "error",
        replacement: str | None = None,
        what: str = "text",
    ) -> np.ndarray:
        """Vectorised `encode` of an integer array of code points (in byte mode: of byte
        values); returns `id_dtype` ids."""
        _check_policy(unknown)
        rep_id = self._replacement_id(replacement) if unknown == "replace" else 0
        cps = np.asarray(codepoints)
        if cps.dtype.kind not in "ui":
            raise TypeError(f"code points must be an integer array, got dtype {cps.dtype}")
        if cps.dtype == np.uint8 and cps.ndim == 1:
            fast = self._encode_bytes(cps)
            if fast is not None:
                return fast
        if cps.size and (int(cps.max()) >= N_CODEPOINTS or int(cps.min()) < 0):
            raise VocabError(f"{what} contains values that are not Unicode code points")
        ids = np.take(self.lookup_table(), cps)
        bad = ids < 0
        if bad.any():
            if unknown == "error":
                missing = [chr(c) for c in np.unique(cps[bad]).tolist()]
                raise VocabError(unknown_chars_message(what, missing, unit=self._unit))
            if unknown == "skip":
                ids = ids[~bad]
            else:
                ids[bad] = rep_id
        return ids.astype(self.id_dtype, copy=False)

    def decode(self, ids: Iterable[int]) -> str:
        """The text of a sequence of ids (a list, a NumPy array or a 1-D torch tensor).

        In byte mode the bytes are decoded as UTF-8; a byte sequence that is not UTF-8 (a
        model can sample one) becomes U+FFFD, the replacement character, and is never an
        error (`textstream.TextStream` does the same one id at a time)."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()  # numpy arrays and torch tensors -> Python ints, fast
        if isinstance(ids, int):
            ids = [ids]
        ids = list(ids)
        if not ids:
            return ""
        lo, hi = min(ids), max(ids)
        if lo < 0 or hi >= self.vocab_size:
            bad = lo if lo < 0 else hi
            raise VocabError(
                f"token id {bad} is out of range for a vocabulary of {self.vocab_size} characters"
            )
        chars = self._chars
        text = "".join([chars[i] for i in ids])
        if self._unit == "byte":
            return text.encode("latin-1").decode("utf-8", errors="replace")
        return text

    # --- identity and persistence -----------------------------------------------------------

    def _byte_values(self) -> list[int]:
        return [ord(c) for c in self._chars]

    def fingerprint(self) -> str:
        """sha256 of the canonical JSON of the vocabulary; equal iff the vocabularies are."""
        # A character vocabulary hashes its list alone, as it always has; a byte vocabulary
        # hashes its unit too, so bytes and the characters 0-255 never share a fingerprint.
        content: Any = list(self._chars)
        if self._unit == "byte":
            content = {"unit": "byte", "bytes": self._byte_values()}
        canonical = json.dumps(content, ensure_ascii=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("ascii")).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        if self._unit == "byte":
            return {"format": VOCAB_FORMAT, "version": BYTE_VOCAB_VERSION, "unit": "byte",
                    "bytes": self._byte_values()}
        return {"format": VOCAB_FORMAT, "version": VOCAB_VERSION, "chars": list(self._chars)}

    def to_json(self) -> str:
        # ensure_ascii=False keeps the file readable for any script; control characters are
        # still escaped by json.
        return json.dumps(self.to_dict(), ensure_ascii=False)

    @classmethod
    def from_dict(cls, d: Any, source: str = "vocabulary") -> CharTokenizer:
        if not isinstance(d, dict) or d.get("format") != VOCAB_FORMAT:
            raise DataError(f"{source} is not a chargpt vocabulary (format {VOCAB_FORMAT!r})")
        if d.get("version") not in (VOCAB_VERSION, BYTE_VOCAB_VERSION):
            raise DataError(
                f"{source} has unsupported vocabulary version {d.get('version')!r} "
                f"(expected {VOCAB_VERSION} or {BYTE_VOCAB_VERSION})"
            )
        unit = d.get("unit") if d["version"] == BYTE_VOCAB_VERSION else "char"
        values, chars = d.get("bytes"), d.get("chars")
        if unit == "byte" and not (isinstance(values, list) and all(
                type(b) is int and 0 <= b <= 0xFF for b in values)):
            raise DataError(f"{source}: 'bytes' must be a list of byte values (0-255)")
        if unit == "char" and not isinstance(chars, list):
            raise DataError(f"{source}: 'chars' must be a list of characters")
        if unit not in UNITS:
            raise DataError(f"{source}: unknown unit {unit!r} (expected char or byte)")
        try:
            return cls.from_bytes(values) if unit == "byte" else cls(chars)
        except DataError as e:
            raise DataError(f"{source}: {e}") from None

    @classmethod
    def from_json(cls, text: str, source: str = "vocabulary") -> CharTokenizer:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{source} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})"
            ) from None
        except RecursionError:
            raise DataError(f"{source} is not a vocabulary (JSON nested too deeply)") from None
        return cls.from_dict(d, source)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the vocabulary as UTF-8 JSON, atomically."""
        atomic_write_text(path, self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> CharTokenizer:
        path = Path(path)
        # Every Unicode character as JSON is ~5 MB: a larger file is no vocabulary.
        raw = read_bytes(path, what="vocabulary file", max_bytes=64 * 2**20)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path} is not valid UTF-8 (byte offset {e.start})") from None
        return cls.from_json(text, source=str(path))


def check_same_vocab(
    ours: CharTokenizer,
    theirs: CharTokenizer | int,
    *,
    what: str,
    error: type[ChargptError] = VocabError,
) -> None:
    """The one vocabulary-compatibility rule: ids mean the same characters on both sides.

    That holds only for the same characters in the same order (equal fingerprints). Where the
    other side records only a size (a model config's vocab_size), the sizes must match.
    `what` names the pair in the error, e.g. "runs/x/last and its data".
    """
    if isinstance(theirs, int):
        if ours.vocab_size != theirs:
            raise error(f"{what} do not match: a vocabulary of {ours.vocab_size} characters "
                        f"for a model that expects {theirs}")
    elif ours != theirs:
        raise error(f"{what} use different vocabularies ({ours.vocab_size} and "
                    f"{theirs.vocab_size} characters, fingerprints {ours.fingerprint()[:12]} "
                    f"and {theirs.fingerprint()[:12]})")

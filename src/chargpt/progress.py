"""Progress bars: one tqdm setup for every long job (reading, encoding, downloading, training).

A bar is drawn on stderr only when the caller asks for one and stderr is a terminal, so logs,
pipes and tests see nothing. Byte counts are shown with binary prefixes (KiB, MiB). tqdm is
imported when a bar is made, so importing chargpt stays cheap. `write_line` prints a line on
stderr around any bar being drawn (the one way warnings and errors reach the terminal), with
`printable` text.
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["printable", "progress_bar", "wanted", "write_line"]


def wanted(enabled: bool) -> bool:
    """Whether a bar asked for with `enabled` would be drawn (stderr must be a terminal)."""
    return enabled and sys.stderr.isatty()


def progress_bar(total: int, desc: str = "", *, unit: str = "B", enabled: bool = True,
                 initial: int = 0) -> Any:
    """A tqdm bar on stderr that disappears when done; a disabled (silent) one unless wanted.

    `unit="B"` counts bytes with binary prefixes; any other unit ("step") counts items.
    """
    # Plain tqdm, not tqdm.auto: a bar is only drawn on a terminal anyway, and tqdm.auto's
    # extra imports (asyncio, notebook detection) would cost `prepare` a tenth of a second.
    from tqdm import tqdm

    scale = {"unit_scale": True, "unit_divisor": 1024} if unit == "B" else {}
    return tqdm(total=total, desc=desc or None, unit=unit, initial=initial, file=sys.stderr,
                disable=not wanted(enabled), leave=False, dynamic_ncols=True, **scale)


def printable(text: str) -> str:
    """`text` that prints on any stream: the bytes of a file name that are not UTF-8 (which
    Python keeps as lone surrogates, surrogateescape) as \\xNN, any other lone surrogate as
    \\uXXXX; everything else as it is."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that stands for no byte (from a JSON escape)
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def write_line(text: str) -> None:
    """Print one line on stderr; a bar being drawn there is cleared first and redrawn after.
    The line and its newline go out in one write: ranks of a torchrun job share a stderr, and
    two writes each (text, then newline) let their lines run together."""
    text = printable(text)  # a path in a message must never stop the message
    tqdm = sys.modules.get("tqdm")  # no bar exists before tqdm is imported
    if tqdm is not None and getattr(tqdm.tqdm, "_instances", None):
        tqdm.tqdm.write(text + "\n", file=sys.stderr, end="")
    else:
        sys.stderr.write(text + "\n")
    sys.stderr.flush()

"""Corpora to measure on besides Tiny Shakespeare, built from Debian packages at run time.

No corpus text is committed: each corpus names a Debian package and the files in it, and
`fetch` downloads the package with `apt-get download` (no install, no root needed beyond what
apt's download needs), unpacks it with `dpkg-deb -x` into a temporary folder and writes the
text once into chargpt's cache (`~/.cache/chargpt/corpora/NAME.txt`, or `$CHARGPT_CACHE`), with
a JSON file beside it saying which package version it came from. Fortune files separate their
entries with a line holding `%`; those lines become blank lines, so the text reads as prose,
and the terminal colour codes some of them carry (Chinese) are taken out.

    python benchmarks/corpora.py                 # fetch every corpus, print the table
    python benchmarks/corpora.py poems-en de     # only these

The set spans scripts and sizes (61 K to 2.9 M characters: 47x): English songs and poems (the
small corpus a fine-tune is measured on), German (umlauts and ß), Russian (Cyrillic), and a
small English collection, the size of a person's own letters; Spanish, Italian, Polish and
Czech (Latin scripts with their accents), and Chinese (no spaces between words, thousands of
distinct characters) were added on 2026-12-06 to measure what a longer context is worth.
Debian's fortune packages are public-domain or freely licensed collections; see each
package's copyright file.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from chargpt.data.datasets import cache_dir
from chargpt.errors import DataError
from chargpt.fileio import atomic_write_text

FORTUNES = "usr/share/games/fortunes"


@dataclass(frozen=True)
class Corpus:
    """A corpus: the Debian package that carries it and which of its files, in name order."""

    name: str
    package: str
    folder: str  # inside the package
    files: tuple[str, ...] = ()  # none: every regular text file in `folder` (links skipped)
    about: str = ""


CORPORA = {c.name: c for c in (
    Corpus("wisdom-en", "fortunes", FORTUNES, ("wisdom",), "English sayings, 61 KB"),
    Corpus("work-en", "fortunes", FORTUNES, ("work",), "English sayings on work, 106 KB"),
    Corpus("poems-en", "fortunes", FORTUNES, ("songs-poems",), "English songs and poems, 234 KB"),
    Corpus("de", "fortunes-de", f"{FORTUNES}/de", (), "German fortunes, 3.0 MB"),
    Corpus("ru", "fortunes-ru", f"{FORTUNES}/ru", (), "Russian fortunes (Cyrillic), 3.5 MB"),
    Corpus("es", "fortunes-es", f"{FORTUNES}/es", (), "Spanish fortunes, 0.9 M characters"),
    Corpus("it", "fortunes-it", f"{FORTUNES}/it", (), "Italian fortunes, 1.6 M characters"),
    Corpus("pl", "fortunes-pl", f"{FORTUNES}/pl", (), "Polish fortunes, 1.9 M characters"),
    Corpus("cs", "fortunes-cs", f"{FORTUNES}/cs", (), "Czech fortunes, 1.3 M characters"),
    # without the package's Tang and Song poems: classical Chinese, all of which would fall in
    # the val split. Even so a char-level model meets 5,964 distinct characters here (4x128
    # after 0.7 M tokens: val 5.2 nats), so zh is for comparisons within it, not across
    Corpus("zh", "fortunes-zh", FORTUNES, ("chinese",), "Chinese sayings, 0.96 M characters"),
)}
# a terminal colour code (ESC [ ... m), which fortune prints and a model should not learn
COLOUR = re.compile(r"\x1b\[[0-9;]*m")


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise DataError(f"building the benchmark corpora needs {name} (Debian's apt and dpkg); "
                        "on another system, fetch the Debian package by hand")
    return found


def _download(package: str, into: Path) -> Path:
    """The package's .deb, downloaded into `into` (apt-get download: no install)."""
    done = subprocess.run([_tool("apt-get"), "download", "-q", package], cwd=into,
                          capture_output=True, text=True)
    if done.returncode != 0:  # an old or missing package list: refresh it once and retry
        subprocess.run([_tool("apt-get"), "update", "-qq"], capture_output=True)
        done = subprocess.run([_tool("apt-get"), "download", "-q", package], cwd=into,
                              capture_output=True, text=True)
    debs = sorted(into.glob(f"{package}_*.deb"))
    if done.returncode != 0 or not debs:
        reason = (done.stderr.strip().splitlines() or ["no .deb downloaded"])[-1]
        raise DataError(f"could not download the Debian package {package}: {reason}")
    return debs[0]


def _text_of(corpus: Corpus, root: Path) -> str:
    folder = root / corpus.folder
    names = corpus.files or tuple(sorted(
        p.name for p in folder.iterdir()
        if p.is_file() and not p.is_symlink() and p.suffix != ".dat"))
    parts = []
    for name in names:
        raw = (folder / name).read_text(encoding="utf-8")
        while COLOUR.search(raw):  # one taken out can leave another, as in ESC ESC [m [;m
            raw = COLOUR.sub("", raw)
        parts.append("\n".join("" if line == "%" else line for line in raw.splitlines()))
    return "\n\n".join(parts).strip() + "\n"


def fetch(name: str) -> Path:
    """The corpus `name` as one UTF-8 file in the cache, built on first use."""
    if name not in CORPORA:
        raise DataError(f"unknown corpus {name!r} (known: {', '.join(CORPORA)})")
    corpus = CORPORA[name]
    out = cache_dir() / "corpora" / f"{name}.txt"
    if out.is_file():
        return out
    with tempfile.TemporaryDirectory() as tmp:
        deb = _download(corpus.package, Path(tmp))
        subprocess.run([_tool("dpkg-deb"), "-x", str(deb), str(Path(tmp) / "root")], check=True)
        text = _text_of(corpus, Path(tmp) / "root")
        version = deb.name.split("_")[1]
    out.parent.mkdir(parents=True, exist_ok=True)
    provenance = {"corpus": name, "package": corpus.package, "version": version,
                  "folder": corpus.folder, "files": list(corpus.files) or "all",
                  "characters": len(text)}
    atomic_write_text(out.with_suffix(".json"), json.dumps(provenance, indent=1) + "\n")
    atomic_write_text(out, text)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"corpora to fetch (default: all of "
                        f"{', '.join(CORPORA)})")
    args = parser.parse_args(argv)
    print("| corpus | package | characters | distinct | bytes | about |")
    print("|---|---|---|---|---|---|")
    for name in args.names or list(CORPORA):
        path = fetch(name)
        text = path.read_text(encoding="utf-8")
        print(f"| {name} | {CORPORA[name].package} | {len(text):,} | {len(set(text))} | "
              f"{path.stat().st_size:,} | {CORPORA[name].about} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

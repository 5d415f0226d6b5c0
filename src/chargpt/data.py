"""The data path's public names, in one import: `from chargpt.data import prepare, BatchSampler`.

Each name lives in the module that owns its job (see docs/architecture.md): reading text in
textfiles.py, resolving sources in sources.py, `prepare` in preparation.py, where the splits
are cut in splits.py, opening prepared data in prepared.py and `BatchSampler` in batches.py.
This module only forwards to them, lazily (PEP 562), so `from chargpt.data import prepare`
does not load torch; code inside chargpt imports from the owning modules directly.
"""

from __future__ import annotations

import importlib
from typing import Any

_OWNERS = {
    "BatchSampler": "batches",
    "PreparedData": "prepared",
    "check_split_lengths": "prepared",
    "load_prepared": "prepared",
    "prepare": "preparation",
    "split_sizes": "splits",
    "resolve_sources": "sources",
    "encode_file": "textfiles",
    "read_text_file": "textfiles",
}

__all__ = sorted(_OWNERS)


def __getattr__(name: str) -> Any:
    if name in _OWNERS:
        return getattr(importlib.import_module(f".{_OWNERS[name]}", __package__), name)
    raise AttributeError(f"module 'chargpt.data' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__

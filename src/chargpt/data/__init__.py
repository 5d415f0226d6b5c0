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
    "BatchSampler": "data.batches",
    "PreparedData": "data.prepared",
    "check_split_lengths": "data.prepared",
    "load_prepared": "data.prepared",
    "prepare": "data.preparation",
    "split_sizes": "data.splits",
    "resolve_sources": "data.sources",
    "encode_file": "text.textfiles",
    "read_text_file": "text.textfiles",
}

__all__ = sorted(_OWNERS)


def __getattr__(name: str) -> Any:
    if name in _OWNERS:
        return getattr(importlib.import_module(f"chargpt.{_OWNERS[name]}"), name)
    raise AttributeError(f"module 'chargpt.data' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__

"""Shared fixtures."""

import sys

import pytest
import torch


@pytest.fixture
def item_calls(monkeypatch):
    """Count Tensor.item() calls made from chargpt's own code (host-device syncs it asks for).

    torch's CPU AdamW reads its step counters with .item() internally (the fused CUDA optimizer
    does not), so only calls whose caller lives in chargpt are counted."""
    calls = {"n": 0}
    real_item = torch.Tensor.item

    def counting_item(self):
        if "chargpt" in sys._getframe(1).f_code.co_filename:
            calls["n"] += 1
        return real_item(self)

    monkeypatch.setattr(torch.Tensor, "item", counting_item)
    return calls

"""Tests for chargpt.data.batches: shifted windows, reproducible, resumable streams, DDP ranks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import all_text

from chargpt.data.batches import BatchSampler
from chargpt.data.prepared import load_prepared
from chargpt.errors import CheckpointError, ConfigError, DataError


def test_batches_are_shifted_windows() -> None:
    tokens = np.arange(1000, dtype=np.uint32)
    x, y = BatchSampler(tokens, block_size=16, batch_size=8, seed=0).next_batch()
    assert x.shape == y.shape == (8, 16)
    assert x.dtype == y.dtype == torch.int64
    assert torch.equal(y, x + 1)  # y[:, t] = tokens[i + t + 1]
    assert torch.equal(x[:, 1:] - x[:, :-1], torch.ones(8, 15, dtype=torch.int64))
    assert x.is_contiguous() and y.is_contiguous()


def test_batches_from_prepared_data(prepared: Path) -> None:
    d = load_prepared(prepared)
    sampler = BatchSampler(d.train, block_size=8, batch_size=4, seed=1)
    for _ in range(5):
        x, y = sampler.next_batch()
        assert torch.equal(x[:, 1:], y[:, :-1])
        for row_x, row_y in zip(x.tolist(), y.tolist(), strict=True):
            text = d.tokenizer.decode(row_x) + d.tokenizer.decode(row_y[-1:])
            assert text in all_text(d)


def test_every_window_is_reachable() -> None:
    tokens = np.arange(12, dtype=np.uint16)
    sampler = BatchSampler(tokens, block_size=4, batch_size=64, seed=3)
    starts = {int(row[0]) for _ in range(10) for row in sampler.next_batch()[0]}
    assert starts == set(range(8))  # 12 - 4 windows, the last one ending at tokens[11]


def test_determinism_and_ranks() -> None:
    tokens = np.arange(100_000, dtype=np.uint32)

    def batches(seed: int, rank: int = 0) -> list[torch.Tensor]:
        s = BatchSampler(tokens, 8, 4, seed=seed, rank=rank, world_size=2)
        return [s.next_batch()[0] for _ in range(3)]

    assert all(torch.equal(a, b) for a, b in zip(batches(7), batches(7), strict=True))
    assert not torch.equal(batches(7)[0], batches(8)[0])
    assert not torch.equal(batches(7, rank=0)[0], batches(7, rank=1)[0])


def test_state_dict_round_trip() -> None:
    tokens = np.arange(10_000, dtype=np.uint16)
    a = BatchSampler(tokens, 8, 4, seed=5)
    for _ in range(3):
        a.next_batch()
    state = a.state_dict()
    assert state["generator"].dtype == torch.uint8 and state["batches"] == 3
    expected = [a.next_batch() for _ in range(4)]
    b = BatchSampler(tokens, 8, 4, seed=999)
    b.load_state_dict(state)
    got = [b.next_batch() for _ in range(4)]
    for (ex, ey), (gx, gy) in zip(expected, got, strict=True):
        assert torch.equal(ex, gx) and torch.equal(ey, gy)
    assert b.batches == 7
    with pytest.raises(CheckpointError):
        b.load_state_dict({"generator": torch.zeros(3)})


def test_sampler_rejects_bad_arguments() -> None:
    tokens = np.arange(10, dtype=np.uint16)
    with pytest.raises(DataError, match="too few for block_size 10"):
        BatchSampler(tokens, block_size=10, batch_size=1, seed=0)
    BatchSampler(tokens, block_size=9, batch_size=1, seed=0).next_batch()
    with pytest.raises(ConfigError):
        BatchSampler(tokens, block_size=0, batch_size=1, seed=0)
    with pytest.raises(ConfigError):
        BatchSampler(tokens, block_size=2, batch_size=1, seed=0, rank=2, world_size=2)

"""The whole-text evaluator against references: a bigram table, one full-window forward, and the
window plan's promise (every target once, each with at least half a window of history)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from chargpt.config.schema import ModelConfig
from chargpt.model.build import build_model
from chargpt.model.evaluate import evaluate_tokens, window_plan


def test_bigram_matches_table_lookup():
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="bigram", vocab_size=7, block_size=5))
    with torch.no_grad():
        model.token_embedding_table.weight.normal_()
    tokens = np.random.default_rng(0).integers(0, 7, size=301).astype(np.uint16)
    table = model.token_embedding_table.weight.detach()
    ref = F.cross_entropy(table[torch.as_tensor(tokens[:-1].astype(np.int64))],
                          torch.as_tensor(tokens[1:].astype(np.int64))).item()
    assert evaluate_tokens(model, tokens, block_size=5, batch_size=4) == pytest.approx(ref, 1e-6)


def test_one_window_equals_the_model_loss():
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=11, block_size=32, n_layer=2, n_head=2,
                                    n_embd=16)).eval()
    tokens = np.random.default_rng(1).integers(0, 11, size=33).astype(np.uint16)
    x = torch.as_tensor(tokens[None, :-1].astype(np.int64))
    y = torch.as_tensor(tokens[None, 1:].astype(np.int64))
    with torch.no_grad():
        _, loss = model(x, y)
    assert evaluate_tokens(model, tokens, block_size=32) == pytest.approx(loss.item(), 1e-6)


@pytest.mark.parametrize("tiled", [False, True])
@pytest.mark.parametrize("n, block", [(2, 8), (9, 8), (10, 8), (100, 8), (1000, 64), (77, 1)])
def test_window_plan_scores_every_target_once_with_enough_context(n, block, tiled):
    T = min(block, n - 1)
    scored = []
    for start, first in window_plan(n, block, tiled):
        for t in range(first, T):
            target = start + t
            scored.append(target)
            if start > 0 and not tiled:  # after the first window, at least half a window
                assert t + 1 >= math.ceil(T / 2)
    assert sorted(scored) == list(range(n - 1))

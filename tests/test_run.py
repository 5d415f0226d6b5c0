"""`Run`: what the CLI and the server both use to generate text and draw attention."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config, train_serve_run

from chargpt.errors import ConfigError
from chargpt.generation.settings import SamplingSettings
from chargpt.runs.run import load_run
from chargpt.training.launch import train


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return load_run(train_serve_run(tmp_path_factory.mktemp("run")), device="cpu")


def test_stream_ids_is_what_stream_and_generate_give(run):
    settings = SamplingSettings(temperature=0.8, top_k=5, seed=3)
    ids = run.encode_prompt("ROMEO:")
    streamed = "".join(run.stream_ids(ids, 30, settings))
    assert streamed == "".join(run.stream("ROMEO:", 30, settings))
    assert streamed == run.generate("ROMEO:", 30, temperature=0.8, top_k=5, seed=3)
    assert len(streamed) == 30


def test_closing_a_stream_restores_the_model(run):
    run.model.train()
    texts = run.stream_ids(run.encode_prompt(""), 100, SamplingSettings(seed=0))
    next(texts)
    assert not run.model.training
    texts.close()
    assert run.model.training
    run.model.eval()


def test_prompts(run):
    assert run.encode_prompt("") == run.tokenizer.encode("\n")  # the default prompt
    assert run.encode_prompt("ROMÉO", unknown="skip") == run.tokenizer.encode("ROMO")
    with pytest.raises(ConfigError, match="no characters left"):
        run.encode_prompt("ÉÉ", unknown="skip")


def test_attention_maps(run):
    ids = run.encode_prompt("ROMEO: to")
    maps = run.attention_maps(ids)
    assert maps.shape == (2, 2, 9, 9) and maps.device.type == "cpu"
    idx = torch.tensor([ids])
    torch.testing.assert_close(maps, run.model.attention_maps(idx)[:, 0])
    torch.testing.assert_close(maps.sum(-1), torch.ones(2, 2, 9))
    with pytest.raises(ConfigError, match="1 to 32 characters"):
        run.attention_maps(ids * 4)


def test_a_model_without_attention_says_so(corpus, tmp_path):
    out = tmp_path / "bigram"
    train(tiny_config(corpus, out, model={"arch": "bigram"}, max_steps=2, eval_interval=2),
          quiet=True)
    bigram = load_run(out, device="cpu")
    assert not bigram.has_attention
    with pytest.raises(ConfigError, match="no attention"):
        bigram.attention_maps([0, 1])

"""Config resolution: defaults, presets, TOML files and flags; each bad value is one error."""

import dataclasses

import pytest

from chargpt.config.fields import field_docs
from chargpt.config.presets import load_preset, preset_names
from chargpt.config.resolve import resolve_config
from chargpt.config.schema import (
    SECTIONS,
    Config,
    ConfigError,
    ModelConfig,
    apply_overrides,
)


def test_every_field_has_a_docstring():
    for cls in SECTIONS.values():
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            assert docs.get(f.name), f"{cls.__name__}.{f.name} has no docstring"


def test_field_names_are_unique_across_sections():
    # CLI flags are flat (--n-layer, --lr), so a name may appear in one section only.
    names = [f.name for cls in SECTIONS.values() for f in dataclasses.fields(cls)]
    assert len(names) == len(set(names))


def test_default_preset_is_the_fast_recipe_at_a_short_budgets_size():
    cfg = resolve_config()
    assert (cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd) == (3, 4, 96)
    assert (cfg.model.block_size, cfg.train.max_steps) == (64, 1500)
    assert cfg.model.pos_emb == "rope" and cfg.train.optimizer == "muon"  # the fast recipe
    fast = resolve_config("fast-cpu")  # shakespeare-cpu extends fast-cpu: only the size differs
    assert cfg == dataclasses.replace(
        fast, model=dataclasses.replace(fast.model, n_layer=3, n_embd=96),
        train=dataclasses.replace(fast.train, max_steps=1500, eval_interval=500))


def test_classic_preset_is_the_lecture_recipe():
    cfg = resolve_config("classic-cpu")
    assert (cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd) == (4, 4, 128)
    assert (cfg.model.block_size, cfg.train.batch_size, cfg.train.max_steps) == (64, 12, 2000)
    assert cfg.train.lr == 1e-3 and cfg.train.min_lr == 1e-4 and cfg.train.warmup_steps == 100
    assert cfg.model.pos_emb == "learned" and cfg.train.optimizer == "adamw"
    assert cfg.model.dropout == 0.0


def test_precedence_preset_then_file_then_flags(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("[model]\nn_layer = 2\nn_embd = 64\n[train]\nlr = 3e-4\n")
    cfg = resolve_config(config_file=f, overrides={"model": {"n_embd": 32}})
    assert cfg.model.n_layer == 2  # from the file
    assert cfg.model.n_embd == 32  # the flag wins over the file
    assert cfg.train.lr == 3e-4
    assert cfg.model.block_size == 64  # untouched: from the preset


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"model": {"n_embd": 130, "n_head": 4}}, "divisible by n_head"),
        ({"model": {"block_size": 0}}, "block_size must be >= 1"),
        ({"data": {"val_fraction": 0.0}}, "val_fraction must be in (0, 1)"),
        ({"data": {"val_fraction": 1.5}}, "val_fraction must be in (0, 1)"),
        ({"model": {"n_layers": 3}}, "unknown key 'n_layers' in [model]"),
        ({"modle": {"n_layer": 3}}, "unknown section [modle]"),
        ({"model": {"n_layer": "four"}}, "must be an integer"),
        ({"model": {"norm": "middle"}}, "must be one of pre, post, none"),
        ({"train": {"lr": -1.0}}, "lr must be >= 0"),
        ({"train": {"min_lr": 1.0, "lr": 0.1}}, "min_lr"),
        ({"model": {"dropout": 1.0}}, "dropout must be in [0, 1)"),
        ({"train": {"device": "tpu"}}, "device must be"),
        ({"model": {"bias": 1}}, "must be true or false"),
    ],
)
def test_impossible_configs_raise_one_line_errors(overrides, message):
    with pytest.raises(ConfigError) as e:
        apply_overrides(Config(), overrides, "test")
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_bad_toml_file(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text("[model\nn_layer = ")
    with pytest.raises(ConfigError, match="invalid TOML"):
        resolve_config(config_file=f)
    with pytest.raises(ConfigError, match="not found"):
        resolve_config(config_file=tmp_path / "missing.toml")


def test_int_accepted_for_float_fields():
    cfg = apply_overrides(Config(), {"train": {"lr": 1}}, "test")
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)


def test_presets_are_valid_and_listed():
    names = preset_names()
    assert "shakespeare-cpu" in names
    for name in names:
        resolve_config(name)  # raises on any bad key or value
        assert isinstance(load_preset(name), dict)
    with pytest.raises(ConfigError, match="unknown preset"):
        resolve_config("nope")


def test_config_round_trips_through_dict():
    cfg = resolve_config(overrides={"model": {"norm": "post", "n_layer": 2}})
    assert Config.from_dict(cfg.to_dict()) == cfg


def test_model_config_direct_validation():
    with pytest.raises(ConfigError):
        ModelConfig(n_embd=10, n_head=3)

"""The sizing rule: the forecast, the choice it makes for a budget, how a size is layered into a
config, and `--size auto` end to end (a real budget run that times its candidates here)."""

from __future__ import annotations

import dataclasses
import lzma
import math
import re

import pytest
import torch

from chargpt.cli import main
from chargpt.config import sizing
from chargpt.config.resolve import resolve_config
from chargpt.config.sizing import Forecast, Rule, block_params, choose, load_rule
from chargpt.data.stats import LZMA_SAMPLE, CorpusStats, corpus_bits_per_char, corpus_stats
from chargpt.errors import ConfigError
from chargpt.model.build import build_model
from chargpt.runs.rundir import RunDir

FORECAST = {"e0": 0.2, "e1": 0.3, "A": 30.0, "alpha": 0.3, "B": 40.0, "beta": 0.3,
            "repeats": 4.0, "C": 0.003, "gamma": 0.5, "spread": 0.05}
CORPUS = CorpusStats(train_tokens=1_000_000, vocab_size=65, bits_per_char=2.6)


@pytest.fixture
def fitted(monkeypatch):
    """The shipped sizes with a known forecast, whatever sizing.json holds."""
    data = sizing._rule_data()
    monkeypatch.setattr(sizing, "_rule_data", lambda: {**data, "forecast": FORECAST})
    load_rule.cache_clear()
    yield load_rule()
    load_rule.cache_clear()


_BODIES: dict[tuple[str, ...], dict[str, int]] = {}


def _body(rule) -> dict[str, int]:
    """Block parameters of each size (built on the meta device, once per set of sizes)."""
    key = tuple(s.name for s in rule.sizes)
    if key not in _BODIES:
        _BODIES[key] = _body_uncached(rule.sizes)
    return _BODIES[key]


def _body_uncached(sizes: tuple) -> dict[str, int]:
    out = {}
    for size in sizes:
        cfg = resolve_config("fast-cpu", overrides={**size.overrides(),
                                                    "model": {**size.model, "vocab_size": 65}})
        with torch.device("meta"):
            out[size.name] = block_params(build_model(cfg.model))
    return out


def _flops_times(rule, seconds_per_gflop: float) -> dict[str, float]:
    """A machine that takes `seconds_per_gflop` per GFLOP of a step (6 per parameter-token)."""
    body = _body(rule)
    return {s.name: 6 * body[s.name] * s.tokens_per_step * seconds_per_gflop / 1e9
            for s in rule.sizes}


def test_shipped_rule_is_valid():
    rule = load_rule()
    names = [s.name for s in rule.sizes]
    assert len(set(names)) == len(names) >= 5
    body = _body(rule)
    assert [body[n] for n in names] == sorted(body[n] for n in names)  # smallest first
    # fitted: numbers that make a loss, and where they came from (`train --time` relies on it)
    assert rule.forecast is not None
    assert rule.forecast.spread > 0 and rule.provenance["runs"] > 0
    assert math.isfinite(rule.forecast.loss(body[names[0]], 1e6, CORPUS))


def test_repeated_tokens_are_worth_less():
    f = Forecast(**FORECAST)
    u = 100_000
    assert f.effective_tokens(50_000, u) == 50_000
    worth = [f.effective_tokens(d, u) for d in (2 * u, 4 * u, 16 * u, 64 * u)]
    assert all(a < b for a, b in zip(worth, worth[1:], strict=False))
    assert worth[-1] < u * (1 + f.repeats) and worth[0] < 2 * u


def test_a_longer_block_is_forecast_lower_and_each_size_is_read_at_its_own(fitted):
    """The context term: zero at blocks of 64, `context * (1 - (64 / block)^power)` lower at
    longer ones; `choose` reads every size at its own block (4x192 and 6x256 read 128)."""
    f = Forecast(**{**FORECAST, "context": 0.04, "context_power": 1.0})
    p, d = 1e6, 2e6
    assert f.loss(p, d, CORPUS, block=64) == Forecast(**FORECAST).loss(p, d, CORPUS)
    assert f.loss(p, d, CORPUS, block=128) == pytest.approx(f.loss(p, d, CORPUS) - 0.02)
    assert f.loss(p, d, CORPUS, block=256) == pytest.approx(f.loss(p, d, CORPUS) - 0.03)
    rule = Rule(fitted.sizes, f)
    body, times = _body(rule), _flops_times(rule, 0.02)
    choice = choose(rule, 600, times, body, CORPUS)
    for name, (tokens, loss, _, _) in choice.candidates.items():
        size = rule.size(name)
        assert loss == pytest.approx(f.loss(body[name], tokens, CORPUS,
                                            block=size.model["block_size"]))
    assert {s.model["block_size"] for s in rule.sizes if s.name in choice.candidates} != {64}


def test_more_time_or_a_faster_machine_buys_a_larger_model(fitted):
    body = _body(fitted)
    times = _flops_times(fitted, 0.02)
    order = [s.name for s in fitted.sizes]
    picks = [order.index(choose(fitted, t, times, body, CORPUS).size.name)
             for t in (20, 120, 600, 3600, 36000)]
    assert picks == sorted(picks) and picks[-1] > picks[0]
    slow = choose(fitted, 120, times, body, CORPUS)
    fast = choose(fitted, 120, {k: v / 50 for k, v in times.items()}, body, CORPUS)
    assert order.index(fast.size.name) > order.index(slow.size.name)
    assert fast.loss < slow.loss


def test_the_choice_is_the_lowest_forecast_and_says_so(fitted):
    body, times = _body(fitted), _flops_times(fitted, 0.02)
    choice = choose(fitted, 300, times, body, CORPUS)
    assert choice.loss == min(c.loss for c in choice.candidates.values())
    assert choice.steps >= sizing.MIN_STEPS
    line = choice.describe("5m")
    assert choice.size.name in line and f"{choice.loss:.2f}" in line and "5m" in line


def test_a_budget_a_corpus_barely_uses_says_how_little(fitted):
    """A GPU's hours on a small corpus: the share of the time the run keeps is printed with two
    significant figures, never as 0%."""
    small = CorpusStats(20_000, 60, 3.0)
    choice = choose(fitted, 8 * 3600, _flops_times(fitted, 0.0002), _body(fitted), small)
    assert choice.share < 0.01
    line = choice.describe("8h")
    assert f"trains for {choice.share * 100:.2g}% of the time" in line and " 0% " not in line


def test_a_budget_too_short_for_any_size_takes_the_smallest(fitted):
    choice = choose(fitted, 1.0, _flops_times(fitted, 0.02), _body(fitted), CORPUS)
    assert choice.size == fitted.sizes[0] and choice.steps < sizing.MIN_STEPS


def test_a_corpus_too_small_for_the_budget_gets_fewer_passes(fitted, tmp_path):
    """Passes over a small corpus past the first cost val loss (learnt by heart), the more the
    larger the model: a long budget is then spent in part, and the run's budget is shortened."""
    from chargpt.data.preparation import prepare
    from chargpt.data.prepared import load_prepared
    from chargpt.distributed import DistEnv
    from chargpt.training.autosize import auto_size

    f, body = Forecast(**FORECAST), _body(fitted)
    small = CorpusStats(20_000, 60, 3.0)
    assert f.loss(body["6x256"], 40 * 20_000, small) > f.loss(body["6x256"], 4 * 20_000, small)
    times = _flops_times(fitted, 0.02)
    choice = choose(fitted, 3600, times, body, small)
    assert choice.share < sizing.SHORTEN_BELOW and choice.steps >= sizing.MIN_STEPS
    assert choice.loss < choose(fitted, 3600 * choice.share * 0.5, times, body, small).loss
    assert "overfit" in choice.describe("1h") and choice.passes == choice.tokens / 20_000
    assert choose(fitted, 3600, times, body, CORPUS).share > sizing.SHORTEN_BELOW

    (tmp_path / "t.txt").write_text("a small corpus of few words. " * 800, encoding="utf-8")
    prepare(str(tmp_path / "t.txt"), tmp_path / "data")
    data = load_prepared(tmp_path / "data")
    cfg = resolve_config("fast-cpu", overrides={"model": {"vocab_size": data.vocab_size},
                                                "train": {"time_budget": "1h"}})
    cfg, choice, _ = auto_size(cfg, RunDir(tmp_path / "run"), data, DistEnv(),
                               torch.device("cpu"), times)
    seconds = float(cfg.train.time_budget.removesuffix("s"))
    assert choice.share < sizing.SHORTEN_BELOW
    assert seconds == pytest.approx(3600 * choice.share, abs=2)
    assert "overfit" in cfg.train.size_choice
    # passes learn a corpus by heart, not seconds: a machine faster than its timing stops there
    assert cfg.train.step_cap == choice.steps


def test_past_its_best_a_size_is_trained_on_the_fewest_tokens_forecast_as_low(fitted):
    """Where more passes would be learnt by heart, forecasts within TIE of the lowest are one,
    and the fewest tokens among them win; where the forecast still falls at the end of what
    the budget buys, the budget is used whole."""
    f, body = Forecast(**FORECAST), _body(fitted)
    small = CorpusStats(20_000, 60, 3.0)
    times = _flops_times(fitted, 0.02)
    choice = choose(fitted, 3600, times, body, small)
    size, steps = choice.size, int(3600 / times[choice.size.name])
    priced = sizing._forecasts(f, size, {False: steps, True: steps}, body[size.name], small)
    loss = {tokens: value for value, tokens, *_ in priced}
    lowest = min(loss.values())
    assert choice.tokens == min(t for t in loss if loss[t] <= lowest + sizing.TIE)
    assert choice.loss == pytest.approx(loss[choice.tokens])
    assert lowest < choice.loss  # the lowest itself was at more tokens than chosen
    assert min(t for t in loss if loss[t] == lowest) > choice.tokens
    whole = choose(fitted, 3600, times, body, CORPUS)
    assert whole.share == 1.0


def test_an_unfitted_rule_refuses_to_choose(monkeypatch):
    data = sizing._rule_data()
    monkeypatch.setattr(sizing, "_rule_data", lambda: {**data, "forecast": None})
    load_rule.cache_clear()
    try:
        with pytest.raises(ConfigError, match="no fitted sizing rule"):
            choose(load_rule(), 60, {"3x96": 0.05}, {"3x96": 300_000}, CORPUS)
    finally:
        load_rule.cache_clear()


def test_small_corpora_get_dropout_where_it_costs_less_than_learning_by_heart(monkeypatch):
    """With a measured dropout form, a size trains with dropout where its forecast is lower:
    many passes over a small corpus, never a corpus read once."""
    data = sizing._rule_data()
    form = {**FORECAST, "dropout": 0.1, "dropout_free_passes": 8.0,
            "dropout_cost": 0.02, "dropout_slope": 0.5}
    monkeypatch.setattr(sizing, "_rule_data", lambda: {**data, "forecast": form})
    load_rule.cache_clear()
    try:
        rule = load_rule()
        body, times = _body(rule), _flops_times(rule, 0.02)
        tiny = CorpusStats(20_000, 60, 3.0)
        small = choose(rule, 3600, times, body, tiny)
        large = choose(rule, 300, times, body, CORPUS)
        assert small.passes > 1 and small.dropout == 0.1 and "dropout 0.1" in \
            small.describe("1h")
        assert large.dropout == 0.0
        f = Forecast(**form)
        p, d = body[small.size.name], small.tokens
        assert small.loss == pytest.approx(f.loss(p, d, tiny, dropout=True))
        assert f.loss(p, d, tiny, dropout=True) < f.loss(p, d, tiny)
        # read once, there is nothing to learn by heart: dropout only costs
        assert f.loss(p, 10_000, tiny, dropout=True) == pytest.approx(
            f.loss(p, 10_000, tiny) + 0.02)
        # it holds learning by heart off for its free passes, then it resumes at half the rate
        u, slope = tiny.train_tokens, f.C * (p / 1e6) ** f.gamma
        for passes in (9, 12, 30):
            assert f.loss(p, passes * u, tiny, dropout=True) == pytest.approx(
                f.loss(p, passes * u, tiny) - (passes - 1) * slope
                + 0.5 * (passes - 9) * slope + 0.02)
        assert f.loss(p, 5 * u, tiny, dropout=True) == pytest.approx(
            f.loss(p, 5 * u, tiny) - 4 * slope + 0.02)
        # without a measured form the rule never chooses it
        plain = choose(Rule(rule.sizes, Forecast(**FORECAST)), 3600, times, body, tiny)
        assert plain.dropout == 0.0
    finally:
        load_rule.cache_clear()


def test_a_forecast_with_dropout_is_quoted_with_its_own_range(fitted):
    """The dropout runs miss by more than the rest: a choice with dropout quotes
    `dropout_spread`, one without quotes `spread`, and so does the line of a named size."""
    form = Forecast(**{**FORECAST, "dropout": 0.1, "dropout_free_passes": 8.0,
                       "dropout_cost": 0.02, "dropout_spread": 0.11})
    rule = Rule(fitted.sizes, form)
    body, times = _body(rule), _flops_times(rule, 0.02)
    tiny = CorpusStats(20_000, 60, 3.0)
    small, large = choose(rule, 3600, times, body, tiny), choose(rule, 300, times, body, CORPUS)
    assert small.dropout and small.spread == 0.11
    assert f"({small.loss - 0.11:.2f}-{small.loss + 0.11:.2f})" in small.describe("1h")
    assert not large.dropout and large.spread == 0.05
    assert {c.spread for c in small.candidates.values() if c.dropout} == {0.11}
    assert {c.spread for c in small.candidates.values() if not c.dropout} <= {0.05}
    name = small.size.name
    args = (name, body[name], 1000, 2048, tiny)
    for dropout, spread in ((0.1, 0.11), (0.0, 0.05)):
        loss, _ = form.lowest(body[name], 1000, 2048, tiny, dropout > 0, 128)
        line = rule.expect(*args, dropout, 128)
        assert f"({loss - spread:.2f}-{loss + spread:.2f})" in line
    # a rule fitted before the dropout runs had their own range quotes `spread` for both
    assert Forecast(**FORECAST).quoted_range(True) == 0.05


def test_dropout_is_forecast_at_the_steps_its_slower_steps_buy(monkeypatch):
    """On a CPU a step with dropout is slower: a dropout candidate is read at the tokens its
    own step time buys (`dropout_seconds`), and a size's share is of those."""
    data = sizing._rule_data()
    form = {**FORECAST, "dropout": 0.1, "dropout_free_passes": 8.0, "dropout_cost": 0.02}
    monkeypatch.setattr(sizing, "_rule_data", lambda: {**data, "forecast": form})
    load_rule.cache_clear()
    try:
        rule = load_rule()
        body, times = _body(rule), _flops_times(rule, 0.02)
        small, big = CorpusStats(20_000, 60, 3.0), CorpusStats(200_000, 60, 3.0)
        slower = {name: 1.5 * t for name, t in times.items()}
        # a small corpus: dropout either way, its share is of what its slower steps buy
        fast, slow = choose(rule, 300, times, body, small), choose(rule, 300, times, body,
                                                                     small, slower)
        assert fast.dropout == slow.dropout == 0.1 and fast.size == slow.size
        bought = int(300 / slower[slow.size.name]) * slow.size.tokens_per_step
        assert slow.share == pytest.approx(slow.tokens / bought) and slow.share > fast.share
        # a larger one: dropout pays at the steps of a plain run, not at a third fewer
        assert choose(rule, 300, times, body, big).dropout == 0.1
        plain = choose(rule, 300, times, body, big, slower)
        assert plain.dropout == 0.0 and plain.share == pytest.approx(1.0, abs=0.01)
    finally:
        load_rule.cache_clear()


def test_no_size_is_read_past_the_passes_the_sweep_measured_it_at(fitted):
    """The form for learning by heart is a guess past the sweep's passes: a size is chosen for
    at most the passes it was measured at (the run is shortened and says why), unless no size
    was measured at as few; a hand run past them is told its forecast is a guess."""
    import dataclasses

    body, times = _body(fitted), _flops_times(fitted, 0.02)
    small = CorpusStats(200_000, 60, 3.0)
    free = choose(fitted, 3600, times, body, small)
    assert free.passes > 3  # without a limit the rule reads this size far past 3 passes
    most = {s.name: 3.0 for s in fitted.sizes}
    capped = dataclasses.replace(fitted, sizes=tuple(
        dataclasses.replace(s, passes=most[s.name], passes_dropout=most[s.name])
        for s in fitted.sizes))
    choice = choose(capped, 3600, times, body, small)
    assert choice.passes <= 3.0 and choice.steps >= sizing.MIN_STEPS
    assert all(tokens <= 3.0 * small.train_tokens for tokens, *_ in choice.candidates.values())
    assert choice.capped and choice.share < sizing.SHORTEN_BELOW
    assert "measured it at no more passes" in choice.describe("1h")
    # a corpus so small that no size gets MIN_STEPS within its passes: the limits are dropped
    tiny = CorpusStats(500, 30, 3.0)
    assert choose(capped, 3600, times, body, tiny) == choose(
        dataclasses.replace(capped, sizes=fitted.sizes), 3600, times, body, tiny)
    # a hand-named size past its measured passes says its forecast is a guess
    name = free.size.name
    past = capped.expect(name, body[name], 1000, 1024, small, 0.0, 64)
    within = capped.expect(name, body[name], 50, 1024, small, 0.0, 64)
    assert "no more than 3.0 passes" in past and "guess" not in within


def test_the_shipped_rule_measured_every_size_somewhere():
    """fit_sizing.py records each size's most passes in the sweep, a larger unmeasured size
    inheriting from the largest measured one: never more passes than a smaller size."""
    sizes = load_rule().sizes
    assert all(0 < s.passes < math.inf and 0 < s.passes_dropout < math.inf for s in sizes)
    assert [s.passes for s in sizes] == sorted((s.passes for s in sizes), reverse=True)


def test_predictable_text_costs_fewer_bits():
    assert corpus_bits_per_char("abcd" * 5000) < 0.5
    import random

    rng = random.Random(0)
    noise = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(20000))
    assert corpus_bits_per_char(noise) > 4.0
    with pytest.raises(ConfigError):
        corpus_bits_per_char("")


def test_a_named_size_sits_between_the_preset_and_the_flags():
    cfg = resolve_config(None, None, {"train": {"size": "4x192"}, "model": {"n_layer": 2}})
    assert (cfg.model.n_layer, cfg.model.n_embd, cfg.model.block_size) == (2, 192, 128)
    assert cfg.train.size == "4x192" and cfg.train.optimizer == "muon"  # the preset's recipe
    with pytest.raises(ConfigError, match="unknown size"):
        resolve_config(None, None, {"train": {"size": "5x5"}})


def test_auto_size_with_a_shape_flag_is_an_error():
    with pytest.raises(ConfigError, match="chooses n_layer"):
        resolve_config(None, None, {"train": {"size": "auto", "time_budget": "1m"},
                                    "model": {"n_layer": 2}})


@pytest.fixture
def small_corpus(tmp_path):
    text = "".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n"
                   for i in range(3000))
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    return path


def test_time_alone_chooses_the_size_and_records_why(fitted, small_corpus, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--input", str(small_corpus), "--time", "16s", "--out", str(out),
                 "--sample-chars", "0", "--eval-iters", "5", "--no-progress"])
    assert code == 0
    log = capsys.readouterr().out
    cfg = RunDir(out).read_config()
    assert cfg.train.size in {s.name for s in fitted.sizes}
    assert cfg.train.size_choice.startswith("--time 16s chooses " + cfg.train.size)
    assert cfg.train.size_choice in log
    size = fitted.size(cfg.train.size)
    assert (cfg.model.n_layer, cfg.model.n_embd) == (size.model["n_layer"], size.model["n_embd"])
    # the choosing counts against the budget: the first plan already has it as time used
    used = float(re.search(r"steps planned \(([\d.]+)s used so far", log).group(1))
    assert used > 0
    # how close the run ends to its budget is tested with a synthetic clock (test_budget.py):
    # a bound on this real clock would fail whenever the machine is shared


def test_the_same_auto_sized_command_again_continues_its_run(fitted, small_corpus, tmp_path,
                                                              capsys):
    """--auto-resume with --time alone (a restart script's command): the second call continues
    the size the first one chose, and never chooses again."""
    out = tmp_path / "run"
    flags = ["train", "--input", str(small_corpus), "--time", "8s", "--out", str(out),
             "--sample-chars", "0", "--eval-iters", "5", "--no-progress", "--auto-resume"]
    assert main(flags) == 0
    first = RunDir(out).read_config()
    capsys.readouterr()
    assert main(flags) == 0
    log = capsys.readouterr().out
    assert f"done: {first.train.planned_steps} steps" in log and "chooses" not in log
    assert RunDir(out).read_config() == first


def test_a_named_size_with_a_budget_says_what_to_expect(fitted, small_corpus, tmp_path, capsys):
    """`--size NAME --time T` forecasts too, once its steps are planned, from the same rule:
    the lowest forecast at its planned steps or fewer (best/ keeps the best evaluation)."""
    from chargpt.data.prepared import load_prepared

    out = tmp_path / "run"
    assert main(["train", "--input", str(small_corpus), "--size", "2x64", "--time", "6s",
                 "--out", str(out), "--sample-chars", "0", "--eval-iters", "5",
                 "--no-progress"]) == 0
    log = capsys.readouterr().out
    cfg = RunDir(out).read_config()
    line = cfg.train.size_choice
    assert line in log and line.startswith("size 2x64 for ")
    planned = int(re.search(r"(\d+) steps planned", log).group(1))  # the first plan
    assert f"size 2x64 for {planned:,} steps" in line
    stats = corpus_stats(load_prepared(RunDir(out).data_dir(cfg)))
    size = fitted.size("2x64")
    want, at = fitted.forecast.lowest(block_params(build_model(cfg.model)), planned,
                                      size.tokens_per_step, stats, block=cfg.model.block_size,
                                      epoch=cfg.train.epoch_order)
    assert f"val loss forecast {want:.2f} " in line
    assert ("learnt by heart" in line) == (at < sizing.SHORTEN_BELOW * planned)


def test_in_epoch_order_a_token_is_worth_more_and_learnt_by_heart_as_fast():
    """In epoch order (each window once a pass) a token is worth `epoch_worth` tokens of
    random windows; what the passes after the first cost is the same in either order."""
    f = Forecast(**FORECAST, epoch_worth=1.3)
    never = Forecast(**{**FORECAST, "C": 0.0, "epoch_worth": 1.3})  # never learns by heart
    p, u = 1e6, CORPUS.train_tokens
    for passes in (0.5, 2, 5):
        d = passes * u
        assert never.loss(p, d, CORPUS, epoch=True) == pytest.approx(never.loss(p, 1.3 * d,
                                                                                CORPUS))
        assert f.loss(p, d, CORPUS, epoch=True) < f.loss(p, d, CORPUS)
        assert (f.loss(p, d, CORPUS, epoch=True) - never.loss(p, d, CORPUS, epoch=True)
                == pytest.approx(f.loss(p, d, CORPUS) - never.loss(p, d, CORPUS)))


def test_a_run_is_forecast_in_its_own_order(fitted):
    """`choose` and a named size's line are told the run's order: the same budget on a small
    corpus is forecast lower in epoch order when the form says so."""
    rule = dataclasses.replace(fitted, forecast=Forecast(**FORECAST, epoch_worth=1.5))
    small, body = CorpusStats(50_000, 60, 3.0), _body(fitted)
    times = _flops_times(fitted, 0.02)
    walked, drawn = (choose(rule, 600, times, body, small, epoch=epoch) for epoch in (True, False))
    assert walked.passes > 1 and walked.loss < drawn.loss
    lines = [rule.expect("4x128", body["4x128"], 2000, 1024, small, 0.0, 64, epoch)
             for epoch in (True, False)]
    walk, draw = (float(re.search(r"forecast ([\d.]+)", line).group(1)) for line in lines)
    assert walk < draw


def test_the_fast_recipe_walks_the_corpus_in_epoch_order_unless_told_not_to():
    """The recipe every size is layered on reads each window once a pass (docs/sizing.md), and
    the forecast holds what a token read so is worth; a flag still
    wins, with a named size and with the automatic one."""
    from chargpt.training.autosize import apply_size

    rule = load_rule()
    assert rule.forecast is not None and rule.forecast.epoch_worth > 1.0
    assert resolve_config().train.data_order == "epoch"  # the default preset extends it
    named = rule.sizes[0].name
    assert resolve_config(overrides={"train": {"size": named}}).train.data_order == "epoch"
    for size in (named, "auto"):
        cfg = resolve_config(overrides={"train": {"size": size, "data_order": "random",
                                                  "time_budget": "1m"}})
        assert cfg.train.data_order == "random"
        assert apply_size(cfg, rule.sizes[-1]).train.data_order == "random"


def test_a_named_size_says_when_its_steps_would_learn_the_corpus_by_heart(fitted):
    """A size named by hand is not shortened (flags win), so its forecast line says after how
    many steps its lowest comes when that is well before its end, and not otherwise."""
    body, tiny = _body(fitted), CorpusStats(20_000, 60, 3.0)
    loss, at = fitted.forecast.lowest(body["6x256"], 3000, 2048, tiny, block=128)
    assert at < 1000  # 300 passes: long past where 6x256 learns 20 K tokens by heart
    line = fitted.expect("6x256", body["6x256"], 3000, 2048, tiny, 0.0, 128)
    assert f"val loss forecast {loss:.2f} " in line
    assert f"lowest after about {at:,} steps" in line and "learnt by heart" in line
    assert "learnt by heart" not in fitted.expect("6x256", body["6x256"], 300, 2048, CORPUS,
                                                  0.0, 128)


def test_a_preset_keeps_its_own_shape(fitted, small_corpus, tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--input", str(small_corpus), "--preset", "fast-cpu", "--time", "6s",
                 "--out", str(out), "--sample-chars", "0", "--eval-iters", "5",
                 "--no-progress"]) == 0
    cfg = RunDir(out).read_config()
    assert cfg.train.size == "" and (cfg.model.n_layer, cfg.model.n_embd) == (4, 128)


def test_auto_size_takes_no_block_longer_than_the_splits(fitted, tmp_path):
    """A corpus whose val split holds 100 tokens cannot be given a block of 128."""
    from chargpt.config.schema import Config
    from chargpt.data.preparation import prepare
    from chargpt.data.prepared import load_prepared
    from chargpt.distributed import DistEnv
    from chargpt.training.autosize import _measure

    (tmp_path / "t.txt").write_text("abcdefghij " * 100, encoding="utf-8")
    prepare(str(tmp_path / "t.txt"), tmp_path / "data")
    data = load_prepared(tmp_path / "data")
    assert 64 < len(data.val) - 1 < 128
    cfg = resolve_config("fast-cpu", overrides={"model": {"vocab_size": data.vocab_size}})
    assert isinstance(cfg, Config)
    times, _, _ = _measure(cfg, RunDir(tmp_path / "run"), data, DistEnv(), torch.device("cpu"),
                           budget=1e6, stats=corpus_stats(data))
    assert times and all(fitted.size(n).model["block_size"] <= 64 for n in times)


def test_a_corpus_is_priced_on_the_same_amount_of_text_whatever_its_size():
    """lzma packs a longer text better only because it has seen more of it; the forecast has
    the corpus's size as a term of its own, so the price must not count it twice."""
    import random

    rng = random.Random(1)
    words = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 7)))
             for _ in range(500)]
    text = " ".join(rng.choice(words) for _ in range(4 * LZMA_SAMPLE // 5))
    assert len(text) > 3 * LZMA_SAMPLE
    assert corpus_bits_per_char(text) == corpus_bits_per_char(text[:LZMA_SAMPLE])
    # on the whole text, the same words would look more predictable
    whole = 8.0 * len(lzma.compress(text.encode(), preset=6)) / len(text)
    assert whole < corpus_bits_per_char(text) - 0.05


@pytest.mark.parametrize("fast", [False, True])
def test_estimate_times_the_sizes_in_the_precision_train_would_use(small_corpus, monkeypatch,
                                                                   fast):
    from chargpt import device
    from chargpt.training import autosize

    monkeypatch.setattr(device, "fast_bfloat16", lambda _: fast)
    seen = []

    def timed(cfg, rundir, data, dev, env):
        seen.append(cfg.train.dtype)
        return 0.01

    monkeypatch.setattr(autosize, "_time_size", timed)
    assert main(["estimate", "--input", str(small_corpus), "--time", "1m"]) == 0
    assert seen and set(seen) == {"bfloat16" if fast else "float32"}


def _auto_timings(corpus, tmp_path, monkeypatch, budget: str, per_layer: float):
    """auto_size under a dropout form with steps of `per_layer` seconds a layer (twice that
    with dropout): what was timed, in order, and the choice."""
    from chargpt.data.preparation import prepare
    from chargpt.data.prepared import load_prepared
    from chargpt.distributed import DistEnv
    from chargpt.training import autosize

    data = sizing._rule_data()
    form = {**FORECAST, "dropout": 0.1, "dropout_free_passes": 8.0, "dropout_cost": 0.02}
    monkeypatch.setattr(sizing, "_rule_data", lambda: {**data, "forecast": form})
    load_rule.cache_clear()
    seen = []

    def timed(cfg, rundir, data, dev, env):
        seen.append((cfg.train.size, cfg.model.dropout))
        return per_layer * (2 if cfg.model.dropout else 1) * cfg.model.n_layer

    monkeypatch.setattr(autosize, "_time_size", timed)
    # deeper sizes learn by heart faster: dropout pays there
    monkeypatch.setattr(autosize, "block_params_of", lambda cfg: {
        size.name: 200_000 * size.model["n_layer"] for size in load_rule().sizes})
    try:
        prepare(str(corpus), tmp_path / "data")
        prepared = load_prepared(tmp_path / "data")
        cfg = resolve_config("fast-cpu", overrides={
            "model": {"vocab_size": prepared.vocab_size}, "train": {"time_budget": budget}})
        _, choice, _ = autosize.auto_size(cfg, RunDir(tmp_path / "run"), prepared, DistEnv(),
                                          torch.device("cpu"))
        return seen, choice, Forecast(**form), corpus_stats(prepared)
    finally:
        load_rule.cache_clear()


def test_auto_times_each_size_with_the_rules_dropout_where_it_could_pay(
        small_corpus, monkeypatch, tmp_path):
    """With a dropout form, a size is timed with its dropout too when the steps the budget
    buys of it read the corpus often enough for dropout to pay, and only then; a choice with
    dropout is planned at the dropout steps' time."""
    seen, choice, form, stats = _auto_timings(small_corpus, tmp_path, monkeypatch, "10m", 0.001)
    names = list(dict.fromkeys(name for name, _ in seen))
    pays = {s.name: form.dropout_can_pay(
        200_000 * s.model["n_layer"], 600 * sizing.TRAIN_SHARE / (0.001 * s.model["n_layer"])
        * s.tokens_per_step, stats, s.model["block_size"])
        for s in load_rule().sizes if s.name in names}
    assert len(names) > 1 and any(pays.values()) and not all(pays.values())
    # every size plain first, then with dropout where it could pay
    assert seen == [(n, 0.0) for n in names] + [(n, 0.1) for n in names if pays[n]]
    if choice.dropout:  # its steps are those of the slower, dropout step
        per_step = 0.002 * choice.size.model["n_layer"]
        assert choice.tokens <= int(600 * sizing.TRAIN_SHARE / per_step) * \
            choice.size.tokens_per_step
    # a short budget on slow steps reads the corpus too few times: nothing timed with dropout
    seen, choice, _, _ = _auto_timings(small_corpus, tmp_path / "short", monkeypatch, "30s", 0.5)
    assert seen and all(d == 0.0 for _, d in seen) and choice.dropout == 0.0


def test_every_size_is_timed_before_any_dropout_and_untimed_dropout_is_not_offered(
        small_corpus, monkeypatch, tmp_path):
    """Timing a larger size at all is worth more than timing a smaller one's dropout steps
    (poems-en at 2 min once lost its best size, 4x192, to the share spent on dropout
    timings): plain steps come first; a size whose dropout steps the share leaves untimed is
    priced at infinite dropout steps, and `choose` then offers it without dropout only."""
    from chargpt.data.preparation import prepare
    from chargpt.data.prepared import load_prepared
    from chargpt.distributed import DistEnv
    from chargpt.training import autosize

    monkeypatch.setattr(sizing.Forecast, "dropout_can_pay", lambda *args, **kwargs: True)
    seen = []

    def timed(cfg, rundir, data, dev, env):
        seen.append((cfg.train.size, cfg.model.dropout))
        return 0.01 * cfg.model.n_layer * (1.5 if cfg.model.dropout else 1.0)

    monkeypatch.setattr(autosize, "_time_size", timed)
    prepare(str(small_corpus), tmp_path / "data")
    data = load_prepared(tmp_path / "data")
    cfg = resolve_config("fast-cpu", overrides={"model": {"vocab_size": data.vocab_size}})
    rule = load_rule()
    assert rule.forecast.dropout > 0
    # a share that holds the plain steps of the sizes timed and a few of their dropout steps
    stats = corpus_stats(data)
    times, dropped, body = autosize._measure(cfg, RunDir(tmp_path / "run"), data, DistEnv(),
                                             torch.device("cpu"), budget=65.0, stats=stats)
    plain = [name for name, d in seen if d == 0.0]
    with_dropout = [name for name, d in seen if d > 0.0]
    assert seen == [(n, 0.0) for n in plain] + [(n, rule.forecast.dropout)
                                                for n in with_dropout]
    assert plain == list(times) and len(times) >= 3
    assert 0 < len(with_dropout) < len(times) and with_dropout == list(dropped)[:len(with_dropout)]
    assert dropped == {name: pytest.approx(1.5 * seconds) if name in with_dropout else math.inf
                       for name, seconds in times.items()}
    choice = choose(rule, 60.0, times, body, stats, dropped)
    untimed = [name for name in times if name not in with_dropout]
    assert all(choice.candidates[name].dropout == 0.0 for name in untimed
               if name in choice.candidates)
    # priced at what they would take, they would have been offered with dropout
    finite = {name: 1.5 * seconds for name, seconds in times.items()}
    assert any(choose(rule, 60.0, times, body, stats, finite).candidates[name].dropout > 0
               for name in untimed)

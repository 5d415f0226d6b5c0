"""Which model a time budget buys for a corpus, and the val loss to expect: the sizing rule.

The rule is data, `sizing.json`, written by `benchmarks/fit_sizing.py` from the measurements
of `benchmarks/sweep.py`: a ladder of sizes (each a few values over the fast recipe's preset),
a forecast fitted to the sweep, and where the fit came from. The forecast gives a size's val
loss after it has trained on `tokens` tokens of a corpus:

    loss = e0 + e1 * h + A * P^-alpha + B * D_eff^-beta + C * P_M^gamma * max(0, D/U - 1)
           + context * ((REFERENCE_BLOCK / block)^context_power - 1)

with `h` the corpus's bits per character under lzma (how predictable the text is), `P` the
size's parameters inside its blocks (`P_M` in millions), and `D_eff` the tokens trained on,
where each pass over a corpus of `U` training tokens after the first is worth less than the
one before (a repeated token's value decays with the passes, `repeats`):
D_eff = U * (1 + r * (1 - exp(-(D/U - 1)/r))) past one epoch. A small corpus read many times
is also learnt by heart, more so by a large model: the val loss then rises by C * P_M^gamma
per pass after the first, whatever the corpus's size. So a budget longer than a corpus can use
is better spent in part, and `choose` picks the tokens as well as the size (never more than
the budget buys). Dropout is the other way out: with it, a fitted number of passes goes by
before that cost begins, it then grows at a fitted share of its rate without dropout, and a
fitted cost of its own is added, so it is chosen where the passes would cost more than it
does. The last term is what a size's longer blocks are worth (the loss averages every
position of a block). The fast recipe draws its batches in epoch order (each window once a
pass, none twice and none missed), which makes a token worth a fitted number of tokens of
random windows (`epoch_worth`, fitted with the rest held: most of the sweep drew random
windows); every forecast is told which order its run uses.
No size is read past the passes over a corpus the sweep measured it at (`Size.passes`): past
them that form is a guess. Nothing in the rule knows the machine: `choose` is given each
size's step time as measured here, turns the budget into tokens per size, and takes the size
with the lowest forecast. A faster machine affords more tokens, and so a larger size.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass, field
from importlib import resources
from typing import TYPE_CHECKING, Any, NamedTuple

from chargpt.data.stats import CorpusStats, corpus_stats
from chargpt.errors import ConfigError

if TYPE_CHECKING:
    from chargpt.data.prepared import PreparedData

__all__ = ["Candidate", "Choice", "Forecast", "Rule", "Size", "block_params", "choose", "expected",
           "load_rule", "MIN_STEPS", "REFERENCE_BLOCK", "SHORTEN_BELOW", "TRAIN_SHARE"]

# a size needs this many steps to warm up (the recipe's 50), train and cool down; fewer and it
# is not a candidate
MIN_STEPS = 100
# of a budget, what the steps get: the planner keeps the rest for evaluations (budget.EVAL_SHARE)
# and its margin, and the choice itself takes a few seconds
TRAIN_SHARE = 0.88
# a choice that wants less than this share of what the budget buys ends the run early; above
# it the difference is within the forecast's noise and the whole budget is used
SHORTEN_BELOW = 0.9
TOKEN_GRID = 0.85  # the shorter token counts tried: the budget's, then 85% of it, and so on
TIE = 0.01  # a size's forecasts this close are one, past its best: the fewest tokens win
Priced = tuple[float, int, float, bool, int]  # loss, tokens, dropout, capped, tokens bought
REFERENCE_BLOCK = 64  # the block the forecast's context term is zero at: the smallest sizes'


@dataclass(frozen=True)
class Size:
    """One size of the ladder: values over the base preset's model and train tables, and the
    most passes over a corpus the sweep measured it at, without and with dropout (a size it
    never measured has those of the largest smaller one that it did): past them the form
    for learning by heart is a guess (docs/sizing.md), so `choose` reads no further."""

    name: str
    model: dict[str, Any]
    train: dict[str, Any]
    base_preset: str
    passes: float = math.inf
    passes_dropout: float = math.inf

    @property
    def tokens_per_step(self) -> int:
        return int(self.train["batch_size"]) * int(self.model["block_size"])

    def most_passes(self, dropout: bool) -> float:
        return self.passes_dropout if dropout else self.passes

    def overrides(self) -> dict[str, dict[str, Any]]:
        return {"model": dict(self.model), "train": dict(self.train)}


@dataclass(frozen=True)
class Forecast:
    """The fitted loss of a size after some tokens of a corpus (see the module docstring)."""

    e0: float
    e1: float
    A: float
    alpha: float
    B: float
    beta: float
    repeats: float
    C: float
    gamma: float
    spread: float  # half the range quoted around a forecast: the fit's worst miss, measured
    dropout: float = 0.0  # the dropout the sweep measured (0: the rule never chooses dropout)
    dropout_free_passes: float = 0.0  # passes after the first it holds learning by heart off
    dropout_cost: float = 0.0  # and what it costs by itself
    context: float = 0.0  # what blocks longer than REFERENCE_BLOCK are worth (see `loss`)
    context_power: float = 1.0
    dropout_spread: float = 0.0  # the half-range of a forecast with dropout (0: `spread`)
    dropout_slope: float = 1.0  # learning by heart's rate with dropout, past its free passes,
    # as a share of the rate without
    epoch_worth: float = 1.0  # what a token is worth when the batches walk the corpus in epoch
    # order (each window once a pass), in tokens of windows drawn at random

    def quoted_range(self, dropout: bool) -> float:
        """Half the range quoted around a forecast: the dropout runs miss by more (what
        dropout buys differs from corpus to corpus), so a forecast with dropout has its own."""
        return max(self.spread, self.dropout_spread) if dropout else self.spread

    def effective_tokens(self, tokens: float, train_tokens: float) -> float:
        if tokens <= train_tokens:
            return tokens
        extra = tokens / train_tokens - 1.0
        return train_tokens * (1.0 + self.repeats * (1.0 - math.exp(-extra / self.repeats)))

    def loss(self, body_params: float, tokens: float, corpus: CorpusStats,
             dropout: bool = False, block: int = REFERENCE_BLOCK, epoch: bool = False) -> float:
        """The forecast, for training without dropout or (`dropout`) with the forecast's
        `dropout` value: that holds learning by heart off for `dropout_free_passes` passes,
        slows it by `dropout_slope` after them and adds `dropout_cost`, all fitted to the
        sweep's runs with dropout. A model reading blocks of `block` characters is forecast
        `context * (1 - (64 / block)^context_power)` lower than at blocks of 64 (the training
        estimate averages over every position of a block, so a longer one gives its later
        positions more to go on). With `epoch` (batches in epoch order, each window once a
        pass) a token is worth `epoch_worth` tokens of random windows, learning by heart aside
        (that goes by the passes)."""
        u = corpus.train_tokens
        d = self.effective_tokens(tokens * (self.epoch_worth if epoch else 1.0), u)
        free = self.dropout_free_passes if dropout else 0.0
        overfit = self.C * (body_params / 1e6) ** self.gamma * max(0.0, tokens / u - 1.0 - free)
        if dropout:
            overfit = overfit * self.dropout_slope + self.dropout_cost
        context = self.context * ((REFERENCE_BLOCK / block) ** self.context_power - 1.0)
        return (self.e0 + self.e1 * corpus.bits_per_char + context
                + self.A * body_params ** -self.alpha + self.B * d ** -self.beta + overfit)

    def dropout_can_pay(self, body_params: float, tokens: float, corpus: CorpusStats,
                        block: int = REFERENCE_BLOCK, epoch: bool = False) -> bool:
        """Whether dropout is forecast lower than none after `tokens` or fewer: what it saves
        only grows with the passes, so `tokens` is the place to ask."""
        return bool(self.dropout) and (
            self.loss(body_params, tokens, corpus, True, block, epoch)
            < self.loss(body_params, tokens, corpus, False, block, epoch))

    def lowest(self, body_params: float, steps: int, tokens_per_step: int, corpus: CorpusStats,
               dropout: bool = False, block: int = REFERENCE_BLOCK, epoch: bool = False
               ) -> tuple[float, int]:
        """A run's best val loss forecast, and its step: the lowest at its steps and at the
        shorter runs `choose` reads (TOKEN_GRID), since best/ keeps the best evaluation."""
        counts = [steps]
        while counts[-1] * TOKEN_GRID >= MIN_STEPS:
            counts.append(int(counts[-1] * TOKEN_GRID))
        return min((self.loss(body_params, n * tokens_per_step, corpus, dropout, block, epoch),
                    n) for n in counts)


@dataclass(frozen=True)
class Rule:
    """The ladder of sizes, the forecast (None until a sweep was fitted), and its provenance."""

    sizes: tuple[Size, ...]
    forecast: Forecast | None
    provenance: dict[str, Any] = field(default_factory=dict)

    def expect(self, name: str, body_params: int, steps: int, tokens_per_step: int,
               corpus: CorpusStats, dropout: float, block: int, epoch: bool = False
               ) -> str | None:
        """One line for the log of a run of size `name` planned for `steps` steps of
        `tokens_per_step` tokens in blocks of `block` (flags may have changed the size's batch
        or block, or its batches' order, `epoch`; every rank's batches count): the val loss
        to expect. None without a fitted forecast, or at a dropout it was not fitted to."""
        f = self.forecast
        if f is None or dropout not in (0.0, f.dropout):
            return None
        loss, at = f.lowest(body_params, steps, tokens_per_step, corpus, dropout > 0, block,
                            epoch)
        spread, tokens = f.quoted_range(dropout > 0), steps * tokens_per_step
        regularised = f", dropout {dropout:g}" if dropout else ""
        most = self.size(name).most_passes(dropout > 0)
        guess = (f"; the sweep measured this size at no more than {most:.1f} passes, past them "
                 "it is a guess" if tokens > most * corpus.train_tokens else "")
        if at < SHORTEN_BELOW * steps:
            guess += (f"; lowest after about {at:,} steps: past them the corpus is learnt by "
                      "heart, and only best/ keeps the model from before")
        return (f"size {name} for {steps:,} steps ({tokens / 1e6:.1f} M tokens, "
                f"{tokens / corpus.train_tokens:.1f} passes over the corpus{regularised}): "
                f"val loss forecast {loss:.2f} ({loss - spread:.2f}-{loss + spread:.2f})"
                f"{guess}")

    def size(self, name: str) -> Size:
        for s in self.sizes:
            if s.name == name:
                return s
        raise ConfigError(f"unknown size {name!r} (known: {', '.join(s.name for s in self.sizes)})")


class Candidate(NamedTuple):
    """A size's best forecast at a budget: the tokens to train it on, the val loss to expect
    there, with the dropout it trains at, and half the range quoted around it."""

    tokens: int
    loss: float
    dropout: float
    spread: float


@dataclass(frozen=True)
class Choice:
    """The size chosen for a budget, the tokens to train it on (`share` of what the budget
    buys of it: less when more passes over the corpus would overfit), what it is expected to
    reach, and the candidates (by size name) it was chosen from."""

    size: Size
    tokens: int
    steps: int
    loss: float
    spread: float
    dropout: float
    candidates: dict[str, Candidate]
    share: float = 1.0
    passes: float = 0.0
    capped: bool = False  # fewer tokens because the sweep never measured the size at more

    def describe(self, budget: str) -> str:
        """One line for the log: what was chosen and why."""
        others = ", ".join(f"{name} {c.loss:.2f}" for name, c in self.candidates.items())
        why = ("the sweep measured it at no more passes" if self.capped else
               "more passes would overfit")
        # two significant figures: a GPU buys so much that a corpus may use 0.4% of it
        share = f"{self.share * 100:.2g}%"
        shorter = (f"; {why}, so it trains for {share} of the time"
                   if self.share < SHORTEN_BELOW else "")
        regularised = f", dropout {self.dropout:g}" if self.dropout else ""
        return (f"--time {budget} chooses {self.size.name} (about {self.steps:,} steps, "
                f"{self.tokens / 1e6:.1f} M tokens, {self.passes:.1f} passes over the corpus"
                f"{regularised}): "
                f"val loss forecast {self.loss:.2f} ({self.loss - self.spread:.2f}-"
                f"{self.loss + self.spread:.2f}){shorter}; forecasts at this budget: {others}")


def expected(cfg: Any, model: Any, data: PreparedData, tokens_per_step: int) -> str | None:
    """For a run (`cfg`, a schema.Config: schema imports this module) of a size named by hand
    (`--size NAME`) whose `max_steps` are planned: the line that says the val loss to expect
    (`Rule.expect`), for the log and `size_choice`. None for any other run, or one whose size
    says it already."""
    tc, rule = cfg.train, load_rule()
    if tc.size in ("", "auto") or tc.size_choice:
        return None
    return rule.expect(rule.size(tc.size).name, block_params(model), tc.max_steps,
                       tokens_per_step, corpus_stats(data), cfg.model.dropout,
                       cfg.model.block_size, tc.epoch_order)


def block_params(model: Any) -> int:
    """Parameters inside a model's Transformer blocks (an nn.Module): the forecast's P."""
    return sum(p.numel() for name, p in model.named_parameters()
               if name.startswith("transformer.h."))


def _rule_data() -> Any:
    """sizing.json, as shipped in the package."""
    return json.loads(resources.files("chargpt.config").joinpath("sizing.json").read_text("utf-8"))


def _measured_passes(value: Any) -> tuple[float, float]:
    """sizing.json's {"plain": passes, "dropout": passes} of a size (absent: no limit)."""
    if value is None:
        return math.inf, math.inf
    if not isinstance(value, dict) or set(value) != {"plain", "dropout"}:
        raise ConfigError("sizing.json: a size's measured_passes must give 'plain' and "
                          "'dropout'")
    return float(value["plain"]), float(value["dropout"])


@functools.lru_cache(maxsize=1)
def load_rule() -> Rule:
    """The rule shipped in the package (sizing.json)."""
    data = _rule_data()
    if not (isinstance(data, dict) and isinstance(data.get("sizes"), list) and data["sizes"]):
        raise ConfigError("sizing.json: 'sizes' must be a non-empty list")
    base = data.get("base_preset", "fast-cpu")
    sizes = tuple(Size(s["name"], s["model"], s["train"], base,
                       *_measured_passes(s.get("measured_passes"))) for s in data["sizes"])
    forecast = Forecast(**data["forecast"]) if data.get("forecast") else None
    return Rule(sizes, forecast, data.get("provenance") or {})


def choose(rule: Rule, train_seconds: float, step_seconds: dict[str, float],
           body_params: dict[str, int], corpus: CorpusStats,
           dropout_seconds: dict[str, float] | None = None, epoch: bool = False) -> Choice:
    """The size with the lowest forecast after `train_seconds` of its steps (`step_seconds`,
    measured here, for the sizes that were measured) among those that get MIN_STEPS; the
    smallest size measured when none does (`Choice.steps` then says how few it gets).

    Each size is also forecast on shorter runs (TOKEN_GRID), and with dropout when the
    forecast has measured it (it pays when many passes over a small corpus would otherwise be
    learnt by heart) at its steps with dropout (`dropout_seconds`, where measured: on a CPU
    they are slower), never past the passes the sweep measured the size at (`Size.passes`)
    unless no size was measured at as few. The lowest forecast of all wins (see `_safest`
    for how long). `epoch`: the run draws its batches in epoch order."""
    if rule.forecast is None:
        raise ConfigError("this chargpt has no fitted sizing rule (sizing.json's forecast)")
    measured = [size for size in rule.sizes if size.name in step_seconds]
    if not measured:
        raise ConfigError("no size of the sizing rule was timed")
    candidates: dict[str, Candidate] = {}
    bought: dict[str, int] = {}
    capped: dict[str, bool] = {}
    forecast = rule.forecast
    for size in measured:
        steps = int(train_seconds / step_seconds[size.name])
        if steps < MIN_STEPS and candidates:
            continue
        with_dropout = (dropout_seconds or {}).get(size.name, step_seconds[size.name])
        forecasts = _forecasts(forecast, size, {False: steps,
                                                True: int(train_seconds / with_dropout)},
                               body_params[size.name], corpus, epoch)
        if not forecasts:
            continue
        loss, tokens, dropout, capped[size.name], bought[size.name] = _safest(forecasts)
        candidates[size.name] = Candidate(tokens, loss, dropout,
                                          forecast.quoted_range(dropout > 0))
    if not candidates:  # a corpus so small that no size was measured at as many passes
        unlimited = [dataclasses.replace(s, passes=math.inf, passes_dropout=math.inf)
                     for s in rule.sizes]
        return choose(dataclasses.replace(rule, sizes=tuple(unlimited)), train_seconds,
                      step_seconds, body_params, corpus, dropout_seconds, epoch)
    enough = {name: c for name, c in candidates.items()
              if c.tokens >= MIN_STEPS * rule.size(name).tokens_per_step}
    best = min(enough or candidates, key=lambda n: candidates[n].loss)
    size, chosen = rule.size(best), candidates[best]
    return Choice(size, chosen.tokens, chosen.tokens // size.tokens_per_step, chosen.loss,
                  chosen.spread, chosen.dropout, candidates, chosen.tokens / bought[best],
                  chosen.tokens / corpus.train_tokens, capped[best])


def _safest(forecasts: list[Priced]) -> Priced:
    """The lowest of a size's `forecasts` or, when it is short of what the budget buys (more
    passes would be learnt by heart, or were never measured), the shortest within TIE of it:
    the forecast is flat near its lowest, and a corpus learnt by heart sooner than the form
    says (wisdom-en) costs more than one learnt by heart later gains."""
    best = min(forecasts)
    if best[1] >= best[4]:
        return best  # the budget's whole: nothing is learnt by heart yet
    return min((f for f in forecasts if f[2] == best[2] and f[0] <= best[0] + TIE),
               key=lambda f: f[1])


def _forecasts(forecast: Forecast, size: Size, steps: dict[bool, int], body_params: int,
               corpus: CorpusStats, epoch: bool = False) -> list[Priced]:
    """(loss, tokens, dropout, capped, tokens bought) of `size` trained for the `steps` the
    budget buys without and with dropout (`steps[dropout]`) or fewer (TOKEN_GRID), never past
    the passes the sweep measured it at."""
    out = []
    for dropout in (False, True) if forecast.dropout else (False,):
        if dropout and steps[True] < MIN_STEPS:
            continue  # too few with dropout, or not timed (autosize prices them as infinite)
        bought = max(1, steps[dropout]) * size.tokens_per_step
        cap = size.most_passes(dropout) * corpus.train_tokens / size.tokens_per_step
        top = max(1, int(min(steps[dropout], cap)))
        if top < min(steps[dropout], MIN_STEPS):
            continue  # the sweep never measured this size that far at this corpus size
        tried = [top]
        while tried[-1] * TOKEN_GRID >= MIN_STEPS:
            tried.append(int(tried[-1] * TOKEN_GRID))
        for n in tried:
            tokens = n * size.tokens_per_step
            out.append((forecast.loss(body_params, tokens, corpus, dropout,
                                      size.model["block_size"], epoch), tokens,
                        forecast.dropout if dropout else 0.0, n == top < steps[dropout],
                        bought))
    return out

"""Fit the sizing rule's forecast to the sweep and write it into the package's sizing.json.

Reads benchmarks/results/sweep.jsonl (benchmarks/sweep.py), fits the nine numbers of
config/sizing.py's forecast to every run's best val loss by least squares (torch's L-BFGS in
float64), and prints each run's measured and forecast loss. It then refits once per corpus
with that corpus left out and forecasts it, which says how well the rule does on a corpus it
has never seen. `spread`, the half-range quoted around every forecast, is the larger of the
worst miss of the fit and the root-mean-square miss on left-out corpora.

It draws every corpus's measured losses against the forecast curves (`--plot`).

    python benchmarks/fit_sizing.py [--results FILE] [--dry-run] [--plot PNG]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
from pathlib import Path

import torch

from chargpt.config.sizing import CorpusStats, Forecast

ROOT = Path(__file__).resolve().parents[1]
RULE = ROOT / "src/chargpt/config/sizing.json"
# the forecast's numbers, each from an unconstrained one the fit moves
NAMES = ("e0", "e1", "A", "alpha", "B", "beta", "repeats", "C", "gamma")
START = torch.tensor([0.3, 0.25, math.log(20.0), 0.3, math.log(30.0), 0.25, math.log(4.0),
                      math.log(0.003), 0.5], dtype=torch.float64)
SCALED = torch.tensor([0, 0, 1, 0, 1, 0, 0, 1, 0], dtype=torch.float64)  # the starts vary these


def forecast_of(theta: torch.Tensor, spread: float = 0.0) -> Forecast:
    e0, e1, log_a, alpha, log_b, beta, log_r, log_c, gamma = theta.tolist()
    return Forecast(e0, e1, math.exp(log_a), alpha, math.exp(log_b), beta, math.exp(log_r),
                    math.exp(log_c), gamma, spread)


def predict(theta: torch.Tensor, rows: list[dict]) -> torch.Tensor:
    e0, e1, log_a, alpha, log_b, beta, log_r, log_c, gamma = theta
    p = torch.tensor([r["body_params"] for r in rows], dtype=torch.float64)
    d = torch.tensor([r["tokens"] for r in rows], dtype=torch.float64)
    u = torch.tensor([r["train_tokens"] for r in rows], dtype=torch.float64)
    h = torch.tensor([r["lzma_bpc"] for r in rows], dtype=torch.float64)
    r_ = log_r.exp()
    extra = (d / u - 1).clamp(min=0)
    d_eff = torch.where(d <= u, d, u * (1 + r_ * (1 - torch.exp(-extra / r_))))
    overfit = log_c.exp() * (p / u) ** gamma * extra
    return e0 + e1 * h + log_a.exp() * p ** -alpha + log_b.exp() * d_eff ** -beta + overfit


def fit(rows: list[dict]) -> torch.Tensor:
    target = torch.tensor([r["best_val"] for r in rows], dtype=torch.float64)
    best, best_err = START.clone(), math.inf
    for scale in (1.0, 0.5, 2.0):  # a few starts: the problem is not convex
        theta = (START + SCALED * math.log(scale)).requires_grad_()
        opt = torch.optim.LBFGS([theta], max_iter=500, line_search_fn="strong_wolfe")

        def closure(theta=theta, opt=opt):
            opt.zero_grad()
            err = ((predict(theta, rows) - target) ** 2).mean()
            err.backward()
            return err

        for _ in range(5):
            opt.step(closure)
        err = float(((predict(theta.detach(), rows) - target) ** 2).mean())
        if math.isfinite(err) and err < best_err:
            best, best_err = theta.detach().clone(), err
    return best


def plot(forecast: Forecast, rows: list[dict], path: Path) -> None:
    """Each corpus's measured best val loss against tokens, and every size's forecast curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    corpora = sorted({r["corpus"] for r in rows})
    sizes = sorted({(r["body_params"], r["size"]) for r in rows})
    cols = min(3, len(corpora))
    rows_ = math.ceil(len(corpora) / cols)
    fig, axes = plt.subplots(rows_, cols, figsize=(4.6 * cols, 3.8 * rows_), squeeze=False)
    for ax in list(axes.flat)[len(corpora):]:
        ax.set_visible(False)
    for ax, corpus in zip(list(axes.flat), corpora, strict=False):
        mine = [r for r in rows if r["corpus"] == corpus]
        stats = CorpusStats(mine[0]["train_tokens"], mine[0]["vocab"], mine[0]["lzma_bpc"])
        for i, (body, name) in enumerate(sizes):
            color = f"C{i}"
            tokens = [2e5 * 1.2 ** k for k in range(30)]
            ax.plot([t / 1e6 for t in tokens], [forecast.loss(body, t, stats) for t in tokens],
                    color=color, lw=1, label=name)
            runs = [r for r in mine if r["size"] == name]
            ax.plot([r["tokens"] / 1e6 for r in runs], [r["best_val"] for r in runs], "o",
                    color=color)
        ax.set_xscale("log")
        measured = [r["best_val"] for r in mine]
        ax.set_ylim(min(measured) - 0.15, max(measured) + 0.15)
        ax.set_title(f"{corpus} ({stats.train_tokens / 1e3:,.0f} K training tokens)")
        ax.set_xlabel("tokens trained (M)")
        ax.set_ylabel("best val loss")
        ax.grid(alpha=0.3)
    axes[0][0].legend(title="size: forecast, o measured", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    print(f"wrote {path}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks/results/sweep.jsonl")
    ap.add_argument("--dry-run", action="store_true", help="print, do not write sizing.json")
    ap.add_argument("--plot", type=Path, default=ROOT / "docs/images/sizing_sweep.png",
                    help="the measured losses and each size's forecast, per corpus")
    args = ap.parse_args()
    rows = [json.loads(line) for line in args.results.read_text().splitlines() if line.strip()]
    regularised = [r for r in rows if r.get("dropout", 0.0) > 0.0]
    rows = [r for r in rows if r.get("dropout", 0.0) == 0.0]
    theta = fit(rows)
    fitted = predict(theta, rows).tolist()
    worst = max(abs(f - r["best_val"]) for f, r in zip(fitted, rows, strict=True))
    corpora = sorted({r["corpus"] for r in rows})
    held_out = []
    print("| corpus left out of the fit | runs | mean miss | rms miss |\n|---|---:|---:|---:|")
    for corpus in corpora if len(corpora) > 2 else []:
        rest = [r for r in rows if r["corpus"] != corpus]
        mine = [r for r in rows if r["corpus"] == corpus]
        guess = predict(fit(rest), mine).tolist()
        misses = [g - r["best_val"] for g, r in zip(guess, mine, strict=True)]
        held_out += misses
        print(f"| {corpus} | {len(mine)} | {sum(misses) / len(misses):+.3f} | "
              f"{math.sqrt(sum(e * e for e in misses) / len(misses)):.3f} |")
    print()
    loco = math.sqrt(sum(e * e for e in held_out) / len(held_out)) if held_out else math.nan
    spread = round(max(worst, loco if held_out else 0.0), 3)
    forecast = forecast_of(theta, spread)
    print("| corpus | size | tokens | epochs | best val | forecast | miss |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        stats = CorpusStats(r["train_tokens"], r["vocab"], r["lzma_bpc"])
        f = forecast.loss(r["body_params"], r["tokens"], stats)
        print(f"| {r['corpus']} | {r['size']} | {r['tokens'] / 1e6:.2f} M | "
              f"{r['tokens'] / r['train_tokens']:.1f} | {r['best_val']:.4f} | {f:.4f} | "
              f"{f - r['best_val']:+.4f} |")
    if regularised:  # the rule's dropout entry: dropout and no cost of learning by heart
        print("\n| corpus | size | dropout | passes | best val | forecast with dropout | miss | "
              "forecast without |\n|---|---|---:|---:|---:|---:|---:|---:|")
        for r in regularised:
            stats = CorpusStats(r["train_tokens"], r["vocab"], r["lzma_bpc"])
            f = forecast.loss(r["body_params"], r["tokens"], stats, regularised=True)
            plain = forecast.loss(r["body_params"], r["tokens"], stats)
            print(f"| {r['corpus']} | {r['size']} | {r['dropout']} | "
                  f"{r['tokens'] / r['train_tokens']:.1f} | {r['best_val']:.4f} | {f:.4f} | "
                  f"{f - r['best_val']:+.4f} | {plain:.4f} |")
    print(f"\n{len(rows)} runs on {', '.join(corpora)}; worst miss {worst:.4f}; rms miss on a "
          f"left-out corpus {loco:.4f}; spread {spread}")
    print(json.dumps({n: getattr(forecast, n) for n in NAMES}))
    plot(forecast, rows, args.plot)
    if args.dry_run:
        return 0
    rule = json.loads(RULE.read_text())
    rule["forecast"] = {**{n: round(getattr(forecast, n), 6) for n in NAMES}, "spread": spread}
    rule["provenance"] = {
        "fitted": datetime.date.today().isoformat(), "runs": len(rows), "corpora": corpora,
        "worst_miss": round(worst, 4), "left_out_rms_miss": None if not held_out else round(
            loco, 4), "torch": sorted({r["torch"] for r in rows}),
        "sweep": "benchmarks/sweep.py; benchmarks/fit_sizing.py",
        "loss": "best val loss, chargpt's training estimate (mean over every position of "
                "random val blocks)"}
    RULE.write_text(json.dumps(rule, indent=1) + "\n")
    print(f"wrote {RULE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Figures, drawn headless with matplotlib's Agg backend and written atomically.

matplotlib is imported inside the functions so that importing chargpt stays cheap and never
touches a display.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _figure(figsize: tuple[float, float]):
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt, plt.figure(figsize=figsize, dpi=110)


def _save(plt, fig, path: Path) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)


def plot_loss_curve(rows: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> None:
    """Training loss at each log step (thin) and train/val loss at each evaluation (markers)."""
    plt, fig = _figure((7.0, 4.2))
    ax = fig.add_subplot(1, 1, 1)
    train_rows = [r for r in rows if r.get("kind") == "train"]
    eval_rows = [r for r in rows if r.get("kind") == "eval"]
    if train_rows:
        ax.plot([r["step"] for r in train_rows], [r["loss"] for r in train_rows],
                color="tab:blue", alpha=0.3, linewidth=1, label="train loss (running)")
    if eval_rows:
        steps = [r["step"] for r in eval_rows]
        ax.plot(steps, [r["train_loss"] for r in eval_rows], "o-", color="tab:blue",
                markersize=3, label="train loss (eval)")
        ax.plot(steps, [r["val_loss"] for r in eval_rows], "o-", color="tab:orange",
                markersize=3, label="val loss (eval)")
        best = min(eval_rows, key=lambda r: r["val_loss"])
        ax.annotate(f"best val {best['val_loss']:.3f}", (best["step"], best["val_loss"]),
                    textcoords="offset points", xytext=(-10, 12), ha="right", fontsize=8)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per character)")
    ax.grid(alpha=0.3)
    if train_rows or eval_rows:
        ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    _save(plt, fig, path)

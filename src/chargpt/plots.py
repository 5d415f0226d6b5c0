"""Figures, drawn headless with matplotlib's Agg backend and written atomically.

matplotlib is imported inside the functions so that importing chargpt stays cheap and never
touches a display.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from chargpt.errors import ConfigError
from chargpt.fileio import atomic_write


def _figure(figsize: tuple[float, float]):
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt, plt.figure(figsize=figsize, dpi=110)


def _save(plt, fig, path: Path) -> None:
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", bbox_inches="tight"))
    finally:
        plt.close(fig)


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


def plot_ladder_curves(
    curves: Mapping[str, Sequence[dict[str, Any]]], path: str | Path, title: str = ""
) -> None:
    """Validation loss at each evaluation, one line per ladder step, in the order given."""
    plt, fig = _figure((8.5, 4.8))
    ax = fig.add_subplot(1, 1, 1)
    # ten distinct hues, then black and grey: neighbouring rungs never share a colour
    palette = [*plt.get_cmap("tab10").colors, "black", "dimgray"]
    styles = ("-", "--", "-.", ":")
    later: list[float] = []
    for i, (name, rows) in enumerate(curves.items()):
        evals = [r for r in rows if r.get("kind") == "eval"]
        if not evals:
            continue
        ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals],
                # past twelve rungs the colours repeat; shifting the style keeps pairs apart
                styles[(i + i // len(palette)) % len(styles)], color=palette[i % len(palette)],
                linewidth=1.6,
                label=name)
        later += [r["val_loss"] for r in evals if r["step"] > 0]
    if later:
        # step 0 sits at ln(vocab) for every model; cropping it keeps the differences visible
        lo, hi = min(later), max(later)
        pad = 0.04 * (hi - lo or 1.0)
        ax.set_ylim(lo - pad, hi + pad)
    ax.set_xlabel("step")
    ax.set_ylabel("val loss (nats per character)")
    ax.grid(alpha=0.3)
    if later:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    if title:
        ax.set_title(title, fontsize=10)
    _save(plt, fig, path)


_VISIBLE = {"\n": "\u21b5", " ": "\u2423", "\t": "\u21e5", "\r": "\u240d"}


def attention_label(ch: str) -> str:
    """A character as an axis label: whitespace becomes a visible symbol."""
    return _VISIBLE.get(ch, ch if ch.isprintable() else f"U+{ord(ch):04X}")


def _as_layer_head_maps(maps: Any) -> Any:
    """Attention weights as a numpy array (n_layer, n_head, T, T), whatever shape came in.

    Accepted: (n_layer, 1, n_head, T, T) as `GPT.attention_maps` returns for one sequence,
    (n_layer, n_head, T, T), (n_head, T, T) for one layer, or (T, T) for one head.
    """
    import numpy as np

    if hasattr(maps, "detach"):
        maps = maps.detach().float().cpu().numpy()
    arr = np.asarray(maps, dtype=np.float32)
    if arr.ndim == 5:
        if arr.shape[1] != 1:
            raise ConfigError(f"attention maps for {arr.shape[1]} sequences; pass one (B = 1)")
        arr = arr[:, 0]
    elif arr.ndim == 3:
        arr = arr[None]
    elif arr.ndim == 2:
        arr = arr[None, None]
    elif arr.ndim != 4:
        raise ConfigError(f"attention maps must have 2 to 5 dimensions, got shape {arr.shape}")
    if arr.shape[-1] != arr.shape[-2]:
        raise ConfigError(f"attention maps must be square (T, T), got shape {arr.shape}")
    if 0 in arr.shape:
        raise ConfigError(f"attention maps are empty, shape {arr.shape}")
    return arr


def plot_attention_grid(
    maps: Any, tokens: Sequence[str], path: str | Path, title: str = ""
) -> None:
    """A grid of attention maps, layers down and heads across, the characters on both axes.

    Rows of each map are queries (the character doing the looking), columns are keys (the
    character looked at); each row sums to one. All maps share one colour scale, with a square
    root stretch so that weak but real attention is still visible.
    """
    from matplotlib.colors import PowerNorm

    arr = _as_layer_head_maps(maps)
    n_layer, n_head, T, _ = arr.shape
    if len(tokens) != T:
        raise ConfigError(f"{len(tokens)} token labels for attention maps over {T} positions")
    labels = [attention_label(t) for t in tokens]
    cell = min(3.6, max(1.8, 0.14 * T))  # inches per map: room for one label per character
    # at least room for the title and the axis labels, which a single small map is narrower than
    plt, fig = _figure((max(4.8, n_head * cell + 1.4),
                        max(3.8, n_layer * cell + (1.0 if title else 0.6))))
    fig.set_layout_engine("constrained")
    axes = fig.subplots(n_layer, n_head, squeeze=False)
    norm = PowerNorm(gamma=0.5, vmin=0.0, vmax=1.0)
    fontsize = max(4.0, min(10.0, 0.8 * 72.0 * cell / T))  # about one character per row
    image = None
    for layer in range(n_layer):
        for head in range(n_head):
            ax = axes[layer][head]
            image = ax.imshow(arr[layer, head], cmap="magma", norm=norm, interpolation="nearest")
            ax.set_xticks(range(T))
            ax.set_yticks(range(T))
            ax.set_xticklabels(labels if layer == n_layer - 1 else [], fontsize=fontsize)
            ax.set_yticklabels(labels if head == 0 else [], fontsize=fontsize)
            ax.tick_params(length=0, pad=1)
            ax.set_title(f"layer {layer}, head {head}", fontsize=8)
    fig.supxlabel("key: the character attended to", fontsize=9)
    fig.supylabel("query: the character predicting the next one", fontsize=9)
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.6, label="attention weight")
    if title:
        fig.suptitle(title, fontsize=10)
    _save(plt, fig, path)

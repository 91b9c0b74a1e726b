"""PNG charts for the thread. matplotlib is imported only when a chart is
drawn: it is slow to import and only the bot's job threads need it."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any


def _axes(title: str) -> tuple[Any, Any]:
    """A figure in the house style, drawn off-screen."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3.2), dpi=110)
    ax = fig.add_subplot()
    ax.set_title(title, fontsize=10)
    ax.spines[["top", "right"]].set_visible(False)
    return fig, ax


def _png(fig: Any) -> bytes:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def token_histogram(counts: Sequence[int], *, title: str, limit: int | None = None) -> bytes:
    """Histogram of tokens per example; a dashed line marks the model's context."""
    fig, ax = _axes(title)
    if counts:
        ax.hist(counts, bins=min(50, max(5, len(set(counts)))), color="#4a7bd0", edgecolor="white")
        if limit and max(counts) > limit * 0.8:
            ax.axvline(limit, color="#c0392b", linestyle="--", label=f"context {limit:,}")
            ax.legend(loc="upper right", frameon=False)
    else:
        ax.text(0.5, 0.5, "no valid examples", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("tokens per example")
    ax.set_ylabel("examples")
    return _png(fig)


def loss_curve(steps: Sequence[int], losses: Sequence[float], *, title: str) -> bytes:
    """Training loss by step, from the job's metrics."""
    fig, ax = _axes(title)
    ax.plot(steps, losses, color="#4a7bd0", linewidth=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    return _png(fig)


def score_bars(
    names: Sequence[str],
    base: Sequence[float],
    tuned: Sequence[float],
    *,
    title: str,
    teacher: Sequence[float] | None = None,
) -> bytes:
    """Mean scores side by side, one group of bars per scorer: base, tuned and, when
    given, the teacher the tuned model was distilled from."""
    fig, ax = _axes(title)
    xs = range(len(names))
    series = [("base", base, "#b0b7c3"), ("tuned", tuned, "#4a7bd0")]
    if teacher is not None:
        series.append(("teacher", teacher, "#e0a030"))
    width = 0.8 / len(series)
    for k, (label, values, color) in enumerate(series):
        offset = (k - (len(series) - 1) / 2) * width
        ax.bar([x + offset for x in xs], values, width=width, label=label, color=color)
    ax.set_xticks(list(xs), list(names))
    ax.set_ylim(0, 1)
    ax.set_ylabel("mean score")
    ax.legend(frameon=False)
    return _png(fig)

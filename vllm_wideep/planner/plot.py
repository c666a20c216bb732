"""Draw the frontier of every EP size: tokens/s per GPU (y) against tokens/s per user (x).

matplotlib is imported here only (the ``tools`` extra), and only its object API with the Agg
canvas, so no global backend is switched and no display is needed.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

from vllm_wideep.planner.frontier import EPCurve


def plot_frontier(
    curves: Sequence[EPCurve],
    path: str | Path,
    title: str,
    user_rate: float | None = None,
) -> Path:
    """Write a PNG with one line per EP size (its Pareto points, labelled with the batch per
    GPU at the ends) and, with ``user_rate``, a dashed line at that tokens/s per user."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for curve in curves:
        if not curve.frontier:
            continue
        xs = [e.tokens_per_s_per_user for e in curve.frontier]
        ys = [e.tokens_per_s_per_gpu for e in curve.frontier]
        (line,) = ax.plot(xs, ys, marker="o", markersize=3, label=f"EP {curve.ep_size}")
        for e in (curve.frontier[0], curve.frontier[-1]):
            ax.annotate(
                f"B={e.deployment.batch_per_gpu:g}",
                (e.tokens_per_s_per_user, e.tokens_per_s_per_gpu),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=7,
                color=line.get_color(),
            )
    if user_rate is not None:
        ax.axvline(user_rate, linestyle="--", color="grey", linewidth=1)
    ax.set_xlabel("tokens/s per user")
    ax.set_ylabel("tokens/s per GPU")
    lines = [textwrap.fill(line, width=110) for line in title.splitlines()]
    ax.set_title("\n".join(lines), fontsize=8)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out

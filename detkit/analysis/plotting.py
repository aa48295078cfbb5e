"""Matplotlib figures without pyplot: rendered by the Agg canvas, no display and no global state."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

#: Distinct line colours (matplotlib's tab10, then tab20's light shades) for classes and runs.
COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94"]


def new_figure(width: float, height: float,
               layout: Literal["constrained", "compressed", "tight"] | None = "constrained") -> Figure:
    """A figure of ``width x height`` inches on an Agg canvas. The default constrained layout never clips
    titles or tick labels but doubles the drawing time; ``layout=None`` leaves placement to
    :func:`margins` (for the figures written at every evaluation whose labels have known sizes)."""
    fig = Figure(figsize=(width, height), layout=layout)
    FigureCanvasAgg(fig)
    return fig


def margins(fig: Figure, left: float, right: float, top: float, bottom: float, hspace: float, wspace: float) -> None:
    """Subplot margins and gaps in inches (matplotlib takes fractions of the figure)."""
    width, height = fig.get_size_inches()
    fig.subplots_adjust(left=left / width, right=1 - right / width, top=1 - top / height, bottom=bottom / height,
                        hspace=hspace, wspace=wspace)


def save_figure(fig: Figure, path: str | Path, dpi: int = 100) -> Path:
    """Write ``fig`` as a PNG (parent folders created) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path

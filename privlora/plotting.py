"""Figures as PNG bytes, one matplotlib style for the package.

matplotlib's object API with its Agg canvas: no pyplot, no ``matplotlib.use``, so importing or calling this never
changes the process's global backend (a user's notebook or GUI keeps its own).
"""
from __future__ import annotations

import io
from typing import Any


def new_figure(**kwargs: Any):
    """A ``matplotlib.figure.Figure`` rendered by Agg (``figsize=...`` etc. as for ``Figure``)."""
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def png_bytes(fig, dpi: int = 100) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)  # no bbox_inches="tight": it draws everything twice
    return buf.getvalue()

"""Attention heatmaps in the style of Mensch & Blondel (2018) Fig. 4 / Fig. 8.

Source tokens on the x axis, target (hypothesis) tokens on the y axis. Exact zeros are left white (the colour
map never reaches white, so a weight of 1e-9 is visibly different from 0), weights > 0 are coloured on a fixed
[0, vmax] scale (default vmax = 1, so maps of different models are comparable), and every non-zero cell is
outlined, as the paper's "borders indicate non-zero cells".

matplotlib is imported lazily and only through its object API (``matplotlib.figure.Figure`` with the Agg
canvas): no display, no global pyplot state.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from ..fileio import atomic_path

__all__ = ["draw_attention", "attention_figure", "heads_figure", "save_figure", "plot_record", "DEFAULT_CMAP",
           "ZERO_COLOR"]

DEFAULT_CMAP = "viridis_r"  # light yellow (small) → dark purple (large); contains no white
ZERO_COLOR = "white"
OUTLINE_COLOR = "#222222"
CELL_INCHES = 0.3


def _cmap(name):
    import matplotlib

    try:
        cmap = matplotlib.colormaps[name] if isinstance(name, str) else name
    except KeyError:
        raise ValueError(f"unknown matplotlib colour map {name!r}") from None
    return cmap.with_extremes(bad=ZERO_COLOR)


def _outline_segments(nz: np.ndarray) -> list:
    """Unit-cell borders (in data coordinates, cell (i, j) spans [j-½, j+½] × [i-½, i+½]) of non-zero cells,
    each shared edge once."""
    edges = set()
    for i, j in zip(*np.nonzero(nz)):
        x0, x1, y0, y1 = j - 0.5, j + 0.5, i - 0.5, i + 0.5
        edges.update({((x0, y0), (x1, y0)), ((x0, y1), (x1, y1)), ((x0, y0), (x0, y1)), ((x1, y0), (x1, y1))})
    return [list(e) for e in sorted(edges)]


def draw_attention(
    ax,
    attention,
    src_tokens: Sequence[str] | None = None,
    tgt_tokens: Sequence[str] | None = None,
    *,
    cmap=DEFAULT_CMAP,
    vmax: float | None = 1.0,
    outline: bool = True,
    fontsize: float = 8,
):
    """Draw one attention matrix (target rows × source columns) on a matplotlib Axes; returns the image.

    ``vmax=None`` scales the colours to the matrix maximum. Exact zeros are masked (white).
    """
    from matplotlib.collections import LineCollection
    from matplotlib.colors import Normalize

    a = np.asarray(attention, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"attention must be a 2-D matrix, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError("attention has non-finite values")
    T, S = a.shape
    if src_tokens is not None and len(src_tokens) != S:
        raise ValueError(f"{len(src_tokens)} source tokens for {S} attention columns")
    if tgt_tokens is not None and len(tgt_tokens) != T:
        raise ValueError(f"{len(tgt_tokens)} target tokens for {T} attention rows")
    top = float(a.max()) if vmax is None and a.size and a.max() > 0 else (1.0 if vmax is None else float(vmax))
    if not top > 0:
        raise ValueError(f"vmax must be > 0, got {vmax}")
    nz = a != 0
    ax.set_facecolor(ZERO_COLOR)
    image = ax.imshow(
        np.ma.masked_where(~nz, a),
        cmap=_cmap(cmap),
        norm=Normalize(vmin=0.0, vmax=top, clip=True),
        interpolation="nearest",
        aspect="equal",
        origin="upper",
    )
    if outline and nz.any():
        ax.add_collection(LineCollection(_outline_segments(nz), colors=OUTLINE_COLOR, linewidths=0.6))
    ax.set_xlim(-0.5, S - 0.5)
    ax.set_ylim(T - 0.5, -0.5)
    ax.set_xticks(range(S))
    ax.set_yticks(range(T))
    ax.set_xticklabels(list(src_tokens) if src_tokens is not None else range(S), rotation=90, fontsize=fontsize)
    ax.set_yticklabels(list(tgt_tokens) if tgt_tokens is not None else range(T), fontsize=fontsize)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_linewidth(0.5)
    ax.set_xlabel("source", fontsize=fontsize)
    ax.set_ylabel("target", fontsize=fontsize)
    return image


def _label_inches(src_tokens, tgt_tokens) -> float:
    """Room for the tick labels (the longest token) beside a heatmap, in inches."""
    longest = max([len(str(t)) for t in list(src_tokens or []) + list(tgt_tokens or [])] + [2])
    return min(0.08 * longest + 0.4, 2.5)


def attention_figure(
    attention,
    src_tokens=None,
    tgt_tokens=None,
    *,
    title: str | None = None,
    colorbar: bool = True,
    dpi: float = 100,
    cell_inches: float = CELL_INCHES,
    **draw_kwargs,
):
    """A standalone Figure (Agg canvas) holding one heatmap; its size follows the matrix size."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    a = np.asarray(attention)
    if a.ndim != 2:
        raise ValueError(f"attention must be a 2-D matrix, got shape {a.shape}")
    T, S = a.shape
    label_in = _label_inches(src_tokens, tgt_tokens)
    width = max(S, 1) * cell_inches + label_in + (0.9 if colorbar else 0.2)
    height = max(T, 1) * cell_inches + label_in + (0.35 if title else 0.1)
    fig = Figure(figsize=(max(width, 2.0), max(height, 1.6)), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = draw_attention(ax, attention, src_tokens, tgt_tokens, **draw_kwargs)
    if colorbar:
        cb = fig.colorbar(image, ax=ax, fraction=0.05, pad=0.02, shrink=min(1.0, max(0.3, T / 12)))
        cb.ax.tick_params(labelsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    return fig


def heads_figure(
    heads,
    src_tokens=None,
    tgt_tokens=None,
    *,
    titles: Sequence[str] | None = None,
    ncols: int = 4,
    title: str | None = None,
    colorbar: bool = True,
    dpi: float = 100,
    cell_inches: float = CELL_INCHES,
    **draw_kwargs,
):
    """A Figure (Agg canvas) with one heatmap per head, ``heads`` (H, T, S) (a record's ``heads``), in a grid of
    ``ncols`` columns, all on the same colour scale (``vmax``, default 1) with one colour bar; ``titles`` default to
    "head h"."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    h = np.asarray(heads)
    if h.ndim != 3 or h.shape[0] < 1:
        raise ValueError(f"heads must have shape (H, T, S), got {h.shape}")
    if titles is not None and len(titles) != h.shape[0]:
        raise ValueError(f"{len(titles)} titles for {h.shape[0]} heads")
    if isinstance(ncols, bool) or not isinstance(ncols, int) or ncols < 1:
        raise ValueError(f"ncols must be a positive int, got {ncols!r}")
    H, T, S = h.shape
    ncols = min(ncols, H)
    nrows = -(-H // ncols)
    label_in = _label_inches(src_tokens, tgt_tokens)
    width = ncols * (max(S, 1) * cell_inches + label_in) + (0.9 if colorbar else 0.2)
    height = nrows * (max(T, 1) * cell_inches + label_in + 0.35) + (0.4 if title else 0.1)
    fig = Figure(figsize=(max(width, 2.0), max(height, 1.6)), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    image = None
    for k, ax in enumerate(axes.ravel()):
        if k >= H:
            ax.set_axis_off()
            continue
        image = draw_attention(ax, h[k], src_tokens, tgt_tokens, **draw_kwargs)
        ax.set_title(titles[k] if titles is not None else f"head {k}", fontsize=9)
    if colorbar:
        cb = fig.colorbar(image, ax=axes.ravel().tolist(), fraction=0.03, pad=0.02)
        cb.ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def save_figure(fig, path: str | os.PathLike, dpi: float | None = None) -> str:
    """Save crash-safely (temporary name, then rename); the format follows the extension (.png, .svg, .pdf)."""
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    if ext not in ("png", "svg", "pdf"):
        raise ValueError(f"unsupported image format {ext!r} (use .png, .svg or .pdf)")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=ext, dpi=dpi or fig.dpi, facecolor="white")
    return path


def plot_record(record, path, *, title: str | None = None, dpi: float = 100, **kwargs) -> str:
    """Heatmap of one :class:`structattn.export.AttentionRecord` saved to ``path``; returns ``path``."""
    fig = attention_figure(record.attention, record.src_tokens, record.tgt_tokens, title=title, dpi=dpi, **kwargs)
    return save_figure(fig, path)

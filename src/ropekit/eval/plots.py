"""Drawing: matplotlib figures of what ``ropekit.eval.figure_data`` computed (no numbers are derived here)."""

from __future__ import annotations

import os
from collections.abc import Sequence

from ropekit.eval.figure_data import (
    Panel,
    PasskeyFigure,
    PerplexityFigure,
    Style,
    passkey_figure_data,
    perplexity_figure_data,
)

DPI = 110
LINE_WIDTH = 1.6


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _draw_marks(ax, panel: Panel) -> None:
    """The trained length (dotted line, the positions past it shaded), the unit line, the off-scale notes."""
    right = panel.xlim[1]
    if panel.trained and panel.shade_beyond and panel.trained < right:
        ax.axvspan(panel.trained, right, color="0.5", alpha=0.07, linewidth=0)
    if panel.trained:
        ax.axvline(panel.trained, color="black", linestyle=":", linewidth=1.2)
    if panel.unit_line is not None:
        ax.axhline(panel.unit_line, color="black", linestyle="--", linewidth=1)
    for j, mark in enumerate(panel.off_scale):
        ax.annotate(mark.text, xy=(mark.x, 1), xycoords=("data", "axes fraction"), xytext=(4, -4 - 12 * j),
                    textcoords="offset points", color=mark.color, fontsize=8, va="top", ha="left")


def _draw_bars(ax, panel: Panel) -> None:
    for bar in panel.bars:
        ax.barh(bar.row - 0.2, bar.beyond, height=0.4, color=bar.color)
        ax.barh(bar.row + 0.2, bar.inside, height=0.4, color=bar.color, alpha=0.45)
        if bar.overflow:
            ax.text(panel.xlim[1], bar.row - 0.2, bar.overflow, ha="right", va="center", fontsize=8, color="white")
    ax.set_yticks([b.row for b in panel.bars], [b.label for b in panel.bars], fontsize=8)
    ax.invert_yaxis()


def draw_panel(ax, panel: Panel) -> None:
    """One panel of the perplexity figure on ``ax``."""
    for c in panel.curves:
        ax.plot(c.x, c.y, markevery=c.markevery, markersize=c.markersize, linewidth=LINE_WIDTH, color=c.style.color,
                marker=c.style.marker, linestyle=c.style.linestyle)
    if panel.bars:
        _draw_bars(ax, panel)
    if panel.log2_ticks:
        ax.set_xscale("log", base=2)
        ax.set_xticks(panel.log2_ticks, [str(n) for n in panel.log2_ticks])
        ax.minorticks_off()
    _draw_marks(ax, panel)
    ax.set_xlim(*panel.xlim)
    if panel.ylim is not None:
        ax.set_ylim(*panel.ylim)
    ax.set_title(panel.title, fontsize=10)
    ax.set(xlabel=panel.xlabel, ylabel=panel.ylabel)
    ax.grid(True, alpha=0.3)


def perplexity_figure(data: PerplexityFigure):
    """A matplotlib figure of ``data``: one panel per row, the legend on the right, the note below."""
    from matplotlib.lines import Line2D

    plt = _pyplot()
    fig, axes = plt.subplots(len(data.panels), 1, figsize=(data.width, data.height), squeeze=False,
                             gridspec_kw={"height_ratios": [p.height for p in data.panels]})
    for ax, panel in zip(axes[:, 0], data.panels, strict=True):
        draw_panel(ax, panel)
    handles = [Line2D([], [], markersize=5, linewidth=LINE_WIDTH, label=e.text, color=e.style.color,
                      marker=e.style.marker, linestyle=e.style.linestyle) for e in data.legend]
    fig.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 0.99), fontsize=8, frameon=False,
               title="run (method)", title_fontsize=9)
    if data.missing_note:
        fig.text(0.01, 0.0, data.missing_note, fontsize=8, va="top")
    fig.tight_layout()
    return fig


def plot_perplexity(records: Sequence[dict], path: str | os.PathLike, trained: int | None = None, *,
                    styles: dict[str, Style] | None = None) -> None:
    """PNG of the perplexity records (``perplexity_figure_data``; ValueError without any)."""
    fig = perplexity_figure(perplexity_figure_data(records, trained, styles=styles))
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    _pyplot().close(fig)


def passkey_figure(data: PasskeyFigure):
    """A matplotlib figure of ``data``: one accuracy heatmap per panel, each cell's text, the frame in the
    method's colour; the colour scale on the right, the methods' colours in a legend below."""
    from matplotlib.patches import Patch

    plt = _pyplot()
    fig, axes = plt.subplots(data.rows, data.columns, figsize=data.size, squeeze=False, layout="constrained")
    flat = axes.ravel().tolist()
    for ax in flat[len(data.heatmaps):]:
        fig.delaxes(ax)
    image = None
    for ax, heatmap in zip(flat, data.heatmaps, strict=False):
        image = ax.imshow(heatmap.grid.accuracy, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="lower")
        for i, row in enumerate(heatmap.grid.cell_texts):
            for j, text in enumerate(row):
                ax.text(j, i, text, ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(data.depths)), [f"{d:g}" for d in data.depths])
        ax.set_yticks(range(len(data.lengths)), [str(n) for n in data.lengths])
        ax.set_xlabel("key depth", fontsize=8)
        ax.set_title(heatmap.title, fontsize=8)
        for spine in ax.spines.values():
            spine.set(color=heatmap.frame_color, linewidth=3)
    for row in axes:
        row[0].set_ylabel("prompt length (tokens)", fontsize=8)
    fig.colorbar(image, ax=flat[:len(data.heatmaps)], shrink=0.8, label="accuracy (cell: accuracy, correct/trials)")
    handles = [Patch(facecolor="white", edgecolor=color, linewidth=3, label=m) for m, color in data.legend]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(3, len(handles)), fontsize=8, frameon=False,
               title="method (panel frame)", title_fontsize=8)
    return fig


def plot_passkey(records: Sequence[dict], path: str | os.PathLike, *, styles: dict[str, Style] | None = None) -> None:
    """PNG of the passkey records (``passkey_figure_data``)."""
    fig = passkey_figure(passkey_figure_data(records, styles=styles))
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    _pyplot().close(fig)

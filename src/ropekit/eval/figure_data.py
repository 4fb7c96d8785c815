"""The data each report figure shows, computed once from the records, as pure functions (no matplotlib):
``perplexity_figure_data`` and ``passkey_figure_data`` return everything ``ropekit.eval.plots`` draws.

The perplexity figure has one panel per row, each present only when it has something to show
(``choose_panels``), and one legend on the right:

- *loss by position*: mean NLL (nats/token) per bucket of positions (``bucket_nll``) against the token
  position, for each run's longest window; buckets of at most ``MAX_SMOOTHED_BUCKET`` tokens smoothed by a
  centred moving average over ``SMOOTH_BUCKETS`` buckets, coarser ones drawn as they are. The linear axis ends
  at ``AXIS_HEADROOM`` x the highest working run; a run that breaks leaves the plot, marked "off scale";
- *ratio to the reference*: per-bucket perplexity ratio exp(nll_run - nll_reference) of the working runs
  against the same-token reference (a sliding run with windows of the trained length: every token scored
  with up to that much context, by text index) when the records hold one, else exp(nll_run) / the unscaled
  model's in-window perplexity;
- *perplexity vs context length*: only when a series has two or more lengths;
- *summary*: ppl in window and beyond per run, when none of the above applies.

A run is *working* when its perplexity beyond the trained length is below ``WORKING_FACTOR`` x the reference
in-window perplexity (``reference_ppl``). Each series keeps one colour / marker / line style
(``series_styles``) in every panel, and a method keeps it in the passkey figure.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field


def series_label(r: dict) -> str:
    """The method, marked when the record is a sliding-window run (a different protocol)."""
    if r.get("protocol") == "sliding":
        return f"{r['method']} (sliding {r['length']}/{r['stride']})"
    return r["method"]


def passkey_label(r: dict) -> str:
    """The method, with the task when it is not the one-key task at fixed depth: ``m (4 keys, jitter 0.05)``
    (one-key, unjittered records leave ``keys`` and ``jitter`` out)."""
    keys, jitter = r.get("keys", 1), r.get("jitter", 0.0)
    tags = ([f"{keys} keys"] if keys != 1 else []) + ([f"jitter {jitter:g}"] if jitter else [])
    return f"{r['method']} ({', '.join(tags)})" if tags else r["method"]


MAX_SMOOTHED_BUCKET = 512  # buckets of at most this many tokens are smoothed; coarser bins are drawn as they are
SMOOTH_BUCKETS = 5  # width of the centred moving average, in buckets (256-token buckets: 1280 tokens)
WORKING_FACTOR = 2.0  # a run is "working" when its ppl beyond the trained length < this x the reference ppl
AXIS_HEADROOM = 1.5  # a linear axis ends at this x the highest value of the working runs
UNSCALED_METHODS = ("none", "default")  # method specs of the model as trained (no extension)

# 20 colours: tab10, then 10 darker / brighter hues that differ from it (black is kept for the reference)
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf", "#000075", "#800000", "#008080", "#7fd400", "#e6009e", "#b8860b", "#6baed6", "#fa8072",
           "#1b5e20", "#6a3d9a")
MARKERS = ("o", "s", "^", "D", "v", "P", "X")
LINESTYLES = ("-", "--", "-.", ":")


@dataclass(frozen=True)
class Style:
    """How one series is drawn: a matplotlib colour, marker and line style."""

    color: str
    marker: str
    linestyle: str

    def kwargs(self) -> dict:
        return {"color": self.color, "marker": self.marker, "linestyle": self.linestyle}


REFERENCE_STYLE = Style("black", "", "--")


def series_styles(labels: Sequence[str]) -> dict[str, Style]:
    """One style per distinct label, in first-seen order: label i gets colour ``PALETTE[i % 20]``, marker
    ``MARKERS[i % 7]`` and line style ``LINESTYLES[(i // 20) % 4]``. The first 20 labels have distinct
    colours; no two of the first 560 share all three."""
    out: dict[str, Style] = {}
    for i, label in enumerate(dict.fromkeys(labels)):
        out[label] = Style(PALETTE[i % len(PALETTE)], MARKERS[i % len(MARKERS)],
                           LINESTYLES[(i // len(PALETTE)) % len(LINESTYLES)])
    return out


@dataclass(frozen=True)
class PositionSeries:
    """Mean NLL by position: bin i covers positions ``[starts[i], starts[i] + width)`` (window positions, or
    text indices when ``by == "text"``); ``nll[i]`` is in nats per token."""

    starts: tuple[int, ...]
    width: int
    nll: tuple[float, ...]
    by: str = "window"

    @property
    def centres(self) -> list[float]:
        """Bin centres, in positions (tokens)."""
        return [s + self.width / 2 for s in self.starts]

    @property
    def smoothed(self) -> bool:
        """Whether display values are a moving average (bins of at most ``MAX_SMOOTHED_BUCKET`` tokens)."""
        return self.width <= MAX_SMOOTHED_BUCKET


def position_series(record: dict) -> PositionSeries | None:
    """The record's loss by position: ``bucket_nll`` (mean NLL per ``bucket`` positions, keyed by the bucket's
    first position, in numeric order), keyed as the record's ``segments_by`` says (text index for a sliding run,
    window position otherwise); None when the record has no per-position data."""
    items = sorted((int(k), float(v)) for k, v in (record.get("bucket_nll") or {}).items() if v is not None)
    if not items:
        return None
    return PositionSeries(tuple(k for k, _ in items), int(record["bucket"]), tuple(v for _, v in items),
                          record["segments_by"])


def rebin(series: PositionSeries, width: int) -> PositionSeries:
    """``series`` pooled into bins of ``width`` tokens (a multiple of ``series.width``): the mean NLL of the
    bins that fall in each."""
    if width % series.width:
        raise ValueError(f"bin width {width} is not a multiple of {series.width}")
    if width == series.width:
        return series
    pooled: dict[int, list[float]] = {}
    for start, nll in zip(series.starts, series.nll, strict=True):
        pooled.setdefault(start // width * width, []).append(nll)
    starts = tuple(sorted(pooled))
    return PositionSeries(starts, width, tuple(sum(pooled[s]) / len(pooled[s]) for s in starts), series.by)


def smooth(values: Sequence[float], k: int = SMOOTH_BUCKETS) -> list[float]:
    """Centred moving average over ``k`` (odd) consecutive values, the window shrinking at both ends:
    ``out[i] = mean(values[i - k//2 : i + k//2 + 1])``; same length as ``values``."""
    if k < 1 or k % 2 == 0:
        raise ValueError(f"the moving average needs an odd width >= 1, got {k}")
    half = k // 2
    return [sum(values[max(0, i - half):i + half + 1]) / len(values[max(0, i - half):i + half + 1])
            for i in range(len(values))]


def display_nll(series: PositionSeries, k: int = SMOOTH_BUCKETS) -> list[float]:
    """NLL per bin as drawn (nats/token, one per bin): smoothed over ``k`` bins when the bins are at most
    ``MAX_SMOOTHED_BUCKET`` tokens wide, unchanged when coarser (4096-token segments)."""
    return smooth(series.nll, k) if series.smoothed else list(series.nll)


def is_unscaled(record: dict) -> bool:
    """Whether the record is a run of the model as trained (method ``none`` / ``default``)."""
    return record.get("method") in UNSCALED_METHODS


def longest_runs(records: Sequence[dict], *, with_positions: bool = False) -> dict[str, dict]:
    """Per series label (``series_label``, first-seen order): its record of the longest length, the latest
    stored one among equals; ``with_positions``: only records with per-position data (labels without any left out)."""
    best: dict[str, tuple[int, int]] = {}
    for i, r in enumerate(records):
        if with_positions and position_series(r) is None:
            continue
        label = series_label(r)
        if label not in best or r["length"] >= records[best[label][1]]["length"]:
            best[label] = (r["length"], i)
    return {label: records[i] for label, (_, i) in best.items()}


def find_reference(records: Sequence[dict], trained: int | None) -> dict | None:
    """The same-token reference: a sliding-protocol record whose window equals ``trained`` and that has
    per-position data (every token scored with up to ``trained`` tokens of context, keyed by text index);
    an unscaled method's run preferred, then the latest. None when the records hold none."""
    if trained is None:
        return None
    found = [(is_unscaled(r), i) for i, r in enumerate(records)
             if r.get("protocol") == "sliding" and r["length"] == trained and position_series(r) is not None]
    return records[max(found)[1]] if found else None


def unscaled_in_window_ppl(records: Sequence[dict]) -> float | None:
    """``ppl_in_window`` of the unscaled model's single-window run of the longest length (the latest among
    equals); None when there is none."""
    runs = [r for r in records if is_unscaled(r) and r["protocol"] == "single"
            and r.get("ppl_in_window") is not None]
    return max(enumerate(runs), key=lambda t: (t[1]["length"], t[0]))[1]["ppl_in_window"] if runs else None


def reference_ppl(records: Sequence[dict], trained: int | None) -> float | None:
    """The in-window perplexity that the working rule compares against: the unscaled model's single-window
    ``ppl_in_window``, else the same-token reference's ``ppl``, else the lowest ``ppl_in_window`` of any run."""
    value = unscaled_in_window_ppl(records)
    if value is None and (ref := find_reference(records, trained)) is not None:
        value = ref.get("ppl")
    if value is None:
        values = [r["ppl_in_window"] for r in records if r.get("ppl_in_window") is not None]
        value = min(values) if values else None
    return value


def beyond_ppl(record: dict) -> float | None:
    """Perplexity of the tokens past the trained length (``ppl_beyond``; the whole run's ``ppl`` when no
    token got there)."""
    return record["ppl_beyond"] if record.get("ppl_beyond") is not None else record.get("ppl")


def is_working(record: dict, reference: float | None, factor: float = WORKING_FACTOR) -> bool:
    """The working rule: ppl beyond the trained length < ``factor`` x the reference in-window ppl (every run
    counts as working when there is no reference)."""
    value = beyond_ppl(record)
    return reference is None or (value is not None and value < factor * reference)


def working_labels(records: Sequence[dict], trained: int | None) -> set[str]:
    """Series labels whose longest run is working (``is_working`` against ``reference_ppl``)."""
    ref = reference_ppl(records, trained)
    return {label for label, r in longest_runs(records).items() if is_working(r, ref)}


def text_aligned(record: dict) -> bool:
    """Whether the record's positions are text indices: a sliding run, or one single window from the start
    of the text (window position == text index)."""
    if record.get("protocol") == "sliding":
        return True
    return record["windows"] == 1 and record["windows_run"] == 1


def ratio_to_reference(series: PositionSeries, reference: PositionSeries | None = None,
                       reference_ppl_value: float | None = None, k: int = SMOOTH_BUCKETS) -> tuple[list, list]:
    """Per-bin perplexity ratio (dimensionless) of ``series`` against a reference, as ``(x, ratio)``: bin
    centres in positions and ratios, the smoothing (``display_nll``'s rule) done on the NLL difference.

    With a reference series (aligned by text index): both pooled to a common bin width (the lcm of the two),
    ratio = exp(nll - nll_reference) over the bins both cover; else ratio = exp(nll) / ``reference_ppl_value``.
    """
    if reference is None:
        if reference_ppl_value is None:
            raise ValueError("a ratio needs a reference series or a reference perplexity")
        return series.centres, [math.exp(v) / reference_ppl_value for v in display_nll(series, k)]
    width = math.lcm(series.width, reference.width)
    mine, ref = rebin(series, width), rebin(reference, width)
    ref_nll = dict(zip(ref.starts, ref.nll, strict=True))
    pairs = [(s, v - ref_nll[s]) for s, v in zip(mine.starts, mine.nll, strict=True) if s in ref_nll]
    diff = PositionSeries(tuple(s for s, _ in pairs), width, tuple(d for _, d in pairs), series.by)
    return diff.centres, [math.exp(v) for v in display_nll(diff, k)]


@dataclass
class RatioPanel:
    """Data of the ratio panel: ``curves`` label -> (x positions, ppl ratios); ``reference``: the label of the
    same-token reference run, or None for the constant reference ``reference_ppl`` (ppl); ``left_out``: labels
    of the runs that break (not working), not drawn; ``unaligned``: working runs whose positions are not text
    indices (several single windows), not drawn against a reference by text index."""

    curves: dict[str, tuple[list, list]]
    reference: str | None
    reference_ppl: float | None
    left_out: list[str]
    unaligned: list[str] = field(default_factory=list)


def ratio_panel(records: Sequence[dict], trained: int | None) -> RatioPanel | None:
    """The working runs' per-bin ppl ratio to the same-token reference when the records hold one (see
    ``find_reference``), else to the unscaled model's in-window ppl; None without a reference."""
    ref_record = find_reference(records, trained)
    constant = unscaled_in_window_ppl(records)
    if ref_record is None and constant is None:
        return None
    ref_label = series_label(ref_record) if ref_record is not None else None
    ref_series = position_series(ref_record) if ref_record is not None else None
    working = working_labels(records, trained)
    panel = RatioPanel({}, ref_label, None if ref_record is not None else constant, [])
    for label, r in longest_runs(records, with_positions=True).items():
        if label == ref_label:
            continue
        if label not in working:
            panel.left_out.append(label)
        elif ref_series is not None and not text_aligned(r):
            panel.unaligned.append(label)
        elif (curve := ratio_to_reference(position_series(r), ref_series, constant))[0]:
            panel.curves[label] = curve  # (left out when no bin overlaps the reference's)
    return panel


def length_curves(records: Sequence[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """Per series label: context lengths (tokens, ascending) and the ppl over all scored tokens at each (the
    latest record of a length)."""
    by_label: dict[str, dict[int, float]] = {}
    for r in records:
        by_label.setdefault(series_label(r), {})[r["length"]] = r["ppl"]
    return {label: (sorted(v), [v[n] for n in sorted(v)]) for label, v in by_label.items()}


def choose_panels(records: Sequence[dict], ratio: RatioPanel | None) -> list[str]:
    """The perplexity figure's panels, each only when it has something to show, in order: "position" (a run
    has per-position data), "ratio" (``ratio``, the records' ``ratio_panel``, has a curve), "length" (a series
    has two or more lengths); "summary" (ppl in window / beyond per run) when none applies."""
    panels = []
    if longest_runs(records, with_positions=True):
        panels.append("position")
    if ratio is not None and ratio.curves:
        panels.append("ratio")
    if any(len(lengths) >= 2 for lengths, _ in length_curves(records).values()):
        panels.append("length")
    return panels or ["summary"]


def axis_limits(curves: dict[str, Sequence[float]], working: set[str], headroom: float = AXIS_HEADROOM,
                floor: float | None = None) -> tuple[float, float]:
    """(bottom, top) of a linear axis: top = ``headroom`` x the highest value of the working curves (of every
    curve when none works), so a run that breaks leaves the plot instead of flattening the others; bottom =
    the lowest value shown minus a tenth of the span, not below ``floor``."""
    shown = [v for label, ys in curves.items() if label in working for v in ys] or \
        [v for ys in curves.values() for v in ys]
    top = headroom * max(shown)
    low = min(v for ys in curves.values() for v in ys if v <= top) if shown else 0.0
    bottom = low - 0.1 * (top - low)
    return (bottom if floor is None else max(floor, bottom)), top


def off_scale(x: Sequence[float], y: Sequence[float], top: float) -> tuple[float, float] | None:
    """(x of the first point above ``top``, the highest y) when the curve leaves the axis, else None."""
    above = [xi for xi, yi in zip(x, y, strict=True) if yi > top]
    return (above[0], max(y)) if above else None



def markevery(n: int, i: int) -> tuple[int, int] | None:
    """Markers of series ``i`` on a curve of ``n`` points: every point up to 16, else about 10, offset per series
    so that they do not sit on one column."""
    if n <= 16:
        return None
    step = max(1, n // 10)
    return (i % step, step)


# ---- the perplexity figure ------------------------------------------------------------------------------------

PANEL_HEIGHTS = {"position": 4.6, "ratio": 4.0, "length": 3.6}  # inches; the summary's grows with its rows
FIGURE_WIDTH = 11.0


@dataclass(frozen=True)
class Curve:
    """One drawn line: points (x, y), its style, marker size and which points carry a marker."""

    label: str
    x: tuple[float, ...]
    y: tuple[float, ...]
    style: Style
    markersize: float = 5.0
    markevery: tuple[int, int] | None = None


@dataclass(frozen=True)
class OffScale:
    """A curve that leaves the top of its axis: where it leaves (x), its highest value, the text beside it."""

    x: float
    peak: float
    text: str
    color: str


@dataclass(frozen=True)
class Bar:
    """One run of the summary panel: ppl beyond the trained length (dark) and in window (light), on row
    ``row``; ``overflow``: the text written at the axis end when the beyond bar passes it."""

    row: int
    label: str
    beyond: float
    inside: float
    color: str
    overflow: str | None = None


@dataclass(frozen=True)
class Panel:
    """One panel: its kind, texts, axis limits, curves or bars, and marks: ``trained`` (dotted vertical line;
    the positions past it shaded when ``shade_beyond``), ``unit_line`` (dashed horizontal line),
    ``log2_ticks`` (a log2 x axis with these ticks)."""

    kind: str
    title: str
    xlabel: str
    ylabel: str
    height: float
    xlim: tuple[float, float]
    ylim: tuple[float, float] | None = None
    curves: tuple[Curve, ...] = ()
    off_scale: tuple[OffScale, ...] = ()
    bars: tuple[Bar, ...] = ()
    trained: int | None = None
    shade_beyond: bool = False
    unit_line: float | None = None
    log2_ticks: tuple[int, ...] = ()

    @property
    def labels(self) -> list[str]:
        """The series the panel shows."""
        return [c.label for c in self.curves] + [b.label for b in self.bars]


@dataclass(frozen=True)
class LegendEntry:
    """One legend line: its text and style."""

    text: str
    style: Style


@dataclass(frozen=True)
class PerplexityFigure:
    """Everything the perplexity figure shows: the panels top to bottom, the legend, and the note naming
    the series no panel shows (None when every series is shown)."""

    panels: tuple[Panel, ...]
    legend: tuple[LegendEntry, ...]
    missing_note: str | None
    width: float = FIGURE_WIDTH

    @property
    def height(self) -> float:
        return sum(p.height for p in self.panels)


@dataclass(frozen=True)
class FigureContext:
    """What every panel of one figure shares: the trained length, the styles, the working labels and the
    same-token reference's label."""

    trained: int | None
    styles: dict[str, Style]
    working: set[str]
    reference: str | None

    def style(self, label: str) -> Style:
        return REFERENCE_STYLE if label == self.reference else self.styles[label]


def off_scale_marks(curves: Sequence[Curve], top: float, unit: str) -> tuple[OffScale, ...]:
    """An ``OffScale`` per curve that passes ``top``: ``↑ label: off scale (up to peak unit)``."""
    marks = []
    for c in curves:
        if (gone := off_scale(c.x, c.y, top)) is not None:
            marks.append(OffScale(gone[0], gone[1], f"\u2191 {c.label}: off scale (up to {gone[1]:.3g}{unit})",
                                  c.style.color))
    return tuple(marks)


def position_title(series: dict[str, PositionSeries], lengths: Sequence[int]) -> str:
    """The loss-by-position panel's title: the runs' window lengths and the bucket widths (smoothed or not)."""
    smoothed = sorted({s.width for s in series.values() if s.smoothed})
    coarse = sorted({s.width for s in series.values() if not s.smoothed})
    parts = [f"{'/'.join(map(str, smoothed))}-token bucket (centred moving average over {SMOOTH_BUCKETS} "
             "buckets)"] if smoothed else []
    parts += [f"{'/'.join(map(str, coarse))}-token bucket"] if coarse else []
    return (f"Loss by position, each run's longest window ({', '.join(map(str, lengths))} tokens): "
            f"mean NLL per {'; per '.join(parts)}")


def position_panel(records: Sequence[dict], ctx: FigureContext) -> Panel:
    """Loss by position of each run's longest window with per-position data (``display_nll``)."""
    runs = longest_runs(records, with_positions=True)
    series = {label: position_series(r) for label, r in runs.items()}
    values = {label: display_nll(s) for label, s in series.items()}
    bottom, top = axis_limits(values, ctx.working, floor=0.0)
    curves = tuple(Curve(label, tuple(s.centres), tuple(values[label]), ctx.style(label),
                         markevery=markevery(len(s.starts), i)) for i, (label, s) in enumerate(series.items()))
    right = max(s.starts[-1] + s.width for s in series.values())
    return Panel("position", position_title(series, sorted({r["length"] for r in runs.values()})),
                 "token position (window position; text index for sliding runs)", "NLL (nats / token)",
                 PANEL_HEIGHTS["position"], (0, right), (bottom, top), curves, off_scale_marks(curves, top, " nats"),
                 trained=ctx.trained, shade_beyond=True)


def ratio_title(panel: RatioPanel) -> str:
    """The ratio panel's title: what the runs are set against, and which runs are not drawn and why."""
    if panel.reference is not None:
        what = f"the same-token reference `{panel.reference}` (dashed line; by text index)"
    else:
        what = f"the unscaled model's in-window ppl {panel.reference_ppl:.3g} (dashed line)"
    notes = []
    if panel.left_out:
        notes.append(f"not shown, ppl beyond >= {WORKING_FACTOR:g} x reference in-window ppl: "
                     + ", ".join(panel.left_out))
    if panel.unaligned:
        notes.append("not shown, several windows (not by text index): " + ", ".join(panel.unaligned))
    return f"Working runs: perplexity ratio per bin to {what}" + "".join(f"\n{n}" for n in notes)


def ratio_limits(values: dict[str, Sequence[float]]) -> tuple[float, float]:
    """(bottom, top) of the ratio axis: the curves' span plus a tenth above, always including 0.95-1.05."""
    bottom, top = axis_limits(values, set(values), headroom=1.0)
    return min(bottom, 0.95), max(top + 0.1 * (top - bottom), 1.05)


def ratio_figure_panel(ratio: RatioPanel, ctx: FigureContext) -> Panel:
    """The working runs' ratio curves (``ratio_panel``), the x axis up to the end of the last bin."""
    curves = tuple(Curve(label, tuple(x), tuple(ys), ctx.styles[label], markevery=markevery(len(x), i))
                   for i, (label, (x, ys)) in enumerate(ratio.curves.items()))
    right = max(c.x[-1] + ((c.x[1] - c.x[0]) / 2 if len(c.x) > 1 else c.x[0]) for c in curves)
    return Panel("ratio", ratio_title(ratio), "token position (= text index: one window from the start of the text)",
                 "ppl ratio (run / reference)", PANEL_HEIGHTS["ratio"], (0, right),
                 ratio_limits({c.label: c.y for c in curves}), curves, trained=ctx.trained, shade_beyond=True,
                 unit_line=1.0)


def length_panel(records: Sequence[dict], ctx: FigureContext) -> Panel:
    """Perplexity over all scored tokens against the context length (log2 axis, a tick per length)."""
    lengths_ppl = length_curves(records)
    bottom, top = axis_limits({label: ys for label, (_, ys) in lengths_ppl.items()}, ctx.working, floor=0.0)
    curves = []
    for label, (x, ys) in lengths_ppl.items():
        style = ctx.style(label)
        curves.append(Curve(label, tuple(x), tuple(ys), Style(style.color, style.marker or "o", style.linestyle), 6))
    lengths = sorted({n for x, _ in lengths_ppl.values() for n in x})
    pad = 2 ** 0.25
    return Panel("length", "Perplexity vs context length (all scored tokens of the window)", "context length (tokens)",
                 "perplexity", PANEL_HEIGHTS["length"], (lengths[0] / pad, lengths[-1] * pad), (bottom, top),
                 tuple(curves), off_scale_marks(curves, top, ""), trained=ctx.trained, log2_ticks=tuple(lengths))


def summary_panel(records: Sequence[dict], ctx: FigureContext) -> Panel:
    """Per run (its longest length), ppl beyond the trained length and in window as bars."""
    runs = longest_runs(records)
    values = {label: [r["ppl_in_window"] or 0.0, beyond_ppl(r) or 0.0] for label, r in runs.items()}
    _, right = axis_limits(values, ctx.working)
    bars = tuple(Bar(i, label, beyond, inside, ctx.style(label).color,
                     f"{beyond:.3g} \u2192 " if beyond > right else None)
                 for i, (label, (inside, beyond)) in enumerate(values.items()))
    trained = f"{ctx.trained}" if ctx.trained else "the trained length"
    return Panel("summary", "Perplexity per run (no per-position data, one length each): dark = beyond "
                 f"{trained}, light = in window", "perplexity", "", max(2.5, 0.3 * len(bars)), (0, right), bars=bars)


def legend_entries(labels: Sequence[str], ctx: FigureContext) -> tuple[LegendEntry, ...]:
    """A legend line per shown series (the reference and the runs that break marked), then the trained length."""
    entries = [LegendEntry(label + (" - same-token reference" if label == ctx.reference else "")
                           + ("" if label in ctx.working else " (breaks)"), ctx.style(label)) for label in labels]
    if ctx.trained:
        entries.append(LegendEntry(f"trained length {ctx.trained}", Style("black", "", ":")))
    return tuple(entries)


def figure_context(records: Sequence[dict], trained: int | None, styles: dict[str, Style] | None) -> FigureContext:
    """The shared context of the perplexity figure: ``trained`` (default: the records' ``trained_length``),
    ``styles`` over ``series_styles`` of the records' labels, the working labels and the reference."""
    if trained is None:
        trained = next((r["trained_length"] for r in records if r.get("trained_length")), None)
    styles = {**series_styles([series_label(r) for r in records]), **(styles or {})}
    reference = find_reference(records, trained)
    return FigureContext(trained, styles, working_labels(records, trained),
                         series_label(reference) if reference is not None else None)


def perplexity_figure_data(records: Sequence[dict], trained: int | None = None, *,
                           styles: dict[str, Style] | None = None) -> PerplexityFigure:
    """Everything the perplexity figure shows, from the records with a perplexity (ValueError without any):
    the panels of ``choose_panels``, the legend and the series left out."""
    records = [r for r in records if r.get("ppl") is not None]
    if not records:
        raise ValueError("no perplexity records to plot")
    ctx = figure_context(records, trained, styles)
    ratio = ratio_panel(records, ctx.trained)
    build = {"position": lambda: position_panel(records, ctx), "ratio": lambda: ratio_figure_panel(ratio, ctx),
             "length": lambda: length_panel(records, ctx), "summary": lambda: summary_panel(records, ctx)}
    panels = tuple(build[kind]() for kind in choose_panels(records, ratio))
    labels = list(dict.fromkeys(series_label(r) for r in records))
    shown = {label for p in panels for label in p.labels}
    missing = [label for label in labels if label not in shown]
    note = "no per-position data, one length only (not drawn): " + ", ".join(missing) if missing else None
    return PerplexityFigure(panels, legend_entries([label for label in labels if label in shown], ctx), note)


# ---- the passkey figure ---------------------------------------------------------------------------------------

PASSKEY_COLUMNS = 4  # heatmaps per row of the passkey figure
PASSKEY_TITLE_WIDTH = 34  # characters per line of a heatmap's title (at most 3 lines)


@dataclass(frozen=True)
class PasskeyGrid:
    """(correct, trials) per cell [len(lengths)][len(depths)], pooled over every record of the cell."""

    counts: tuple[tuple[tuple[int, int], ...], ...]

    @property
    def accuracy(self) -> list[list[float]]:
        """correct / trials per cell, NaN where there is no record."""
        return [[c / t if t else float("nan") for c, t in row] for row in self.counts]

    @property
    def cell_texts(self) -> list[list[str]]:
        """``67%\\n2/3`` per cell, ``-`` where there is no record."""
        return [[f"{c / t:.0%}\n{c}/{t}" if t else "-" for c, t in row] for row in self.counts]


def passkey_grid(records: Sequence[dict], label: str, lengths: Sequence[int], depths: Sequence[float]) -> PasskeyGrid:
    """The counts of the records labelled ``label`` (``passkey_label``; the method itself for the one-key task)
    per (length, depth), summed over the records of a cell (several seeds); (0, 0) where there is none."""
    grid = [[(0, 0)] * len(depths) for _ in lengths]
    for r in records:
        if passkey_label(r) == label:
            i, j = list(lengths).index(r["length"]), list(depths).index(r["depth"])
            grid[i][j] = (grid[i][j][0] + r["correct"], grid[i][j][1] + r["trials"])
    return PasskeyGrid(tuple(tuple(row) for row in grid))


@dataclass(frozen=True)
class Heatmap:
    """One panel of the passkey figure: a method and task, its title lines, frame colour and grid."""

    label: str
    title: str
    frame_color: str
    grid: PasskeyGrid


@dataclass(frozen=True)
class PasskeyFigure:
    """Everything the passkey figure shows: a heatmap per method and task on ``rows`` x ``columns`` panels (no
    empty one), the axes' lengths and depths, the methods' frame colours for the legend, the size in inches."""

    heatmaps: tuple[Heatmap, ...]
    lengths: tuple[int, ...]
    depths: tuple[float, ...]
    columns: int
    rows: int
    legend: tuple[tuple[str, str], ...]
    size: tuple[float, float]


def passkey_figure_data(records: Sequence[dict], *, styles: dict[str, Style] | None = None) -> PasskeyFigure:
    """One heatmap (lengths x depths) per method and task (``passkey_label``), framed in the method's colour
    (``styles``: method -> ``Style``, default ``series_styles`` over the methods); ``PASSKEY_COLUMNS`` per row."""
    methods = list(dict.fromkeys(r["method"] for r in records))
    styles = {**series_styles(methods), **(styles or {})}
    method_of = {passkey_label(r): r["method"] for r in records}
    lengths = tuple(sorted({r["length"] for r in records}))
    depths = tuple(sorted({r["depth"] for r in records}))
    heatmaps = tuple(Heatmap(label, "\n".join(textwrap.wrap(label, PASSKEY_TITLE_WIDTH)[:3]),
                             styles[method_of[label]].color, passkey_grid(records, label, lengths, depths))
                     for label in method_of)
    columns = min(len(heatmaps), PASSKEY_COLUMNS)
    rows = math.ceil(len(heatmaps) / columns)
    size = (1.6 + (0.75 * len(depths) + 0.9) * columns, (0.5 * len(lengths) + 1.9) * rows + 0.6)
    return PasskeyFigure(heatmaps, lengths, depths, columns, rows, tuple((m, styles[m].color) for m in methods), size)

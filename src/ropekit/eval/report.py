"""Reports: CSV, a printed/markdown table, PNG plots and ``report.md``.

The perplexity figure (``plot_perplexity``) has one panel per row, each drawn only when it has something to
show (``choose_panels``), and one legend on the right:

- *loss by position*: mean NLL (nats/token) per bucket of positions (``bucket_nll``, 256 tokens) against the
  token position, for each run's longest window, smoothed by a centred moving average over ``SMOOTH_BUCKETS``
  buckets; records without buckets fall back to their 4096-token segments (nll = ln(ppl), unsmoothed). The
  linear axis ends at ``AXIS_HEADROOM`` x the highest working run; a run that breaks leaves the plot, marked
  "off scale";
- *ratio to the reference*: per-bucket perplexity ratio exp(nll_run - nll_reference) of the working runs
  against the same-token reference (a sliding run with windows of the trained length: every token scored
  with up to that much context, by text index) when the records hold one, else exp(nll_run) / the unscaled
  model's in-window perplexity;
- *perplexity vs context length*: only when a series has two or more lengths.

A run is *working* when its perplexity beyond the trained length is below ``WORKING_FACTOR`` x the reference
in-window perplexity (``reference_ppl``). Each series keeps one colour / marker / line style
(``series_styles``) in every panel, and a method keeps it in the passkey plot written beside it.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ropekit.eval.stats import wilson_interval

CSV_FIELDS = ("task", "method", "length", "depth", "protocol", "ppl", "ppl_in_window", "ppl_beyond",
              "tokens_scored", "accuracy", "trials", "keys", "jitter", "ci95_low", "ci95_high", "seconds",
              "peak_mem_mb", "rope", "attention")


def _f(x, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _csv_row(r: dict) -> dict:
    row = {k: r.get(k) for k in CSV_FIELDS}
    if r.get("task") == "passkey" and r.get("trials"):
        row["ci95_low"], row["ci95_high"] = (round(v, 4) for v in wilson_interval(r["correct"], r["trials"]))
        row["keys"], row["jitter"] = r.get("keys", 1), r.get("jitter", 0.0)
    return row


def write_csv(records: Sequence[dict], path: str | os.PathLike) -> None:
    """One row per record; passkey rows with their task (keys, jitter) and the accuracy's Wilson 95% interval."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for r in records:
            writer.writerow(_csv_row(r))


def _methods(records: Sequence[dict]) -> list[str]:
    return list(dict.fromkeys(r["method"] for r in records))


def series_label(r: dict) -> str:
    """The method, marked when the record is a sliding-window run (a different protocol)."""
    if r.get("protocol") == "sliding":
        return f"{r['method']} (sliding {r['length']}/{r['stride']})"
    return r["method"]


def text_beyond(r: dict) -> float | None:
    """ppl of the text's tokens from the trained length on (records before that field: a single
    window from the start scores exactly those tokens as ``ppl_beyond``)."""
    if "ppl_text_beyond" in r:
        return r["ppl_text_beyond"]
    single_from_start = r.get("protocol", "single") == "single" and r.get("windows", 1) == 1
    return r["ppl_beyond"] if single_from_start else None


def perplexity_table(records: Sequence[dict]) -> str:
    """Markdown table: one row per (method, length); a sliding run is labelled with its window/stride.
    "text >= L": tokens of the text from the trained length on, whatever the window position."""
    lines = ["| method | length | ppl (all) | ppl in window | ppl beyond | text >= L | tokens | seconds | peak MB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in records:
        lines.append(f"| `{series_label(r)}` | {r['length']} | {_f(r['ppl'])} | {_f(r['ppl_in_window'])} | "
                     f"{_f(r['ppl_beyond'])} | {_f(text_beyond(r))} | {r['tokens_scored']} | "
                     f"{r['seconds']:.0f} | {r['peak_mem_mb']:.0f} |")
    return "\n".join(lines)


def passkey_label(r: dict) -> str:
    """The method, with the task when it is not the one-key task at fixed depth: ``m (4 keys, jitter 0.05)``."""
    keys, jitter = r.get("keys", 1), r.get("jitter", 0.0)
    tags = ([f"{keys} keys"] if keys != 1 else []) + ([f"jitter {jitter:g}"] if jitter else [])
    return f"{r['method']} ({', '.join(tags)})" if tags else r["method"]


def accuracy_cell(correct: int, trials: int) -> str:
    """``60% (3/5; 23-88%)``: accuracy, counts and the Wilson 95% interval."""
    low, high = wilson_interval(correct, trials)
    return f"{correct / trials:.0%} ({correct}/{trials}; {100 * low:.0f}-{high:.0%})"


def passkey_table(records: Sequence[dict]) -> str:
    """Markdown table: rows = method and task (``passkey_label``), columns = length; each cell the accuracy
    pooled over depths (and seeds), its counts and its Wilson 95% interval."""
    lengths = sorted({r["length"] for r in records})
    lines = ["| method | " + " | ".join(f"passkey @ {n} (95% CI)" for n in lengths) + " |",
             "|---|" + "---:|" * len(lengths)]
    for label in dict.fromkeys(passkey_label(r) for r in records):
        cells = []
        for n in lengths:
            rs = [r for r in records if passkey_label(r) == label and r["length"] == n]
            if rs:
                cells.append(accuracy_cell(sum(r["correct"] for r in rs), sum(r["trials"] for r in rs)))
            else:
                cells.append("-")
        lines.append(f"| `{label}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Plot data: pure functions over records (no matplotlib)
# ---------------------------------------------------------------------------------------------------------------

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
    text indices when ``by == "text"``); ``nll[i]`` is in nats per token over ``tokens[i]`` tokens
    (``tokens`` None: unknown, bins count equally when pooled). ``source``: "buckets" or "segments"."""

    starts: tuple[int, ...]
    width: int
    nll: tuple[float, ...]
    tokens: tuple[int, ...] | None = None
    by: str = "window"
    source: str = "buckets"

    @property
    def centres(self) -> list[float]:
        """Bin centres, in positions (tokens)."""
        return [s + self.width / 2 for s in self.starts]

    @property
    def smoothed(self) -> bool:
        """Whether display values are a moving average (bins of at most ``MAX_SMOOTHED_BUCKET`` tokens)."""
        return self.width <= MAX_SMOOTHED_BUCKET


def position_series(record: dict) -> PositionSeries | None:
    """The record's loss by position: ``bucket_nll`` (mean NLL per ``bucket`` positions, keyed by the
    bucket's first position) when present, else ``segments`` converted with nll = ln(ppl); None without either.
    Keyed by text index for a sliding run (``segments_by``), by window position otherwise."""
    by = record.get("segments_by") or ("text" if record.get("protocol") == "sliding" else "window")
    buckets = record.get("bucket_nll") or {}
    items = sorted((int(k), float(v)) for k, v in buckets.items() if v is not None)
    if items:
        starts = tuple(k for k, _ in items)
        gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
        width = int(record.get("bucket") or (min(gaps) if gaps else 1))
        return PositionSeries(starts, width, tuple(v for _, v in items), None, by, "buckets")
    segments = [s for s in record.get("segments") or () if s.get("ppl") and s.get("tokens")]
    if not segments:
        return None
    segments.sort(key=lambda s: s["start"])
    return PositionSeries(tuple(s["start"] for s in segments), int(segments[0]["end"] - segments[0]["start"]),
                          tuple(math.log(s["ppl"]) for s in segments), tuple(int(s["tokens"]) for s in segments),
                          by, "segments")


def rebin(series: PositionSeries, width: int) -> PositionSeries:
    """``series`` pooled into bins of ``width`` tokens (a multiple of ``series.width``): token-weighted mean
    NLL when the token counts are known, plain mean otherwise."""
    if width % series.width:
        raise ValueError(f"bin width {width} is not a multiple of {series.width}")
    if width == series.width:
        return series
    counts = series.tokens or (1,) * len(series.starts)
    pooled: dict[int, list[float]] = {}
    for start, nll, n in zip(series.starts, series.nll, counts, strict=True):
        acc = pooled.setdefault(start // width * width, [0.0, 0])
        acc[0] += nll * n
        acc[1] += n
    starts = tuple(sorted(pooled))
    tokens = tuple(int(pooled[s][1]) for s in starts) if series.tokens else None
    return PositionSeries(starts, width, tuple(pooled[s][0] / pooled[s][1] for s in starts), tokens, series.by,
                          series.source)


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
    runs = [r for r in records if is_unscaled(r) and r.get("protocol", "single") == "single"
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
    return record.get("windows", 1) == 1 and record.get("windows_run", 1) == 1


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
    diff = PositionSeries(tuple(s for s, _ in pairs), width, tuple(d for _, d in pairs), None, series.by)
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


def choose_panels(records: Sequence[dict], trained: int | None) -> list[str]:
    """The perplexity figure's panels, each only when it has something to show, in order: "position" (a run
    has per-position data), "ratio" (a reference and a working run with per-position data to set against it),
    "length" (a series has two or more lengths); "summary" (ppl in window / beyond per run) when none applies."""
    panels = []
    if longest_runs(records, with_positions=True):
        panels.append("position")
    ratio = ratio_panel(records, trained)
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


# ---------------------------------------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _markevery(n: int, i: int) -> tuple[int, int] | None:
    """A few markers per dense curve (about 10), offset per series so that they do not sit on one column."""
    if n <= 16:
        return None
    step = max(1, n // 10)
    return (i % step, step)


def _mark_off_scale(ax, rows: list[tuple[str, float, float, Style]], unit: str) -> None:
    """Label each curve that leaves the top of ``ax``: rows of (label, x where it leaves, its highest value)."""
    for j, (label, x, peak, style) in enumerate(rows):
        ax.annotate(f"\u2191 {label}: off scale (up to {peak:.3g}{unit})", xy=(x, 1),
                    xycoords=("data", "axes fraction"), xytext=(4, -4 - 12 * j), textcoords="offset points",
                    color=style.color, fontsize=8, va="top", ha="left")


def _trained_marks(ax, trained: int | None, right: float) -> None:
    if trained and trained < right:
        ax.axvspan(trained, right, color="0.5", alpha=0.07, linewidth=0)
    if trained:
        ax.axvline(trained, color="black", linestyle=":", linewidth=1.2)


def _style_of(label: str, styles: dict[str, Style], reference: str | None) -> Style:
    return REFERENCE_STYLE if label == reference else styles[label]


def _draw_position(ax, records, trained, styles, working, reference) -> list[str]:
    runs = longest_runs(records, with_positions=True)
    series = {label: position_series(r) for label, r in runs.items()}
    values = {label: display_nll(s) for label, s in series.items()}
    bottom, top = axis_limits(values, working, floor=0.0)
    rows = []
    for i, (label, s) in enumerate(series.items()):
        style = _style_of(label, styles, reference)
        ax.plot(s.centres, values[label], markevery=_markevery(len(s.starts), i), markersize=5, linewidth=1.6,
                **style.kwargs())
        if (gone := off_scale(s.centres, values[label], top)) is not None:
            rows.append((label, *gone, style))
    right = max(s.starts[-1] + s.width for s in series.values())
    _trained_marks(ax, trained, right)
    _mark_off_scale(ax, rows, " nats")
    ax.set_xlim(0, right)
    ax.set_ylim(bottom, top)
    widths = sorted({s.width for s in series.values() if s.smoothed})
    coarse = sorted({s.width for s in series.values() if not s.smoothed})
    parts = [f"{'/'.join(map(str, widths))}-token bucket (centred moving average over {SMOOTH_BUCKETS} buckets)"] \
        if widths else []
    parts += [f"{'/'.join(map(str, coarse))}-token segment (records without buckets)"] if coarse else []
    lengths = sorted({r["length"] for r in runs.values()})
    ax.set_title(f"Loss by position, each run's longest window ({', '.join(map(str, lengths))} tokens): "
                 f"mean NLL per {'; per '.join(parts)}", fontsize=10)
    ax.set(xlabel="token position (window position; text index for sliding runs)", ylabel="NLL (nats / token)")
    return list(series)


def _draw_ratio(ax, records, trained, styles) -> list[str]:
    panel = ratio_panel(records, trained)
    right = 0.0
    values = {label: ys for label, (_, ys) in panel.curves.items()}
    bottom, top = axis_limits(values, set(values), headroom=1.0)
    top = max(top + 0.1 * (top - bottom), 1.05)
    bottom = min(bottom, 0.95)
    for i, (label, (x, ys)) in enumerate(panel.curves.items()):
        ax.plot(x, ys, markevery=_markevery(len(x), i), markersize=5, linewidth=1.6, **styles[label].kwargs())
        right = max(right, x[-1] + ((x[1] - x[0]) / 2 if len(x) > 1 else x[0]))
    ax.axhline(1.0, color="black", linestyle="--", linewidth=1)
    _trained_marks(ax, trained, right)
    ax.set_xlim(0, right)
    ax.set_ylim(bottom, top)
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
    ax.set_title(f"Working runs: perplexity ratio per bin to {what}" + "".join(f"\n{n}" for n in notes),
                 fontsize=10)
    ax.set(xlabel="token position (= text index: one window from the start of the text)",
           ylabel="ppl ratio (run / reference)")
    return list(panel.curves)


def _draw_length(ax, records, trained, styles, working, reference) -> list[str]:
    curves = length_curves(records)
    bottom, top = axis_limits({label: ys for label, (_, ys) in curves.items()}, working, floor=0.0)
    rows = []
    for label, (x, ys) in curves.items():
        style = _style_of(label, styles, reference)
        ax.plot(x, ys, markersize=6, linewidth=1.6, **{**style.kwargs(), "marker": style.marker or "o"})
        if (gone := off_scale(x, ys, top)) is not None:
            rows.append((label, *gone, style))
    lengths = sorted({n for x, _ in curves.values() for n in x})
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.minorticks_off()
    pad = 2 ** 0.25
    ax.set_xlim(lengths[0] / pad, lengths[-1] * pad)
    if trained:
        ax.axvline(trained, color="black", linestyle=":", linewidth=1.2)
    _mark_off_scale(ax, rows, "")
    ax.set_ylim(bottom, top)
    ax.set_title("Perplexity vs context length (all scored tokens of the window)", fontsize=10)
    ax.set(xlabel="context length (tokens)", ylabel="perplexity")
    return list(curves)


def _draw_summary(ax, records, trained, styles, working, reference) -> list[str]:
    runs = longest_runs(records)
    labels = list(runs)
    bars = {label: [runs[label]["ppl_in_window"] or 0.0, beyond_ppl(runs[label]) or 0.0] for label in labels}
    _, right = axis_limits(bars, working)
    for i, label in enumerate(labels):
        color = _style_of(label, styles, reference).color
        inside, beyond = bars[label]
        ax.barh(i - 0.2, beyond, height=0.4, color=color)
        ax.barh(i + 0.2, inside, height=0.4, color=color, alpha=0.45)
        if beyond > right:
            ax.text(right, i - 0.2, f"{beyond:.3g} \u2192 ", ha="right", va="center", fontsize=8, color="white")
    ax.set_xlim(0, right)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_title("Perplexity per run (no per-position data, one length each): dark = beyond "
                 + (f"{trained}" if trained else "the trained length") + ", light = in window", fontsize=10)
    ax.set(xlabel="perplexity")
    return labels


def plot_perplexity(records: Sequence[dict], path: str | os.PathLike, trained: int | None = None, *,
                    styles: dict[str, Style] | None = None) -> None:
    """PNG of the perplexity records, one panel per row (``choose_panels``): loss by position, working runs'
    ratio to the reference, perplexity vs context length; one legend on the right. ``trained``: the trained
    length (default: the records' ``trained_length``); ``styles``: label -> ``Style`` (default
    ``series_styles`` over the records' labels)."""
    records = [r for r in records if r.get("ppl") is not None]
    if not records:
        raise ValueError("no perplexity records to plot")
    if trained is None:
        trained = next((r["trained_length"] for r in records if r.get("trained_length")), None)
    labels = [series_label(r) for r in records]
    styles = {**series_styles(labels), **(styles or {})}
    reference_record = find_reference(records, trained)
    reference = series_label(reference_record) if reference_record is not None else None
    working = working_labels(records, trained)
    panels = choose_panels(records, trained)
    plt = _pyplot()
    heights = {"position": 4.6, "ratio": 4.0, "length": 3.6, "summary": max(2.5, 0.3 * len(set(labels)))}
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, sum(heights[p] for p in panels)), squeeze=False,
                             gridspec_kw={"height_ratios": [heights[p] for p in panels]})
    shown: list[str] = []
    for ax, panel in zip(axes[:, 0], panels, strict=True):
        if panel == "position":
            shown += _draw_position(ax, records, trained, styles, working, reference)
        elif panel == "ratio":
            shown += _draw_ratio(ax, records, trained, styles)
        elif panel == "length":
            shown += _draw_length(ax, records, trained, styles, working, reference)
        else:
            shown += _draw_summary(ax, records, trained, styles, working, reference)
        ax.grid(True, alpha=0.3)
    _figure_legend(fig, [label for label in dict.fromkeys(labels) if label in shown], styles, reference, working,
                   trained)
    missing = [label for label in dict.fromkeys(labels) if label not in shown]
    if missing:
        fig.text(0.01, 0.0, "no per-position data, one length only (not drawn): " + ", ".join(missing),
                 fontsize=8, va="top")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _figure_legend(fig, labels, styles, reference, working, trained) -> None:
    from matplotlib.lines import Line2D

    handles = []
    for label in labels:
        style = _style_of(label, styles, reference)
        text = label + (" - same-token reference" if label == reference else "") + \
            ("" if label in working else " (breaks)")
        handles.append(Line2D([], [], markersize=5, linewidth=1.6, label=text, **style.kwargs()))
    if trained:
        handles.append(Line2D([], [], color="black", linestyle=":", linewidth=1.2, label=f"trained length {trained}"))
    fig.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 0.99), fontsize=8, frameon=False,
               title="run (method)", title_fontsize=9)


def passkey_counts(records: Sequence[dict], label: str, lengths: list[int],
                   depths: list[float]) -> list[list[tuple[int, int]]]:
    """(correct, trials) [len(lengths)][len(depths)] of the records labelled ``label`` (``passkey_label``),
    pooled over every record of a cell (several seeds); (0, 0) where there is none."""
    grid = [[(0, 0)] * len(depths) for _ in lengths]
    for r in records:
        if passkey_label(r) == label:
            i, j = lengths.index(r["length"]), depths.index(r["depth"])
            grid[i][j] = (grid[i][j][0] + r["correct"], grid[i][j][1] + r["trials"])
    return grid


def passkey_grid(records: Sequence[dict], method: str, lengths: list[int], depths: list[float]) -> list[list[float]]:
    """Accuracy [len(lengths)][len(depths)] of ``method`` (a ``passkey_label``: the method itself for the
    one-key task): correct / trials pooled over every record of a cell (several seeds), NaN where there is none."""
    return [[c / t if t else float("nan") for c, t in row] for row in passkey_counts(records, method, lengths, depths)]


PASSKEY_COLUMNS = 4  # heatmaps per row of the passkey figure


def plot_passkey(records: Sequence[dict], path: str | os.PathLike, *, styles: dict[str, Style] | None = None) -> None:
    """PNG of ``passkey_figure``."""
    plt = _pyplot()
    fig = passkey_figure(records, styles=styles)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def passkey_figure(records: Sequence[dict], *, styles: dict[str, Style] | None = None):
    """A matplotlib figure: one accuracy heatmap (lengths x depths) per method and task (``passkey_label``), each
    cell the accuracy and its trial count, framed in the method's colour (``styles``: method -> ``Style``,
    default ``series_styles`` over the methods; the perplexity plot's when shared). ``PASSKEY_COLUMNS`` panels
    per row, no empty panel; the colour scale on the right, the methods' colours in a legend below."""
    import textwrap

    from matplotlib.patches import Patch

    plt = _pyplot()
    methods = _methods(records)
    styles = {**series_styles(methods), **(styles or {})}
    labels = list(dict.fromkeys(passkey_label(r) for r in records))
    method_of = {passkey_label(r): r["method"] for r in records}
    lengths = sorted({r["length"] for r in records})
    depths = sorted({r["depth"] for r in records})
    cols = min(len(labels), PASSKEY_COLUMNS)
    rows = math.ceil(len(labels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 + (0.75 * len(depths) + 0.9) * cols,
                                                  (0.5 * len(lengths) + 1.9) * rows + 0.6), squeeze=False,
                             layout="constrained")
    flat = axes.ravel().tolist()
    for ax in flat[len(labels):]:
        fig.delaxes(ax)  # no empty panels
    image = None
    for ax, label in zip(flat, labels, strict=False):
        counts = passkey_counts(records, label, lengths, depths)
        grid = [[c / t if t else float("nan") for c, t in row] for row in counts]
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="lower")
        for i in range(len(lengths)):
            for j in range(len(depths)):
                c, t = counts[i][j]
                ax.text(j, i, f"{c / t:.0%}\n{c}/{t}" if t else "-", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set_yticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_xlabel("key depth", fontsize=8)
        ax.set_title("\n".join(textwrap.wrap(label, 34)[:3]), fontsize=8)
        for spine in ax.spines.values():
            spine.set(color=styles[method_of[label]].color, linewidth=3)
    for row in axes:
        row[0].set_ylabel("prompt length (tokens)", fontsize=8)
    fig.colorbar(image, ax=flat[:len(labels)], shrink=0.8, label="accuracy (cell: accuracy, correct/trials)")
    handles = [Patch(facecolor="white", edgecolor=styles[m].color, linewidth=3, label=m) for m in methods]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(3, len(handles)), fontsize=8, frameon=False,
               title="method (panel frame)", title_fontsize=8)
    return fig


def write_outputs(out_dir: str | os.PathLike, records: Sequence[dict], *, title: str = "ropekit evaluation",
                  command: str | None = None, notes: Sequence[str] = ()) -> dict[str, Path]:
    """results.csv, perplexity.png / passkey.png (when there are such records) and report.md."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ppl = [r for r in records if r.get("task") == "perplexity"]
    keys = [r for r in records if r.get("task") == "passkey"]
    files = {"csv": out / "results.csv", "report": out / "report.md"}
    write_csv(records, files["csv"])
    lines = [f"# {title}", ""]
    if command:
        lines += ["Reproduce with:", "", "```", command, "```", ""]
    lines += list(notes) + ([""] if notes else [])
    styles = series_styles([series_label(r) for r in ppl] + [r["method"] for r in keys])
    if ppl:
        trained = ppl[0].get("trained_length")
        files["perplexity_plot"] = out / "perplexity.png"
        plot_perplexity(ppl, files["perplexity_plot"], trained, styles=styles)
        protocol = ppl[0].get("protocol")
        lines += ["## Perplexity", "",
                  f"Text `{ppl[0].get('text')}`, {protocol}-window protocol; *in window* = tokens at "
                  f"positions below the trained length {trained}, *beyond* = from it on.", "",
                  perplexity_table(ppl), "", "![perplexity](perplexity.png)", ""]
    if keys:
        files["passkey_plot"] = out / "passkey.png"
        plot_passkey(keys, files["passkey_plot"], styles=styles)
        depths = sorted({r["depth"] for r in keys})
        trials = sorted({r["trials"] for r in keys})
        tasks = sorted({r.get("keys", 1) for r in keys})
        multi = [k for k in tasks if k > 1]
        lines += ["## Passkey retrieval", "",
                  f"Accuracy over depths {', '.join(f'{d:g}' for d in depths)} and {'/'.join(map(str, trials))} "
                  f"seeded trials per cell (first integer in up to 10 greedy tokens equals the asked key"
                  + (f"; {'/'.join(map(str, multi))} keys: tagged keys in the filler, the question names one"
                     if multi else "") + "), with the Wilson 95% interval.", "",
                  passkey_table(keys), "", "![passkey](passkey.png)", ""]
    files["report"].write_text("\n".join(lines))
    return files

"""Reports: CSV, a printed/markdown table, PNG plots (perplexity vs length and vs position,
passkey heatmaps), and ``report.md``."""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path

CSV_FIELDS = ("task", "method", "length", "depth", "protocol", "ppl", "ppl_in_window", "ppl_beyond",
              "tokens_scored", "accuracy", "trials", "seconds", "peak_mem_mb", "rope", "attention")


def _f(x, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def write_csv(records: Sequence[dict], path: str | os.PathLike) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for r in records:
            writer.writerow({k: r.get(k) for k in CSV_FIELDS})


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


def passkey_table(records: Sequence[dict]) -> str:
    """Markdown table: rows = methods, columns = length (mean accuracy over depths)."""
    lengths = sorted({r["length"] for r in records})
    lines = ["| method | " + " | ".join(f"passkey @ {n}" for n in lengths) + " |",
             "|---|" + "---:|" * len(lengths)]
    for method in _methods(records):
        cells = []
        for n in lengths:
            rs = [r for r in records if r["method"] == method and r["length"] == n]
            if rs:
                correct = sum(r["correct"] for r in rs)
                total = sum(r["trials"] for r in rs)
                cells.append(f"{correct / total:.0%} ({correct}/{total})")
            else:
                cells.append("-")
        lines.append(f"| `{method}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_perplexity(records: Sequence[dict], path: str | os.PathLike, trained: int | None = None) -> None:
    """PNG: perplexity against context length (left) and against position at the longest length
    (right, per segment), one line per method."""
    plt = _pyplot()
    from matplotlib import ticker

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    longest = max(r["length"] for r in records)
    for label in dict.fromkeys(series_label(r) for r in records):
        rs = sorted((r for r in records if series_label(r) == label), key=lambda r: r["length"])
        sliding = rs[0].get("protocol") == "sliding"
        style = {"marker": "o", "linestyle": "--" if sliding else "-"}
        (line,) = ax1.plot([r["length"] for r in rs], [r["ppl"] for r in rs], label=label, **style)
        # right: by position in the longest single window, or by text index for a sliding run
        seg = rs[-1] if sliding and rs[-1].get("segments_by") == "text" else next(
            (r for r in rs if r["length"] == longest and not sliding), None)
        if seg and seg.get("segments"):
            s = seg["segments"]
            ax2.plot([(x["start"] + x["start"] + x["tokens"]) / 2 for x in s], [x["ppl"] for x in s],
                     color=line.get_color(), label=label, **style)
    for ax in (ax1, ax2):
        if trained:
            ax.axvline(trained, color="grey", linestyle="--", linewidth=1, label="trained length")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda y, _: f"{y:g}"))
        ax.yaxis.set_minor_formatter(ticker.FuncFormatter(lambda y, _: f"{y:g}"))
        ax.grid(True, which="both", alpha=0.3)
    ax1.set(xlabel="context length (tokens)", ylabel="perplexity (all scored tokens)",
            title="Perplexity vs context length")
    ax2.set(xlabel="token position", ylabel="perplexity of the segment",
            title=f"Perplexity by position, {longest}-token window")
    ax1.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def passkey_grid(records: Sequence[dict], method: str, lengths: list[int], depths: list[float]) -> list[list[float]]:
    """Accuracy [len(lengths)][len(depths)] of ``method``: correct / trials pooled over every record
    of a cell (several seeds), NaN where there is none."""
    counts: dict[tuple[int, float], list[int]] = {}
    for r in records:
        if r["method"] == method:
            acc = counts.setdefault((r["length"], r["depth"]), [0, 0])
            acc[0], acc[1] = acc[0] + r["correct"], acc[1] + r["trials"]
    grid = [[float("nan")] * len(depths) for _ in lengths]
    for (length, depth), (correct, trials) in counts.items():
        grid[lengths.index(length)][depths.index(depth)] = correct / trials
    return grid


def plot_passkey(records: Sequence[dict], path: str | os.PathLike) -> None:
    """PNG: one accuracy heatmap (lengths x depths) per method."""
    plt = _pyplot()
    methods = _methods(records)
    lengths = sorted({r["length"] for r in records})
    depths = sorted({r["depth"] for r in records})
    fig, axes = plt.subplots(1, len(methods), figsize=(2.2 + 1.0 * len(depths) * len(methods), 3.2),
                             squeeze=False)
    for ax, method in zip(axes[0], methods, strict=True):
        grid = passkey_grid(records, method, lengths, depths)
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="lower")
        for i in range(len(lengths)):
            for j in range(len(depths)):
                if grid[i][j] == grid[i][j]:
                    ax.text(j, i, f"{grid[i][j]:.0%}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set_yticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set(xlabel="key depth", title=method)
        ax.title.set_fontsize(8)
    axes[0][0].set_ylabel("prompt length (tokens)")
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="accuracy")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


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
    if ppl:
        trained = ppl[0].get("trained_length")
        files["perplexity_plot"] = out / "perplexity.png"
        plot_perplexity(ppl, files["perplexity_plot"], trained)
        protocol = ppl[0].get("protocol")
        lines += ["## Perplexity", "",
                  f"Text `{ppl[0].get('text')}`, {protocol}-window protocol; *in window* = tokens at "
                  f"positions below the trained length {trained}, *beyond* = from it on.", "",
                  perplexity_table(ppl), "", "![perplexity](perplexity.png)", ""]
    if keys:
        files["passkey_plot"] = out / "passkey.png"
        plot_passkey(keys, files["passkey_plot"])
        depths = sorted({r["depth"] for r in keys})
        lines += ["## Passkey retrieval", "",
                  f"Accuracy over depths {', '.join(f'{d:g}' for d in depths)} and {keys[0]['trials']} "
                  f"seeded trials per cell (first integer in up to 10 greedy tokens equals the key).", "",
                  passkey_table(keys), "", "![passkey](passkey.png)", ""]
    files["report"].write_text("\n".join(lines))
    return files

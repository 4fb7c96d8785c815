"""``report.md`` and the files beside it: ``results.csv`` (``ropekit.eval.tables``), ``perplexity.png`` and
``passkey.png`` (``ropekit.eval.plots``, drawing ``ropekit.eval.figure_data``), from a list of records."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path

from ropekit.eval.figure_data import series_label, series_styles
from ropekit.eval.plots import plot_passkey, plot_perplexity
from ropekit.eval.tables import passkey_table, perplexity_table, write_csv


def can_draw() -> bool:
    """Whether the figures can be drawn: matplotlib (the ``lab`` extra) is installed."""
    return importlib.util.find_spec("matplotlib") is not None


def perplexity_section(ppl: Sequence[dict], figure: bool = True) -> list[str]:
    """The report's perplexity section: the protocol, the table, the figure (when drawn)."""
    trained, protocol = ppl[0].get("trained_length"), ppl[0].get("protocol")
    return ["## Perplexity", "",
            f"Text `{ppl[0].get('text')}`, {protocol}-window protocol; *in window* = tokens at positions below the "
            f"trained length {trained}, *beyond* = from it on.", "",
            perplexity_table(ppl), "", *(["![perplexity](perplexity.png)", ""] if figure else [])]


def passkey_section(keys: Sequence[dict], figure: bool = True) -> list[str]:
    """The report's passkey section: depths, trials and tasks, the table, the figure (when drawn)."""
    depths = sorted({r["depth"] for r in keys})
    trials = sorted({r["trials"] for r in keys})
    multi = sorted({r.get("keys", 1) for r in keys} - {1})
    task = f"; {'/'.join(map(str, multi))} keys: tagged keys in the filler, the question names one" if multi else ""
    return ["## Passkey retrieval", "",
            f"Accuracy over depths {', '.join(f'{d:g}' for d in depths)} and {'/'.join(map(str, trials))} seeded "
            f"trials per cell (first integer in up to 10 greedy tokens equals the asked key{task}), with the "
            "Wilson 95% interval.", "",
            passkey_table(keys), "", *(["![passkey](passkey.png)", ""] if figure else [])]


def write_outputs(out_dir: str | os.PathLike, records: Sequence[dict], *, title: str = "ropekit evaluation",
                  command: str | None = None, notes: Sequence[str] = (), figures: bool = True) -> dict[str, Path]:
    """results.csv, perplexity.png / passkey.png (when there are such records, and ``figures``: without
    matplotlib, see ``can_draw``, the report has the tables only) and report.md; one style per series shared by
    both figures."""
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
        if figures:
            files["perplexity_plot"] = out / "perplexity.png"
            plot_perplexity(ppl, files["perplexity_plot"], ppl[0].get("trained_length"), styles=styles)
        lines += perplexity_section(ppl, figures)
    if keys:
        if figures:
            files["passkey_plot"] = out / "passkey.png"
            plot_passkey(keys, files["passkey_plot"], styles=styles)
        lines += passkey_section(keys, figures)
    files["report"].write_text("\n".join(lines))
    return files

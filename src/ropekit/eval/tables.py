"""Tables of the records: the CSV rows and the markdown tables of the report (pure, no matplotlib)."""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence

from ropekit.eval.figure_data import passkey_label, series_label
from ropekit.eval.stats import wilson_interval

CSV_FIELDS = ("task", "method", "length", "depth", "protocol", "ppl", "ppl_in_window", "ppl_beyond",
              "tokens_scored", "accuracy", "trials", "keys", "jitter", "ci95_low", "ci95_high", "seconds",
              "peak_mem_mb", "rope", "attention")


def _f(x, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def csv_row(r: dict) -> dict:
    """The record's CSV fields; a passkey row with its task (keys, jitter: 1 and 0 for the one-key records,
    which leave them out) and the accuracy's Wilson 95% interval."""
    row = {k: r.get(k) for k in CSV_FIELDS}
    if r.get("task") == "passkey" and r.get("trials"):
        row["ci95_low"], row["ci95_high"] = (round(v, 4) for v in wilson_interval(r["correct"], r["trials"]))
        row["keys"], row["jitter"] = r.get("keys", 1), r.get("jitter", 0.0)
    return row


def write_csv(records: Sequence[dict], path: str | os.PathLike) -> None:
    """One ``csv_row`` per record."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for r in records:
            writer.writerow(csv_row(r))


def perplexity_table(records: Sequence[dict]) -> str:
    """Markdown table: one row per (method, length); a sliding run is labelled with its window/stride.
    "text >= L" (``ppl_text_beyond``): tokens of the text from the trained length on, whatever the window
    position."""
    lines = ["| method | length | ppl (all) | ppl in window | ppl beyond | text >= L | tokens | seconds | peak MB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in records:
        lines.append(f"| `{series_label(r)}` | {r['length']} | {_f(r['ppl'])} | {_f(r['ppl_in_window'])} | "
                     f"{_f(r['ppl_beyond'])} | {_f(r.get('ppl_text_beyond'))} | {r['tokens_scored']} | "
                     f"{r['seconds']:.0f} | {r['peak_mem_mb']:.0f} |")
    return "\n".join(lines)


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
            cells.append(accuracy_cell(sum(r["correct"] for r in rs), sum(r["trials"] for r in rs)) if rs else "-")
        lines.append(f"| `{label}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)

"""``ropekit compare``: which context-extension method works past the trained length, and at what cost.

One command loads the default model, runs every method on a long window of *Pride and
Prejudice* (perplexity inside vs beyond the trained length) and a small passkey grid, prints a
table and writes ``report.md``, ``perplexity.png``, ``results.json`` and ``results.csv`` (and
``passkey.png`` when the passkey grid runs) to ``--out``. The default is a quick look at 2x the
trained length sized for about 5 minutes on a 2-core CPU (perplexity only; ``--passkey`` adds a
12,000-token passkey check); ``--full`` sweeps 2x, 4x and 8x with a passkey grid. Interrupted runs
resume.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from ropekit.cli.common import (
    add_model,
    add_progress,
    add_runtime,
    add_shard,
    add_threads,
    apply_shard,
    apply_threads,
    check_extras,
    check_runtime,
    command_line,
)
from ropekit.cli.eval import load, log

# Methods at scale s (the target length is s x the trained length L); {s} is the factor, {w}
# the Self-Extend window (1024, or L/4 for small models) and {g} a group size whose reach
# (L - W) * G + W covers s * L.
QUICK_METHODS = ("none", "yarn:factor={s}", "self-extend:group={g},window={w}")
FULL_METHODS = ("none", "linear:factor={s}", "dynamic:factor={s}", "yarn:factor={s}",
                "self-extend:group={g},window={w}", "leaky-rerope:window={w2},k={k}",
                "yarn:factor={s2}+self-extend:group={g2},window={w}")
QUICK_SCALES = (2,)
FULL_SCALES = (2, 4, 8)
QUICK_PASSKEY = {"depths": (0.5,), "trials": 1}
QUICK_PASSKEY_RATIO = 12000 / 8192  # the seed's 12,000 tokens for a model trained on 8192
FULL_PASSKEY = {"depths": (0.1, 0.3, 0.5, 0.7, 0.9), "trials": 2}


def self_extend_window(trained: int) -> int:
    return min(1024, max(1, trained // 4))


def self_extend_group(target: int, trained: int, window: int | None = None) -> int:
    """The smallest power-of-two group G >= 2 with (trained - window) * G + window >= target."""
    window = self_extend_window(trained) if window is None else window
    if window >= trained:
        raise ValueError(f"self-extend window {window} must be below the trained length {trained}")
    g = 2
    while (trained - window) * g + window < target:
        g *= 2
    return g


def methods_at(templates, scale: int, trained: int) -> list[str]:
    w = self_extend_window(trained)
    g = self_extend_group(scale * trained, trained, w)
    return [t.format(s=scale, g=g, w=w, w2=2 * w, k=4 * scale, s2=max(2, scale // 2), g2=max(2, g // 2))
            for t in templates]


def add_parsers(subparsers) -> None:
    p = subparsers.add_parser("compare", help="compare context-extension methods past the trained length "
                                              "(perplexity + passkey, report with plots)",
                              description=__doc__.splitlines()[0])
    p.add_argument("--out", default="ropekit-compare", help="output folder (default ropekit-compare)")
    p.add_argument("--full", action="store_true",
                   help="the full sweep: 2x, 4x, 8x the trained length, all methods, a passkey grid")
    add_model(p)
    p.add_argument("--text", default=None, help="text file (default: the packaged Pride and Prejudice)")
    p.add_argument("--method", action="append", metavar="METHOD",
                   help="replace the method list (repeatable); scales still come from --full")
    p.add_argument("--passkey", action="store_true",
                   help="add the passkey check to the quick sweep (12,000 tokens, ~1 min per method)")
    p.add_argument("--no-passkey", action="store_true", help="skip the passkey grid (also with --full)")
    add_runtime(p)
    add_threads(p)
    add_progress(p)
    add_shard(p)
    p.set_defaults(func=run)


def plan(args, trained: int) -> tuple[list[tuple[str, int]], dict]:
    """(perplexity cells (method, length), passkey settings {methods, lengths, depths, trials})."""
    scales = FULL_SCALES if args.full else QUICK_SCALES
    templates = FULL_METHODS if args.full else QUICK_METHODS
    cells, key_methods = [], []
    for s in scales:
        methods = list(args.method) if args.method else methods_at(templates, s, trained)
        cells += [(m, s * trained) for m in methods]
        if s == scales[0]:
            key_methods = methods
    if args.full:
        passkey = {"methods": key_methods, "lengths": (trained, 2 * trained - 192), **FULL_PASSKEY}
    else:
        passkey = {"methods": key_methods, "lengths": (round(QUICK_PASSKEY_RATIO * trained),), **QUICK_PASSKEY}
    return cells, passkey


def wants_passkey(args) -> bool:
    """The quick default stays near 5 minutes: passkey only with --full or --passkey, never with --no-passkey."""
    return (args.full or args.passkey) and not args.no_passkey


def run(args) -> int:
    from ropekit.eval.report import write_outputs
    from ropekit.eval.results import ResultStore
    from ropekit.eval.sweep import Sweeper, check_methods
    from ropekit.eval.tables import passkey_table, perplexity_table
    from ropekit.eval.text import encode_text, load_text, text_name, text_sha256

    if args.method:
        check_methods(args.method)
    check_runtime(args)
    apply_threads(args)
    out = Path(args.out)
    shard, figures = apply_shard(args), check_extras(args)
    store = ResultStore(out / "results.json")
    text = load_text(args.text)
    start = time.perf_counter()
    runner = load(args)
    tokens = encode_text(runner.tokenizer, text)
    trained = runner.trained_length
    cells, passkey = plan(args, trained)
    with_passkey = wants_passkey(args)
    print(f"loaded {args.model} (trained length {trained}) in {time.perf_counter() - start:.1f} s; "
          f"{len(cells)} perplexity runs" + ("" if not with_passkey else
                                             f", passkey {len(passkey['methods'])} methods x "
                                             f"{len(passkey['lengths'])} lengths x {len(passkey['depths'])} "
                                             f"depths x {passkey['trials']} trials"), file=sys.stderr)
    sweeper = Sweeper(runner, runner.tokenizer, store, model_name=str(args.model),
                      show_progress=not args.no_progress, log=log, shard=shard)
    planned = [c for spec, length in cells for c in sweeper.perplexity_cells(
        [spec], [length], text=text_name(args.text), text_sha256=text_sha256(text))]
    if with_passkey:
        planned += sweeper.passkey_cells(passkey["methods"], passkey["lengths"], passkey["depths"],
                                         trials=passkey["trials"], seed=0)
    sweeper.run(planned, tokens=tokens)
    notes = [f"Model `{args.model}` on {args.backend} ({args.dtype}, {args.device}), trained context {trained} "
             f"tokens. Single-window perplexity: one window "
             f"of the given length from the start of the text, every token scored. Total time "
             f"{time.perf_counter() - start:.0f} s."]
    with store.locked():  # every shard's finished cells of the plan, drawn by one process at a time
        store.write_index()
        records = [r for r in map(store.find, planned) if r is not None]
        files = write_outputs(out, records, title="ropekit compare: context extension past the trained length",
                              command=command_line(), notes=notes, figures=figures)
    ppl = [r for r in records if r["task"] == "perplexity"]
    keys = [r for r in records if r["task"] == "passkey"]
    print(perplexity_table(ppl))
    if keys:
        print()
        print(passkey_table(keys))
    print(f"\nreport: {files['report']} (plots and results.json beside it); "
          f"total {time.perf_counter() - start:.0f} s")
    return 0

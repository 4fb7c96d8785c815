"""``ropekit eval perplexity`` and ``ropekit eval passkey``: sweeps over methods and lengths.

Both write ``DIR/results.json`` (a list of records, rewritten atomically after each finished
cell, so an interrupted run resumes where it stopped), ``results.csv``, PNG plots and
``report.md``. A method is ``--method METHOD`` (repeatable), see ``ropekit.method``.
``--time-budget MINUTES`` stops a sweep after the cell that crosses the budget: the outputs are
written for the finished cells, the cells left and the resuming command are printed, and the
exit status is ``EXIT_TIME_BUDGET`` (3) instead of 0.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ropekit.cli.common import (
    add_model,
    add_progress,
    add_runtime,
    add_shard,
    add_threads,
    add_time_budget,
    apply_shard,
    apply_threads,
    check_extras,
    check_runtime,
    command_line,
    print_budget_stop,
    start_time_budget,
)

MAX_TRIALS = 10_000  # seeded keys per cell; passkey protocols use 5-100


def add_common(p: argparse.ArgumentParser) -> None:
    add_model(p)
    p.add_argument("--method", action="append", metavar="METHOD",
                   help="TYPE[:key=value,...][+TYPE...], repeatable, e.g. none, yarn:factor=2, "
                        "self-extend:group=8,window=1024, yarn:factor=2+self-extend:group=4,window=1024 "
                        "(default: none)")
    p.add_argument("--lengths", required=False,
                   help="comma-separated context lengths in tokens (default 4096,8192)")
    p.add_argument("--out", default=None, help="output folder (results.json, results.csv, plots, report.md)")
    add_runtime(p)
    add_threads(p)
    add_progress(p)
    add_time_budget(p)
    add_shard(p)


def add_parsers(subparsers) -> None:
    parser = subparsers.add_parser("eval", help="perplexity and passkey sweeps over methods and lengths",
                                   description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="eval_command", required=True, metavar="TASK")

    ppl = sub.add_parser("perplexity", help="perplexity against context length on a long text")
    add_common(ppl)
    ppl.add_argument("--text", default=None,
                     help="UTF-8 text file (default: the packaged Pride and Prejudice)")
    ppl.add_argument("--protocol", choices=("single", "sliding"), default="single",
                     help="single: the first L tokens, all scored (default); sliding: windows every --stride "
                          "tokens scoring only new tokens")
    ppl.add_argument("--stride", type=int, default=256, help="sliding-window stride (default 256)")
    ppl.add_argument("--windows", type=int, default=1, help="single protocol: disjoint windows to average")
    ppl.add_argument("--segment", type=int, default=4096, help="segment size of the per-position breakdown")
    ppl.add_argument("--max-tokens", type=int, default=None,
                     help="use only the first N tokens of the text (e.g. a sliding reference at the trained "
                          "length over the tokens a long window scores)")
    ppl.set_defaults(func=run_perplexity, lengths_default="4096,8192")

    key = sub.add_parser("passkey", help="passkey retrieval accuracy, lengths x depths")
    add_common(key)
    key.add_argument("--depths", default="0.1,0.5,0.9", help="key depths in [0, 1] (default 0.1,0.5,0.9)")
    key.add_argument("--trials", type=int, default=5, help="seeded trials per cell (default 5)")
    key.add_argument("--seed", type=int, default=0, help="seed of the random 5-digit keys (default 0)")
    key.add_argument("--keys", type=int, default=1, metavar="K",
                     help="keys per prompt (default 1): K > 1 is the multi-key task, K tagged keys in the filler, "
                          "the question asks for the one at --depths, the others at seeded random depths")
    key.add_argument("--jitter", type=float, default=0.0, metavar="J",
                     help="per-trial jitter of the asked key's depth, uniform in +-J (default 0: every trial at "
                          "the cell's depth)")
    key.add_argument("--no-share-prefix", action="store_true",
                     help="run every trial's prompt whole (default: the trials' common first tokens run once "
                          "and each trial continues from a copy of that KV cache)")
    key.set_defaults(func=run_passkey, lengths_default="4096,8192")


def setup(args) -> tuple[list[str], list[int], Path]:
    """Validate the common flags before loading anything (ValueError -> exit 2)."""
    from ropekit.eval.sweep import check_methods, parse_int_list

    methods = check_methods(args.method or ["none"])
    lengths = parse_int_list(args.lengths or args.lengths_default, "--lengths")
    check_runtime(args)
    apply_threads(args)
    out = Path(args.out or f"ropekit-{args.eval_command}")
    return methods, lengths, out


def load(args):
    """The runner of ``--model`` on ``--backend`` / ``--device`` / ``--dtype`` (see ``ropekit.eval.runners``)."""
    from ropekit.eval.runners import load_runner

    start = time.perf_counter()
    runner = load_runner(args.model, backend=args.backend, dtype=args.dtype, device=args.device)
    print(f"loaded {args.model} ({args.backend}, {args.dtype}, {args.device}) in {time.perf_counter() - start:.1f} s",
          file=sys.stderr)
    return runner


def run_perplexity(args, clock=None) -> int:
    """``clock``: what ``--time-budget`` is measured on (``time.monotonic`` by default)."""
    from ropekit.eval.budget import BudgetSpent
    from ropekit.eval.results import ResultStore
    from ropekit.eval.sweep import Sweeper, check_max_tokens
    from ropekit.eval.tables import perplexity_table
    from ropekit.eval.text import encode_text, load_text, text_name, text_sha256

    methods, lengths, out = setup(args)
    budget = start_time_budget(args, clock)
    if not 1 <= args.segment < 2**31:
        raise ValueError(f"--segment must be in [1, 2**31), got {args.segment}")
    if args.max_tokens is not None:
        check_max_tokens(args.max_tokens)  # before loading the model
    shard, figures = apply_shard(args), check_extras(args)
    store = ResultStore(out / "results.json")
    text = load_text(args.text)
    runner = load(args)
    tokens = encode_text(runner.tokenizer, text)
    sweeper = Sweeper(runner, runner.tokenizer, store, model_name=str(args.model),
                      show_progress=not args.no_progress, log=log, budget=budget, shard=shard)
    stop = None
    try:
        records = sweeper.perplexity(tokens, methods, lengths, text=text_name(args.text),
                                     text_sha256=text_sha256(text), protocol=args.protocol, stride=args.stride,
                                     windows=args.windows, segment=args.segment, max_tokens=args.max_tokens)
    except BudgetSpent as spent:
        stop, records = spent, spent.finished
    write_reports(out, store, "ropekit eval perplexity", figures)
    print(perplexity_table(records))
    print(f"\nwrote {out}/results.json, results.csv, {'perplexity.png, ' if figures else ''}report.md")
    return 0 if stop is None else print_budget_stop(stop, budget)


def run_passkey(args, clock=None) -> int:
    """``clock``: what ``--time-budget`` is measured on (``time.monotonic`` by default)."""
    from ropekit.eval.budget import BudgetSpent
    from ropekit.eval.passkey import check_task
    from ropekit.eval.results import ResultStore
    from ropekit.eval.sweep import Sweeper, parse_float_list
    from ropekit.eval.tables import passkey_table

    methods, lengths, out = setup(args)
    budget = start_time_budget(args, clock)
    depths = parse_float_list(args.depths, "--depths")
    if not 1 <= args.trials <= MAX_TRIALS:
        raise ValueError(f"--trials must be in [1, {MAX_TRIALS}], got {args.trials}")
    check_task(args.keys, args.jitter)
    shard, figures = apply_shard(args), check_extras(args)
    store = ResultStore(out / "results.json")
    runner = load(args)
    sweeper = Sweeper(runner, runner.tokenizer, store, model_name=str(args.model),
                      show_progress=not args.no_progress, log=log, budget=budget, shard=shard)
    stop = None
    try:
        records = sweeper.passkey(methods, lengths, depths, trials=args.trials, seed=args.seed, keys=args.keys,
                                  jitter=args.jitter, share_prefix=not args.no_share_prefix)
    except BudgetSpent as spent:
        stop, records = spent, spent.finished
    write_reports(out, store, "ropekit eval passkey", figures)
    print(passkey_table(records))
    print(f"\nwrote {out}/results.json, results.csv, {'passkey.png, ' if figures else ''}report.md")
    return 0 if stop is None else print_budget_stop(stop, budget)


def write_reports(out: Path, store, title: str, figures: bool) -> None:
    """results.csv, the figures and report.md from every record in the store (all shards' and earlier runs'),
    under the store's lock so that two processes finishing together do not write the same files at once."""
    from ropekit.eval.report import write_outputs

    with store.locked():
        write_outputs(out, store.write_index(), title=title, command=command_line(), figures=figures)


def log(line: str) -> None:
    """A finished cell's line, on stdout as it comes."""
    print(line, flush=True)

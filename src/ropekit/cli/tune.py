"""``ropekit tune``: search one family's parameters for a target length on a calibration window of the text,
check the winner (and the family's default from ``ropekit plan``) on a held-out window, and print the best
spec with its settings for every runtime.

Writes ``DIR/results.json`` (every measurement, rewritten atomically after each one, so a rerun of the same
command measures nothing twice) and ``DIR/tune.json`` (the summary ``--json`` prints). ``--time-budget
MINUTES`` stops after the measurement that crosses the budget, prints what is left and the resuming command
(with ``--json``: as a JSON object) and exits with ``EXIT_TIME_BUDGET`` (3); tune.json is then not written.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ropekit.cli.common import (
    EXIT_TIME_BUDGET,
    add_model,
    add_progress,
    add_runtime,
    add_shard,
    add_threads,
    add_time_budget,
    apply_shard,
    apply_threads,
    check_runtime,
    command_line,
    print_budget_stop,
    start_time_budget,
)

# ropekit.eval.tune_grids.FAMILIES, named here so that --help imports no torch
FAMILIES = ("yarn", "self-extend", "leaky-rerope", "longrope", "dca")


def add_parsers(subparsers) -> None:
    p = subparsers.add_parser("tune", help="search a method family's parameters for a target length "
                                           "(calibration window, held-out check, settings per runtime)",
                              description=__doc__.splitlines()[0])
    add_model(p)
    p.add_argument("--target-length", required=True, metavar="N", help="tokens to reach (above the trained length)")
    p.add_argument("--family", required=True, metavar="FAMILY", help=f"one of {', '.join(FAMILIES)}")
    p.add_argument("--objective", default="ppl", metavar="OBJ",
                   help="ppl: perplexity beyond the trained length (default); passkey: accuracy of a seeded "
                        "passkey set at N; both: passkey first, perplexity breaking ties")
    p.add_argument("--budget-evals", default="12", metavar="K",
                   help="candidates measured on the calibration data (default 12; the family's default first)")
    p.add_argument("--seed", default="0", metavar="S", help="seed of the candidate order, the search and the "
                                                            "passkey keys (default 0)")
    p.add_argument("--text", default=None, help="UTF-8 text file (default: the packaged Pride and Prejudice); "
                                                "needs at least 2N tokens")
    p.add_argument("--passkey-depths", default="0.1,0.5,0.9", help="passkey objective: key depths (default "
                                                                   "0.1,0.5,0.9)")
    p.add_argument("--passkey-trials", default="2", metavar="T", help="passkey objective: trials per depth "
                                                                      "(default 2)")
    p.add_argument("--out", default="ropekit-tune", help="output folder (default ropekit-tune)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON instead of text")
    add_runtime(p)
    add_threads(p)
    add_progress(p)
    add_time_budget(p, what="measurement")
    add_shard(p)
    p.set_defaults(func=run)


def _integer(text: str, flag: str) -> int:
    try:
        value = float(str(text).strip().replace("_", ""))
    except ValueError:
        raise ValueError(f"{flag} must be a whole number, got {text!r}") from None
    if not value.is_integer():
        raise ValueError(f"{flag} must be a whole number, got {text!r}")
    return int(value)


def settings_of(args: argparse.Namespace):
    """The validated ``TuneSettings`` of the command line (ValueError -> exit 2), before anything is loaded."""
    from ropekit.eval.sweep import parse_float_list, parse_int_list
    from ropekit.eval.tune import TuneSettings, check_settings

    targets = parse_int_list(args.target_length, "--target-length")
    if len(targets) != 1:
        raise ValueError(f"--target-length takes one length, got {args.target_length!r}")
    target = targets[0]
    return check_settings(TuneSettings(
        family=str(args.family).strip().lower(), target_length=target, objective=str(args.objective).strip().lower(),
        budget=_integer(args.budget_evals, "--budget-evals"), seed=_integer(args.seed, "--seed"),
        depths=tuple(parse_float_list(args.passkey_depths, "--passkey-depths")),
        trials=_integer(args.passkey_trials, "--passkey-trials")))


def run(args: argparse.Namespace, clock=None) -> int:
    """``clock``: what ``--time-budget`` is measured on (``time.monotonic`` by default)."""
    from ropekit.cli.convert import model_rope
    from ropekit.cli.eval import load, log
    from ropekit.convert import translate_all
    from ropekit.eval.budget import BudgetSpent
    from ropekit.eval.results import ResultStore, write_json_atomic
    from ropekit.eval.text import encode_text, load_text, text_sha256
    from ropekit.eval.tune import Tuner, check_settings, deploy_base

    settings = settings_of(args)
    budget = start_time_budget(args, clock)
    check_runtime(args)
    apply_threads(args)
    base, arch, _ = model_rope(args.model)  # the file's rope (metadata only): the trained length, the settings
    check_settings(settings, base.original_max_position_embeddings)
    out = Path(args.out)
    shard = apply_shard(args)
    store = ResultStore(out / "results.json")
    text = load_text(args.text)
    runner = load(args)
    tokens = encode_text(runner.tokenizer, text)
    tuner = Tuner(runner, tokens, store, settings, model_name=str(args.model), text_sha256=text_sha256(text),
                  show_progress=not args.no_progress, log=(lambda line: None) if args.json else log, budget=budget,
                  shard=shard)
    try:
        result = tuner.tune()
    except BudgetSpent as stop:
        if args.json:
            print(json.dumps(budget_stop_summary(stop), indent=1))
        return print_budget_stop(stop, budget, what="measurements")
    if result is None:  # a shard whose share is stored while other shards' candidates are still running
        print(f"shard {shard}: its candidates are measured and stored in {out}/results.json; the summary comes from "
              "the last shard to finish (or rerun the command without --shard once all have)", file=sys.stderr)
        return 0
    summary = {"model": str(args.model), "command": command_line(), **result.as_dict()}
    deploy = deploy_base(settings.family, base, settings.target_length)
    summary["best"]["settings"] = dict(translate_all(result.best["method"], deploy, arch or "llama"))
    write_json_atomic(out / "tune.json", summary)
    if args.json:
        print(json.dumps(summary, indent=1))
        return 0
    print_summary(summary)
    print(f"\nwrote {out}/results.json, tune.json", file=sys.stderr)
    return 0


def budget_stop_summary(stop) -> dict:
    """What ``--json`` prints when ``stop`` (a ``BudgetSpent``) ended the run: the measurements finished and
    left, and the command that resumes."""
    return {"stopped_by": "time-budget", "exit_status": EXIT_TIME_BUDGET, "elapsed_s": round(stop.elapsed, 1),
            "finished": len(stop.finished), "left": stop.left, "resume": command_line()}


def print_summary(summary: dict) -> None:
    from ropekit.eval.tune import describe

    best, default = summary["best"], summary["default"]
    cal, held = summary["calibration"]["tokens"], summary["held_out"]["tokens"]
    print(f"\n{summary['family']} for {summary['target_length']} tokens (trained {summary['trained_length']}), "
          f"objective {summary['objective']}: {len(summary['candidates'])} candidates measured "
          f"({summary['evaluations']['run']} measurements now, {summary['evaluations']['reused']} from the stored "
          f"records)")
    print(f"best method: {best['method']}")
    print(f"  calibration (tokens {cal[0]}-{cal[1]}):  {describe(best['calibration'])}")
    print(f"  held-out    (tokens {held[0]}-{held[1]}): {describe(best['held_out'])}")
    print(f"default ({'the same' if default['method'] == best['method'] else default['method']}):")
    print(f"  calibration: {describe(default['calibration'])}")
    print(f"  held-out:    {describe(default['held_out'])}")
    print("settings:")
    width = max(len(t) for t in best["settings"])
    for target, text in best["settings"].items():
        print(f"  {target:<{width}}  {text}")

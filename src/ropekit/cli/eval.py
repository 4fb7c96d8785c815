"""``ropekit eval perplexity`` and ``ropekit eval passkey``: sweeps over methods and lengths.

Both write ``DIR/results.json`` (a list of records, rewritten atomically after each finished
cell, so an interrupted run resumes where it stopped), ``results.csv``, PNG plots and
``report.md``. A method is ``--method SPEC`` (repeatable), see ``ropekit.model.extend.spec``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

DEFAULT_MODEL = "smollm2"


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="a .gguf file, an HF folder, or 'smollm2' (default)")
    p.add_argument("--method", action="append", metavar="SPEC",
                   help="TYPE[:key=value,...][+TYPE...], repeatable, e.g. none, yarn:factor=2, "
                        "self-extend:group=8,window=1024, yarn:factor=2+self-extend:group=4,window=1024 "
                        "(default: none)")
    p.add_argument("--lengths", required=False,
                   help="comma-separated context lengths in tokens (default 4096,8192)")
    p.add_argument("--out", default=None, help="output folder (results.json, results.csv, plots, report.md)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


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
    key.set_defaults(func=run_passkey, lengths_default="4096,8192")


def setup(args) -> tuple[list[str], list[int], Path]:
    """Validate the common flags before loading anything (ValueError -> exit 2)."""
    from ropekit.eval.sweep import check_methods, parse_int_list

    methods = check_methods(args.method or ["none"])
    lengths = parse_int_list(args.lengths or args.lengths_default, "--lengths")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    out = Path(args.out or f"ropekit-{args.eval_command}")
    return methods, lengths, out


def load(args):
    from ropekit.loading import load_model

    start = time.perf_counter()
    model, tokenizer = load_model(args.model)
    print(f"loaded {args.model} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return model, tokenizer


def command_line() -> str:
    return "ropekit " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def run_perplexity(args) -> int:
    from tqdm.auto import tqdm

    from ropekit.eval.report import perplexity_table, write_outputs
    from ropekit.eval.results import ResultStore
    from ropekit.eval.sweep import Sweeper, check_max_tokens
    from ropekit.eval.text import load_tokens, text_name

    methods, lengths, out = setup(args)
    if args.segment < 1:
        raise ValueError(f"--segment must be >= 1, got {args.segment}")
    if args.max_tokens is not None:
        check_max_tokens(args.max_tokens)  # before loading the model
    store = ResultStore(out / "results.json")
    model, tokenizer = load(args)
    tokens = load_tokens(tokenizer, args.text)
    sweeper = Sweeper(model, tokenizer, store, model_name=str(args.model), show_progress=not args.no_progress,
                      log=tqdm.write)
    records = sweeper.perplexity(tokens, methods, lengths, text=text_name(args.text), protocol=args.protocol,
                                 stride=args.stride, windows=args.windows, segment=args.segment,
                                 max_tokens=args.max_tokens)
    write_outputs(out, store.records, title="ropekit eval perplexity", command=command_line())
    print(perplexity_table(records))
    print(f"\nwrote {out}/results.json, results.csv, perplexity.png, report.md")
    return 0


def run_passkey(args) -> int:
    from tqdm.auto import tqdm

    from ropekit.eval.report import passkey_table, write_outputs
    from ropekit.eval.results import ResultStore
    from ropekit.eval.sweep import Sweeper, parse_float_list

    methods, lengths, out = setup(args)
    depths = parse_float_list(args.depths, "--depths")
    if args.trials < 1:
        raise ValueError(f"--trials must be >= 1, got {args.trials}")
    store = ResultStore(out / "results.json")
    model, tokenizer = load(args)
    sweeper = Sweeper(model, tokenizer, store, model_name=str(args.model), show_progress=not args.no_progress,
                      log=tqdm.write)
    records = sweeper.passkey(methods, lengths, depths, trials=args.trials, seed=args.seed)
    write_outputs(out, store.records, title="ropekit eval passkey", command=command_line())
    print(passkey_table(records))
    print(f"\nwrote {out}/results.json, results.csv, passkey.png, report.md")
    return 0

"""``ropekit demo``: the seed tutorial's lessons as runnable, checked claims.

Each demo prints a short explanation and the numbers behind its claims; the command exits 1 if
any claim fails, 0 otherwise.
"""

from __future__ import annotations

import argparse
import importlib
import time
from pathlib import Path

from ropekit.defaults import DEFAULT_MODEL

# subcommand -> (module under ropekit.demos, one-line help, takes a model)
DEMOS = {
    "permutation": ("permutation", "without position encoding, attention cannot see word order", True),
    "relative": ("relative", "RoPE scores depend only on m - n, and decay with distance", False),
    "kv-cache": ("kv_cache", "positions of each cached decoding step; what breaks if they restart", True),
    "extrapolation": ("extrapolation", "critical dimension, scaling methods, loss past the trained length",
                      True),
}


def add_parsers(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("demo", help="the tutorial's lessons as checked demos",
                            description="The seed tutorial's lessons as runnable, checked claims; "
                                        "exit 1 if a claim fails.")
    demos = parser.add_subparsers(dest="demo", required=True, metavar="DEMO")
    for name, (_, help_text, _) in [*DEMOS.items(), ("all", (None, "run every demo in turn", True))]:
        demo = demos.add_parser(name, help=help_text, description=help_text)
        demo.add_argument("--plot", type=Path, metavar="DIR", default=None, help="write PNG plots into DIR")
        demo.add_argument("--fast", action="store_true",
                          help="small sizes; skip the long-window real-model run (well under a minute)")
        demo.add_argument("--model", default=DEFAULT_MODEL, metavar=f"{DEFAULT_MODEL}|PATH",
                          help=f"the real model: {DEFAULT_MODEL} (default) or a .gguf file / HF folder")
        demo.add_argument("--no-model", action="store_true", help="skip every real-model part")
        demo.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    """Run one demo (or all); exit 0 if every claim held, 1 otherwise."""
    names = list(DEMOS) if args.demo == "all" else [args.demo]
    model = None if args.no_model else args.model
    if model is not None and not Path(model).exists():
        from ropekit.loading.default_model import is_model_name

        if not is_model_name(model):
            raise ValueError(f"--model {model!r}: not a file or folder, nor a default model name ({DEFAULT_MODEL})")
    failed = []
    for name in names:
        module_name, _, takes_model = DEMOS[name]
        module = importlib.import_module(f"ropekit.demos.{module_name}")
        started = time.perf_counter()
        print(f"\n######## ropekit demo {name}{' --fast' if args.fast else ''}")
        kwargs = {"model": model} if takes_model else {}
        result = module.run(fast=args.fast, plot_dir=args.plot, **kwargs)
        ok = sum(claim.passed for claim in result.claims)
        print(f"\n{name}: {ok}/{len(result.claims)} claims hold"
              + (f", {len(result.skipped)} part(s) skipped" if result.skipped else "")
              + f" ({time.perf_counter() - started:.1f} s)")
        if not result.passed:
            failed.append(name)
    if failed:
        print(f"FAILED: {', '.join(failed)}")
        return 1
    return 0

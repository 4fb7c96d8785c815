"""The ``ropekit`` command line.

Each feature module exposes ``add_parsers(subparsers)``; each subcommand sets ``func`` to a
handler ``(args) -> int``. Bad input (ValueError, FileNotFoundError) becomes a one-line
message on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

DESCRIPTION = ("ropekit: rotary position embeddings (RoPE) for LLaMA-family models, and running them past "
               "the context length they were trained on. Compare context-extension methods (YaRN, "
               "Self-Extend, ReRoPE, ...) on perplexity and passkey retrieval, generate text with any of "
               "them, and see why position encoding works (demos).")

# Feature modules, in the order their subcommands are listed in --help.
FEATURE_MODULES = ["compare", "eval", "generate", "convert", "demo"]


class UsageError(ValueError):
    """A bad command-line argument (exit code 2)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ropekit", description=DESCRIPTION,
                                     epilog="Run 'ropekit COMMAND --help' for a command's options.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in FEATURE_MODULES:
        try:
            module = importlib.import_module(f"ropekit.cli.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"ropekit.cli.{name}":
                raise
            continue
        module.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as err:
        print(f"ropekit {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (ropekit ... | head): stop quietly
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (the interpreter flushes stdout at exit)
        return 0


if __name__ == "__main__":
    sys.exit(main())

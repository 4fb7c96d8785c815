"""The ``ropekit`` command line.

Each feature module exposes ``add_parsers(subparsers)``; each subcommand sets ``func`` to a
handler ``(args) -> int``. Bad input (ValueError, FileNotFoundError) becomes a one-line
message on stderr and exit code 2, never a traceback. A run stopped by ``--time-budget`` with cells
left returns ``EXIT_TIME_BUDGET`` (3, see ``ropekit.cli.common``).
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading
import warnings

DESCRIPTION = ("ropekit: rotary position embeddings (RoPE) for LLaMA-family models, and running them past "
               "the context length they were trained on. Compare context-extension methods (YaRN, "
               "Self-Extend, ReRoPE, ...) on perplexity and passkey retrieval, generate text with any of "
               "them, and see why position encoding works (demos).")

# Feature modules, in the order their subcommands are listed in --help.
FEATURE_MODULES = ["compare", "eval", "generate", "convert", "tune", "demo"]


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


class Terminated(BaseException):
    """SIGTERM arrived: stop like Ctrl-C (finished cells are already stored), exit 143."""


def _terminated(signum, frame):
    raise Terminated


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _one_line(err: BaseException) -> str:
    """An error's message on one line (an OSError without its own message says what and where)."""
    text = str(err) or type(err).__name__
    if isinstance(err, OSError) and err.filename is not None and str(err.filename) not in text:
        text = f"{text}: {err.filename}"
    return " ".join(text.split())


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"ropekit: warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    warnings.formatwarning = _one_line_warning  # warnings on the command line are one line each
    previous = signal.signal(signal.SIGTERM, _terminated) if _main_thread() else None
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError) as err:  # bad input: a bad argument, file or output folder
        if isinstance(err, BrokenPipeError):  # the reader went away (ropekit ... | head): stop quietly
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (the interpreter flushes stdout at exit)
            return 0
        print(f"ropekit {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except MemoryError:
        print(f"ropekit {args.command}: error: out of memory (a smaller length, batch or --max-new-tokens may fit)",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("terminated", file=sys.stderr)
        return 143
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())

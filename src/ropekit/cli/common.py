"""Options every command shares, defined once: the model, threads, progress, the command line itself."""

from __future__ import annotations

import argparse
import shlex
import sys

from ropekit.defaults import DEFAULT_MODEL


def add_model(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"a .gguf file, an HF folder, or {DEFAULT_MODEL!r} (default: SmolLM2-135M-Instruct)")


MAX_THREADS = 1024


def add_threads(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def apply_threads(args: argparse.Namespace) -> None:
    """Set torch's CPU threads from ``--threads`` (ValueError below 1)."""
    if getattr(args, "threads", None) is None:
        return
    if not 1 <= args.threads <= MAX_THREADS:
        raise ValueError(f"--threads must be in [1, {MAX_THREADS}], got {args.threads}")
    import torch

    torch.set_num_threads(args.threads)


def add_progress(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress output (a bar with ETA on a terminal, a line every 10 s in a log)")


def command_line() -> str:
    """The command as typed (for the report's 'reproduce with' line)."""
    return "ropekit " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def add_runtime(parser: argparse.ArgumentParser, *, backend: bool = True) -> None:
    """``--backend``, ``--device``, ``--dtype``: what runs the model, where, in which precision."""
    if backend:
        parser.add_argument("--backend", choices=("ropekit", "transformers"), default="ropekit",
                            help="ropekit's engine (default) or the model in Hugging Face transformers, patched by "
                                 "ropekit.hf (needs the [hf] extra)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="weights and activations (angles and cos/sin stay float32)")


def check_runtime(args: argparse.Namespace) -> None:
    """Validate ``--device`` (and that transformers is installed for ``--backend transformers``) before loading."""
    from ropekit.loading import parse_device

    parse_device(args.device)
    if getattr(args, "backend", "ropekit") == "transformers":
        import importlib.util

        if importlib.util.find_spec("transformers") is None:
            raise ValueError("--backend transformers needs transformers: pip install 'ropekit[hf]'")


# Exit status of a run that stopped on --time-budget with cells left (0: everything finished; 2: bad input;
# 130/143: Ctrl-C/SIGTERM). Distinct from all of them so a script can tell "run the same command again"
# from "done" and from "failed".
EXIT_TIME_BUDGET = 3


def add_time_budget(parser: argparse.ArgumentParser, what: str = "cell") -> None:
    parser.add_argument("--time-budget", default=None, metavar="MINUTES",
                        help=f"stop after the {what} that crosses MINUTES of wall time (loading included), keep every "
                             f"finished record, print what is left and the command that resumes, exit "
                             f"{EXIT_TIME_BUDGET} (0 when everything finished); default: no limit")


def print_budget_stop(stop, budget, what: str = "cells", file=None) -> int:
    """Say on ``file`` (stderr) that ``stop`` (a ``ropekit.eval.budget.BudgetSpent``) ended the run of ``budget``
    (its ``TimeBudget``): what finished, every item left, and the command that resumes. Returns ``EXIT_TIME_BUDGET``."""
    file = sys.stderr if file is None else file
    print(f"\nstopped by --time-budget {budget.seconds / 60:g} after {stop.elapsed / 60:.1f} minutes: "
          f"{len(stop.finished)} {what} finished, {len(stop.left)} left:", file=file)
    for label in stop.left:
        print(f"  {label}", file=file)
    print("resume with the same command (finished ones are kept and skipped), from the same folder:", file=file)
    print(f"  {command_line()}", file=file)
    print(f"exit status {EXIT_TIME_BUDGET}: stopped by the time budget", file=file)
    return EXIT_TIME_BUDGET


def start_time_budget(args: argparse.Namespace, clock=None):
    """The ``TimeBudget`` of ``--time-budget`` starting now on ``clock`` (``time.monotonic`` by default), or None
    without the flag; ValueError (exit 2) for a value out of range, before anything is loaded."""
    import time

    from ropekit.eval.budget import TimeBudget, parse_time_budget

    minutes = parse_time_budget(getattr(args, "time_budget", None))
    return None if minutes is None else TimeBudget.from_now(minutes, time.monotonic if clock is None else clock)


def add_shard(parser: argparse.ArgumentParser) -> None:
    """``--shard K/N``: this process runs its share of the cells (see ``ropekit.eval.shard``)."""
    parser.add_argument("--shard", default=None, metavar="K/N",
                        help="run shard K of N (1-based) of the cells, balanced by estimated cost, into a shared --out "
                             "(default: RANK/WORLD_SIZE under torchrun or accelerate launch, else every cell); "
                             "Slurm: --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT")


def apply_shard(args: argparse.Namespace):
    """This process's ``Shard`` (``--shard``, else the launcher's variables; None: every cell), and ``--device cuda``
    made ``cuda:LOCAL_RANK`` under a launcher. ValueError for a bad ``--shard`` or rank."""
    from ropekit.eval.shard import resolve_shard, shard_device

    shard = resolve_shard(getattr(args, "shard", None))
    args.device = shard_device(args.device, shard)
    if shard is not None:
        print(f"shard {shard}: running its share of the cells", file=sys.stderr)
    return shard


def check_extras(args: argparse.Namespace) -> bool:
    """Before the first cell: whether the figures can be drawn. A missing extra never stops a run: without
    matplotlib the figures are skipped, without tqdm progress is plain lines; each says so in one warning line."""
    import warnings

    from ropekit.eval.report import can_draw
    from ropekit.progress import can_show_bar

    figures = can_draw()
    if not figures:
        warnings.warn("matplotlib is not installed: no figures (records, results.csv and report.md are written); "
                      "pip install 'ropekit[lab]' to draw them", stacklevel=2)
    if not getattr(args, "no_progress", True) and sys.stderr.isatty() and not can_show_bar():
        warnings.warn("tqdm is not installed: progress as plain lines; pip install 'ropekit[lab]' for a bar",
                      stacklevel=2)
    return figures

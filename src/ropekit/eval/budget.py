"""A wall-clock budget for a run of cells (``--time-budget MINUTES``): stop after the cell that crosses it.

A sweep (``ropekit eval``) or a search (``ropekit tune``) given a ``TimeBudget`` asks ``budget_spent``
before it starts each cell that is not already in its records (a stored cell costs nothing and is
always taken). Once the budget is spent no further cell starts: the cell running when the budget ran
out is finished and stored, the cells not run are listed, and the run ends with ``BudgetSpent``.
Rerunning the same command resumes from the records (``ropekit.eval.results``), so a long grid runs
as slices of about the budget each and ends with exactly the records of one uninterrupted run.

- A run lasts up to the budget plus one cell (plus loading and writing the report): to keep every
  command under T minutes, give ``T`` minus the longest cell.
- Every run finishes at least one cell before it may stop, so each slice makes progress even when
  loading alone took the budget.
- The clock is an argument (``time.monotonic`` by default; tests pass a fake one).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

MAX_TIME_BUDGET_MINUTES = 1_000_000  # about 1.9 years: any real budget; refuses inf and overflowing values


def parse_time_budget(text: str | None) -> float | None:
    """Minutes of ``--time-budget`` (``"45"``, ``"2.5"``, ``"1e1"``), or None when the flag is not given.

    ValueError (one line naming the flag and its range) unless the value is a number in
    ``(0, MAX_TIME_BUDGET_MINUTES]``: zero, negative, nan, inf and non-numeric text are refused."""
    if text is None:
        return None
    try:
        minutes = float(str(text).strip().replace("_", ""))
    except ValueError:
        minutes = math.nan
    if not (math.isfinite(minutes) and 0 < minutes <= MAX_TIME_BUDGET_MINUTES):
        raise ValueError(f"--time-budget must be minutes in (0, {MAX_TIME_BUDGET_MINUTES}], got {text!r}")
    return minutes


@dataclass(frozen=True)
class TimeBudget:
    """``seconds`` of wall time from ``start``, both read on ``clock`` (seconds, never going back)."""

    seconds: float
    start: float
    clock: Callable[[], float] = time.monotonic

    @classmethod
    def from_now(cls, minutes: float, clock: Callable[[], float] = time.monotonic) -> TimeBudget:
        """A budget of ``minutes`` that starts at the clock's current reading."""
        return cls(seconds=float(minutes) * 60.0, start=clock(), clock=clock)

    def elapsed(self) -> float:
        """Seconds since ``start``."""
        return self.clock() - self.start


def budget_spent(budget: TimeBudget | None, cells_run: int) -> bool:
    """True when the next unfinished cell must not start: a budget is given, this run has already finished
    ``cells_run >= 1`` cells, and the budget's time is spent. Reads the clock only in that case."""
    return budget is not None and cells_run > 0 and budget.elapsed() >= budget.seconds


class BudgetSpent(Exception):
    """The run stopped on its time budget. ``left``: one label per planned cell not run, in plan order;
    ``finished``: the records of the planned cells that are done (stored before or by this run);
    ``elapsed``: seconds on the budget's clock when the run stopped."""

    def __init__(self, left: list[str], finished: list[dict[str, Any]], elapsed: float):
        super().__init__(f"time budget spent after {elapsed / 60:.1f} minutes: {len(finished)} cells finished, "
                         f"{len(left)} left")
        self.left, self.finished, self.elapsed = list(left), list(finished), float(elapsed)

"""Progress of long steps (evaluation windows layer by layer, passkey prompts, downloads).

``Progress(total, desc)`` shows a tqdm bar with an ETA when stderr is a terminal and tqdm is
installed; otherwise (a log file, CI) it writes one plain line per update, at most one every
``interval`` seconds, plus a last line when it closes; ``enabled=False`` (``--no-progress``)
writes nothing.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from typing import TextIO


def can_show_bar() -> bool:
    """Whether a bar can be drawn: tqdm (the ``lab`` and ``models`` extras) is installed; without it progress is
    plain lines."""
    return importlib.util.find_spec("tqdm") is not None


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


class Progress:
    """``with Progress(total, desc) as p: ... p.update(n)``; ``p.write(line)`` prints without breaking a bar."""

    def __init__(self, total: int, desc: str, *, enabled: bool = True, unit: str = "steps", interval: float = 10.0,
                 stream: TextIO | None = None):
        self.total, self.desc, self.unit, self.interval = max(int(total), 0), desc, unit, interval
        self.stream = stream or sys.stderr
        self.enabled, self.done = enabled, 0
        self.start = self._last_line = time.perf_counter()
        self._bar = None
        if enabled and getattr(self.stream, "isatty", lambda: False)():
            try:
                from tqdm.auto import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self._bar = tqdm(total=self.total, desc=desc, unit=unit, file=self.stream, leave=False,
                                 dynamic_ncols=True)

    def set_description(self, desc: str) -> None:
        self.desc = desc
        if self._bar is not None:
            self._bar.set_description(desc)

    def add_total(self, n: int) -> None:
        """``n`` more steps than planned (a step that turned out to need an extra pass)."""
        self.total += max(int(n), 0)
        if self._bar is not None:
            self._bar.total = self.total
            self._bar.refresh()

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.enabled and time.perf_counter() - self._last_line >= self.interval:
            self._line()

    def _line(self) -> None:
        elapsed = time.perf_counter() - self.start
        text = f"{self.desc}: {self.done}/{self.total} {self.unit}"
        if self.total:
            text += f" ({100 * self.done / self.total:.0f}%)"
        text += f", {_clock(elapsed)} elapsed"
        if 0 < self.done < self.total:
            text += f", ETA {_clock(elapsed * (self.total - self.done) / self.done)}"
        print(text, file=self.stream, flush=True)
        self._last_line = time.perf_counter()

    def write(self, line: str) -> None:
        """A line of output (results as they come) that does not break the bar."""
        if self._bar is not None:
            self._bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.enabled and self.done and time.perf_counter() - self.start >= self.interval:
            self._line()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

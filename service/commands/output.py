"""How commands print: aligned tables for people, one JSON document for scripts, and a progress
line that redraws itself on a terminal but prints plain lines into a pipe or a log."""

from __future__ import annotations

import shutil
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, TextIO

import orjson


def print_json(value: Any, stream: TextIO | None = None) -> None:
    """Indented and key-sorted, so that output is stable to diff and easy to `jq`."""
    out = stream or sys.stdout
    out.write(orjson.dumps(value, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode())
    out.write("\n")


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table: left-aligned text, right-aligned numbers, two spaces between columns."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, value in enumerate(row):
            widths[i] = max(widths[i], len(value))
    numeric = [all(_is_number(row[i]) for row in rows) and bool(rows) for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric, strict=True)]
        return "  ".join(parts).rstrip()

    return "\n".join([line(list(headers)), *(line(row) for row in cells)])


def _is_number(value: Any) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool)) or value is None


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """`1 label`, `2 labels`, `0 labels`: a count with its noun in the number it takes, so that
    messages read as written English whatever the count (`nouns` for an irregular plural)."""
    return f"{count} {noun if count == 1 else nouns or noun + 's'}"


def when(timestamp: Any) -> str:
    """A Unix timestamp as UTC date and time (the tables say "(UTC)"), or "-" when there is none."""
    if not isinstance(timestamp, int | float):
        return "-"
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%S")


def short(text: str, width: int = 60) -> str:
    """One line of at most `width` characters, for showing inputs in a table."""
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


class Progress:
    """Progress of a long operation. On a terminal: one line redrawn in place, with a bar.
    Elsewhere: a plain line each time the message changes, so logs stay readable."""

    #: How many of the newest step changes the ETA's rate is measured over: recent enough to
    #: follow a machine that got busier, long enough not to jump with each poll.
    RATE_WINDOW = 8

    def __init__(self, stream: TextIO | None = None, tty: bool | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self._last = ""
        self._drawn = False
        self._clock = clock
        self._started = clock()
        #: (time, done) each time `done` moved, for the rate of the steps themselves.
        self._marks: deque[tuple[float, int]] = deque(maxlen=self.RATE_WINDOW + 1)

    def update(self, message: str, done: int | None = None, total: int | None = None) -> None:
        if done is not None and (not self._marks or done != self._marks[-1][1]):
            if self._marks and done < self._marks[-1][1]:
                self._marks.clear()  # counting again (a retried job, another total)
            self._marks.append((self._clock(), done))
        if self.tty:
            bar = _bar(done, total) if total else ""
            text = f"{bar}{message}  {self._timing(done, total)}"
            width = shutil.get_terminal_size((100, 20)).columns - 1
            self.stream.write("\r" + text[:width].ljust(min(width, max(len(self._last), len(text)))))
            self.stream.flush()
            self._last, self._drawn = text, True
        elif message != self._last:
            self.stream.write(message + "\n")
            self.stream.flush()
            self._last = message

    def _timing(self, done: int | None, total: int | None) -> str:
        """Elapsed time, and the time left at the rate of the recent steps (a terminal only: in a
        log each line would differ, and one line per change is the point there).

        The rate is measured between steps, never from the start: the minutes spent queued,
        loading, tokenising and probing are not steps, and dividing them among the first steps
        gave a first ETA three times too long (1:07:16 for a job of 23:49). No ETA until two
        steps have been seen."""
        now = self._clock()
        text = f"{clock_text(now - self._started)} elapsed"
        if done and total and 0 < done < total and len(self._marks) >= 2:
            (t0, d0), (t1, d1) = self._marks[0], self._marks[-1]
            if d1 > d0 and t1 > t0:
                left = (t1 - t0) / (d1 - d0) * (total - d1) - (now - t1)
                text += f", ETA {clock_text(max(0.0, left))}"
        return text

    def close(self) -> None:
        """End the redrawn line, so that what follows starts on a fresh one."""
        if self.tty and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False


def clock_text(seconds: float) -> str:
    """m:ss, or h:mm:ss from an hour on."""
    whole = max(0, round(seconds))
    hours, rest = divmod(whole, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def _bar(done: int | None, total: int, width: int = 16) -> str:
    """Narrow, without a percentage: the message beside it says `step n/N`, and the whole line
    should fit an 80-column terminal."""
    fraction = min(1.0, max(0.0, (done or 0) / total))
    filled = round(fraction * width)
    return f"[{'#' * filled}{'.' * (width - filled)}] "

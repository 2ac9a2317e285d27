"""Progress a person can watch: on a terminal, one line per piece of work (a layer packed, an archive written) on
stderr, redrawn in place at most five times a second with bytes done of total, rate and time left, and a closing
line with the size, time and rate. Nothing at all when stderr is not a terminal (logs, cron, systemd)."""

import sys
import time
from dataclasses import dataclass

MIB = 1 << 20
_INTERVAL = 0.2  # seconds between two redraws of one line
_CLEAR = "\x1b[K"  # erase to the end of the line (what is left of a longer earlier line)


@dataclass
class _Line:
    label: str
    verb: str
    started: float
    done: int = 0
    total: int = 0
    drawn: float = 0.0


_lines: dict[str, _Line] = {}


def enabled() -> bool:
    """Whether stderr is a terminal."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced by an object without isatty, or closed
        return False


def update(key: str, label: str, done: int, total: int, *, verb: str = "packed") -> None:
    """done of total bytes of the work key (shown as label) are done; redrawn if the last draw is old enough."""
    if not enabled():
        return
    now = time.monotonic()
    line = _lines.setdefault(key, _Line(label, verb, now))
    line.done, line.total = done, max(total, done)
    if now - line.drawn < _INTERVAL:
        return
    line.drawn = now
    rate = done / max(now - line.started, 1e-3)
    left = _duration((line.total - done) / rate) if rate > 0 else "-:--"  # nothing done yet: no rate to go by
    _draw(f"{label}: {done / MIB:.1f} of {line.total / MIB:.1f} MiB {verb}, {rate / MIB:.1f} MiB/s, {left} left")


def finish(key: str) -> None:
    """The work key is done: its closing line (only for work that drew one)."""
    line = _lines.pop(key, None)
    if line is None or not enabled():
        return
    elapsed = max(time.monotonic() - line.started, 1e-3)
    size = line.done / MIB
    _draw(f"{line.label}: {size:.1f} MiB {line.verb} in {elapsed:.1f} s ({size / elapsed:.1f} MiB/s)", end="\n")


def _duration(seconds: float) -> str:
    whole = int(seconds + 0.5)
    return (
        f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"
        if whole >= 3600
        else f"{whole // 60}:{whole % 60:02d}"
    )


def _draw(text: str, end: str = "") -> None:
    try:
        sys.stderr.write("\r" + text + _CLEAR + end)
        sys.stderr.flush()
    except (OSError, ValueError):  # the terminal went away: the work goes on without it
        pass

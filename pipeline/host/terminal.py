"""Progress a person can watch: on a terminal, one line per piece of work (a layer packed, an archive written) on
stderr, redrawn in place at most five times a second with bytes done of total, rate and time left, and a closing
line with the size, time and rate. Nothing at all when stderr is not a terminal (logs, cron, systemd).

luigi's --workers N runs tasks in N processes that share the terminal: one of them at a time redraws the line in
place, the one holding an exclusive flock on its own opening of the terminal, taken when it has work to show and
given up when it has none left; the others' lines wait for it (a closing line is written by whichever process
finishes the work, on a line of its own, and the line in place is redrawn under it)."""

import fcntl
import os
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
_held: int | None = None  # this process's opening of the terminal, flocked while it draws the line in place


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
    line.drawn = now  # a try as well as a draw: a process that another one keeps off the line tries 5 times a second
    if not _hold():
        return
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
    if not _lines:
        _let_go()


def _hold() -> bool:
    """Whether this process may draw the line in place: it holds the terminal's flock, or takes it now."""
    global _held
    if _held is None:
        try:
            fd = os.open(f"/proc/self/fd/{sys.stderr.fileno()}", os.O_RDONLY | os.O_NOCTTY | os.O_CLOEXEC)
        except (OSError, ValueError):  # no way to share the terminal politely: draw anyway, as with one worker
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # another process draws now
            os.close(fd)
            return False
        _held = fd
    return True


def _let_go() -> None:
    global _held
    if _held is not None:
        os.close(_held)  # the flock goes with the last descriptor of this opening
        _held = None


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

"""Facts about processes on this host."""

import os
from pathlib import Path

_PROC = Path("/proc")


def is_alive(pid: int) -> bool:
    """Whether a process with this pid exists (it may belong to another user) and has not exited: a zombie (killed,
    not yet reaped: an orphaned luigi worker waits for init to reap it) can no longer act, so it is not alive."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return state(pid) not in (b"Z", b"X")


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks after boot (/proc/<pid>/stat field 22), None if it is gone."""
    fields = _stat_fields(pid)
    return None if fields is None else int(fields[19])


def state(pid: int) -> bytes | None:
    """The process's state letter (/proc/<pid>/stat field 3: R, S, D, T, Z (zombie), X (dead), ...), None if it is
    gone."""
    fields = _stat_fields(pid)
    return None if fields is None else fields[0]


def _stat_fields(pid: int) -> list[bytes] | None:
    """/proc/<pid>/stat from field 3 on, None if the process is gone."""
    try:
        stat = (_PROC / str(pid) / "stat").read_bytes()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses, so count fields after its closing one.
    return stat.rpartition(b")")[2].split()

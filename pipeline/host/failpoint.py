"""Named points where crash and concurrency tests stop or kill a run, armed only by PIPELINE_FAILPOINTS.

`PIPELINE_FAILPOINTS=atomic:before-rename@3` SIGKILLs the run the third time that point is reached;
`pack:started@1:stop` SIGSTOPs it there instead. Several points may be listed, comma-separated. Unset (always,
outside tests), reached() is one dictionary lookup.

A run is the luigi process and the task processes its workers fork (luigi's --workers N): the hits are counted
across all of them, and a hit kills or stops all of them at once, as a crash or a stopped machine would. For that,
an armed process leads a process group of its own (set up at import, before luigi forks anything), and a test
resumes a stopped run with `os.killpg(pid, signal.SIGCONT)`.
"""

import os
import signal
from typing import Any

_ARMED: dict[str, tuple[int, signal.Signals]] = {}
for _item in filter(None, os.environ.get("PIPELINE_FAILPOINTS", "").split(",")):
    _name, _, _rest = _item.partition("@")
    _count, _, _action = _rest.partition(":")
    _ARMED[_name.strip()] = (int(_count or 1), signal.SIGSTOP if _action == "stop" else signal.SIGKILL)

_RUN = os.getpid()  # forked task processes inherit the value: the run's luigi process
_HITS: dict[str, Any] = {}  # per armed point, a counter in memory shared with the forked task processes
if _ARMED:
    import multiprocessing

    if os.getpgid(0) != _RUN:
        os.setpgid(0, 0)
    _HITS = {name: multiprocessing.Value("q", 0) for name in _ARMED}


def reached(name: str) -> None:
    """Stop or kill the run if name is armed and has now been reached the armed number of times."""
    if name in _ARMED:
        count, action = _ARMED[name]
        counter = _HITS[name]
        with counter.get_lock():
            counter.value += 1
            hit = counter.value
        if hit == count:
            os.killpg(_RUN, action)

"""Named points where crash and concurrency tests stop or kill the process, armed only by PIPELINE_FAILPOINTS.

`PIPELINE_FAILPOINTS=atomic:before-rename@3` SIGKILLs the process the third time that point is reached;
`pack:started@1:stop` SIGSTOPs it there instead (a test resumes it with SIGCONT). Several points may be listed,
comma-separated. Unset (always, outside tests), reached() is one dictionary lookup.
"""

import os
import signal
from collections import Counter

_ARMED: dict[str, tuple[int, signal.Signals]] = {}
for _item in filter(None, os.environ.get("PIPELINE_FAILPOINTS", "").split(",")):
    _name, _, _rest = _item.partition("@")
    _count, _, _action = _rest.partition(":")
    _ARMED[_name.strip()] = (int(_count or 1), signal.SIGSTOP if _action == "stop" else signal.SIGKILL)
_hits: Counter[str] = Counter()


def reached(name: str) -> None:
    """Stop or kill this process if name is armed and has now been reached the armed number of times."""
    if name in _ARMED:
        _hits[name] += 1
        count, action = _ARMED[name]
        if _hits[name] == count:
            os.kill(os.getpid(), action)

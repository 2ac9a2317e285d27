"""Named points where crash tests SIGKILL the process, armed only by PIPELINE_FAILPOINTS.

`PIPELINE_FAILPOINTS=atomic:before-rename@3` kills the process the third time that point is reached; several
points may be listed, comma-separated. Unset (always, outside tests), reached() is a dictionary lookup.
"""

import os
import signal
from collections import Counter

_ARMED: dict[str, int] = {}
for _item in filter(None, os.environ.get("PIPELINE_FAILPOINTS", "").split(",")):
    _name, _, _count = _item.partition("@")
    _ARMED[_name.strip()] = int(_count or 1)
_hits: Counter[str] = Counter()


def reached(name: str) -> None:
    """SIGKILL this process if name is armed and has now been reached the armed number of times."""
    if name in _ARMED:
        _hits[name] += 1
        if _hits[name] == _ARMED[name]:
            os.kill(os.getpid(), signal.SIGKILL)

"""Commits containers' overlay layers into image archives that docker, podman, skopeo and umoci load.

The plain core (every module but pipeline.tasks and pipeline.cli) never imports luigi. The luigi tasks are
registered when luigi is already loaded as this package is imported, as `luigi --module pipeline CommitImage ...`
does; elsewhere `import pipeline.tasks` registers them, and `pipeline.CommitImage` and the like load them on use.
"""

import sys
from typing import Any

_TASKS = ("CommitImage", "PushImage", "SnapshotAll", "WriteImageArchive")
__all__ = list(_TASKS)

if "luigi" in sys.modules:
    import pipeline.tasks  # noqa: F401 - registers the tasks with luigi


def __getattr__(name: str) -> Any:
    if name in _TASKS:
        import pipeline.tasks

        return getattr(pipeline.tasks, name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")

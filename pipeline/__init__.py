"""Commits containers' overlay layers into image archives that docker, podman, skopeo and umoci load.

`luigi --module pipeline CommitImage ...` imports this package, so it registers the tasks; the plain core
(every module but pipeline.tasks) never imports luigi.
"""

from pipeline.tasks import CommitImage, SnapshotAll, WriteImageArchive

__all__ = ["CommitImage", "SnapshotAll", "WriteImageArchive"]

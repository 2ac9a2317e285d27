"""The luigi shell: settings sections and tasks, each a thin call into the plain core."""

from pipeline.tasks.image import (
    CommitImage,
    PackContainerLayer,
    PackImageLayer,
    WriteImageArchive,
    WriteImageConfig,
    WriteManifest,
    WriteRepositories,
)
from pipeline.tasks.settings import DurableTarget
from pipeline.tasks.snapshot import SnapshotAll, SnapshotContainer

__all__ = [
    "CommitImage",
    "DurableTarget",
    "PackContainerLayer",
    "PackImageLayer",
    "SnapshotAll",
    "SnapshotContainer",
    "WriteImageArchive",
    "WriteImageConfig",
    "WriteManifest",
    "WriteRepositories",
]

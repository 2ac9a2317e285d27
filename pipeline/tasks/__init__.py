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
from pipeline.tasks.push import PushImage
from pipeline.tasks.settings import DurableTarget
from pipeline.tasks.snapshot import ReuseSnapshots, SnapshotAll, SnapshotContainer

__all__ = [
    "CommitImage",
    "DurableTarget",
    "PackContainerLayer",
    "PackImageLayer",
    "PushImage",
    "ReuseSnapshots",
    "SnapshotAll",
    "SnapshotContainer",
    "WriteImageArchive",
    "WriteImageConfig",
    "WriteManifest",
    "WriteRepositories",
]

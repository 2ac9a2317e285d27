"""The container engines whose storage the pipeline reads, by name."""

from collections.abc import Callable
from pathlib import Path

from pipeline.container import Storage
from pipeline.engines.docker import DockerStorage
from pipeline.engines.podman import PodmanStorage
from pipeline.engines.rocker import RockerStorage
from pipeline.errors import StorageError

# One line per engine: its name in [storage] engine, and its reader.
ENGINES: dict[str, Callable[[Path], Storage]] = {
    "rocker": RockerStorage,
    "podman": PodmanStorage,
    "docker": DockerStorage,
}


def open_storage(engine: str, root: Path) -> Storage:
    """The reader for engine's storage at root."""
    try:
        reader = ENGINES[engine]
    except KeyError:
        raise StorageError(f"unknown storage engine {engine!r}; use one of: {', '.join(sorted(ENGINES))}") from None
    return reader(root)

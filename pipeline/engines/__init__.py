"""The container engines whose storage the pipeline reads: the shared interface and one reader per engine."""

from collections.abc import Callable
from pathlib import Path

from pipeline.engines.container import Storage
from pipeline.engines.docker import DockerStorage
from pipeline.engines.podman import PodmanStorage
from pipeline.engines.rocker import RockerStorage
from pipeline.errors import StorageError

# One line per engine: its name in [storage] engine, its reader, and where its storage lives by default.
ENGINES: dict[str, tuple[Callable[[Path], Storage], str]] = {
    "rocker": (RockerStorage, "/var/lib/rocker"),
    "podman": (PodmanStorage, "/var/lib/containers/storage"),
    "docker": (DockerStorage, "/var/lib/docker"),
}


def open_storage(engine: str, root: Path) -> Storage:
    """The reader for engine's storage at root."""
    return _entry(engine)[0](root)


def default_root(engine: str) -> str:
    """Where engine keeps its storage unless [storage] root says otherwise."""
    return _entry(engine)[1]


def _entry(engine: str) -> tuple[Callable[[Path], Storage], str]:
    try:
        return ENGINES[engine]
    except KeyError:
        raise StorageError(f"unknown storage engine {engine!r}; use one of: {', '.join(sorted(ENGINES))}") from None

"""luigi.cfg sections ([storage], [commit], [snapshot]) and the durable file target every task writes."""

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import luigi

from pipeline.engines import default_root, open_storage
from pipeline.engines.container import Storage
from pipeline.host.atomic import atomic_path


class storage(luigi.Config):  # noqa: N801 - the class name is the luigi.cfg section [storage]
    engine: str = luigi.Parameter(default="rocker", description="container engine whose storage is read")
    root: str = luigi.Parameter(
        default="",
        description="root of the engine's storage; default the engine's own (/var/lib/rocker,"
        " /var/lib/containers/storage, /var/lib/docker)",
    )

    def storage_root(self) -> str:
        """The configured root, or the engine's default, as an absolute path."""
        return os.path.abspath(self.root or default_root(self.engine))


class commit(luigi.Config):  # noqa: N801 - the class name is the luigi.cfg section [commit]
    output_dir: str = luigi.Parameter(default="images", description="where archives go when --output is not given")
    cache_dir: str = luigi.Parameter(default=".cache/pipeline", description="layer cache and per-commit files")
    format: str = luigi.ChoiceParameter(
        choices=("both", "docker", "oci", "oci-dir"),
        default="both",
        description="both: docker-archive and OCI layout in one tar (docker save since Engine 25); oci-dir: a"
        " layout directory whose layers are hardlinks into the cache",
    )


class HostTask(luigi.Task):
    """A task whose inputs and outputs are this host's files. The host is part of the task id, so one luigid
    serving many hosts never takes one host's finished task for another's (their paths may well be equal)."""

    host: str = luigi.Parameter(default=socket.gethostname(), description="the host whose files this task uses")


class StorageTask(HostTask):
    """Parameters of every task that reads a container storage; all absolute, so task ids do not depend on the
    cwd."""

    engine: str = luigi.Parameter()
    storage_root: str = luigi.Parameter()
    cache_dir: str = luigi.Parameter()
    clamp_mtime: int | None = luigi.OptionalIntParameter(default=None)
    # How a layer is read, not what is produced: it leaves task ids (and so targets) unchanged.
    pause: bool = luigi.BoolParameter(default=True, significant=False, parsing=luigi.BoolParameter.EXPLICIT_PARSING)

    def open_storage(self) -> Storage:
        return open_storage(self.engine, Path(self.storage_root))


class DurableTarget(luigi.LocalTarget):
    """A LocalTarget whose temporary_path() also fsyncs and removes the temporary file on failure."""

    @contextmanager
    def temporary_path(self) -> Iterator[str]:
        with atomic_path(Path(self.path)) as temp:
            yield str(temp)


class schedule(luigi.Config):  # noqa: N801 - flags --schedule-*; values read from the [snapshot] section
    """The [snapshot] section: how often snapshots are taken and how long they are kept. The class cannot be
    named `snapshot`: its --snapshot-* flags would make SnapshotAll's --snapshot an ambiguous abbreviation to
    luigi's first argument pass."""

    period_minutes: int = luigi.IntParameter(
        default=60,
        config_path={"section": "snapshot", "name": "period_minutes"},
        description="snapshot stamps are truncated to this period: runs within one period are no-ops",
    )
    keep: int = luigi.IntParameter(
        default=0,
        config_path={"section": "snapshot", "name": "keep"},
        description="snapshots kept per container (0 keeps all)",
    )
    gc_grace_minutes: int = luigi.IntParameter(
        default=60,
        config_path={"section": "snapshot", "name": "gc_grace_minutes"},
        description="cache entries younger than this are never garbage-collected (commits in flight)",
    )


class RepeatableParameter(luigi.ListParameter):
    """A list parameter given by repeating its flag (`--change 'ENV A=1' --change 'EXPOSE 80'`), as docker's
    flags are; a JSON list (`--change '["ENV A=1"]'`) and config values still work."""

    def _parser_kwargs(self, *args: Any, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]  # as BoolParameter does
        parser_kwargs: dict[str, Any] = super()._parser_kwargs(*args, **kwargs)
        parser_kwargs["action"] = "append"
        return parser_kwargs

    def parse(self, x: Any) -> Any:
        if isinstance(x, list):  # repeated flags: each one is an item, not JSON
            return tuple(x)
        return super().parse(x)

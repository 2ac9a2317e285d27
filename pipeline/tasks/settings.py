"""luigi.cfg sections ([storage], [commit], [snapshot]) and the durable file target every task writes."""

import hashlib
import json
import logging
import os
import re
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import luigi
from luigi.parameter import ParameterVisibility

from pipeline.engines import default_root, open_storage
from pipeline.engines.container import Storage
from pipeline.errors import PipelineError
from pipeline.host.atomic import atomic_path
from pipeline.plan import FORMATS
from pipeline.snapshots.incremental import DEFAULT_FULL_EVERY

SNAPSHOT_FORMATS = ("store", *FORMATS)

log = logging.getLogger(__name__)


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


HIDDEN = ParameterVisibility.HIDDEN


class HostTask(luigi.Task):
    """A task whose inputs and outputs are this host's files. Each host runs its own luigid (README, "Scheduling");
    the host is still part of the task id, so a luigid that did see two hosts' tasks (their paths may well be
    equal) would never take one host's finished task for another's.

    Ids lead with what a person looks for (label(): the container's name, the snapshot's stamp) and hash every
    significant parameter, hidden ones too: luigi's own ids hash only the public ones and lead with the first
    three alphabetically (a cache path, a 64-hex key), and hidden parameters are what keeps luigid's task list
    readable. A failure reaches luigid (and its web UI) as the one-line error, not a traceback."""

    host: str = luigi.Parameter(
        default=socket.gethostname(), visibility=HIDDEN, description="the host whose files this task uses"
    )

    # A base no task is made of (this one, StorageTask, the bases in tasks/image.py) says _abstract = True and stays
    # out of luigi's registry: luigi adds every registered class's parameters to its command line parser (as
    # --Family-param), and builds that parser nine times per run. Measured: 360 flags -> 303, the nine builds
    # 180 -> 150 ms of a small commit's ~0.8 s.
    _abstract = True
    _visible_in_registry = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._visible_in_registry = not cls.__dict__.get("_abstract", False)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        params = self.to_str_params(only_significant=True)
        digest = hashlib.sha256(json.dumps(params, separators=(",", ":"), sort_keys=True).encode()).hexdigest()
        label = re.sub(r"[^A-Za-z0-9_]", "_", self.label())[:48].strip("_")
        family = self.get_task_family()
        self.task_id = f"{family}_{label}_{digest[:10]}" if label else f"{family}_{digest[:10]}"
        self._Task__hash = hash(self.task_id)  # what luigi.Task.__hash__ returns, set from the old id

    def label(self) -> str:
        """What this task is about, for its id and luigid's lists."""
        return ""

    def on_failure(self, exception: BaseException) -> str:
        log.debug("%s failed", self.task_id, exc_info=exception)
        if isinstance(exception, PipelineError):
            return f"ERROR: {exception}"
        return super().on_failure(exception)  # type: ignore[no-any-return]


class StorageTask(HostTask):
    """Parameters of every task that reads a container storage; all absolute, so task ids do not depend on the
    cwd."""

    _abstract = True

    engine: str = luigi.Parameter(visibility=HIDDEN)
    storage_root: str = luigi.Parameter(visibility=HIDDEN)
    cache_dir: str = luigi.Parameter(visibility=HIDDEN)
    clamp_mtime: int | None = luigi.OptionalIntParameter(default=None, visibility=HIDDEN)
    # How a layer is read, not what is produced: it leaves task ids (and so targets) unchanged.
    pause: bool = luigi.BoolParameter(
        default=True, significant=False, parsing=luigi.BoolParameter.EXPLICIT_PARSING, visibility=HIDDEN
    )

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
    format: str = luigi.ChoiceParameter(
        choices=SNAPSHOT_FORMATS,
        default="store",
        config_path={"section": "snapshot", "name": "format"},
        description="store: every snapshot a reference in one shared OCI layout (<output_dir>/store), changed"
        " containers as a delta layer on their previous snapshot; or a standalone archive per snapshot",
    )
    full_every: int = luigi.IntParameter(
        default=DEFAULT_FULL_EVERY,
        config_path={"section": "snapshot", "name": "full_every"},
        description="delta layers on one full container layer before a snapshot packs it whole again",
    )
    metrics_file: str = luigi.Parameter(
        default="",
        config_path={"section": "snapshot", "name": "metrics_file"},
        description="Prometheus textfile metrics of each run; default <output_dir>/catalog/pipeline.prom",
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

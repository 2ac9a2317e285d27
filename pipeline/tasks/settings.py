"""luigi.cfg sections ([storage], [commit], [snapshot]) and the durable file target every task writes."""

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import luigi

from pipeline.atomic import atomic_path


class storage(luigi.Config):  # noqa: N801 - the class name is the luigi.cfg section [storage]
    engine: str = luigi.Parameter(default="rocker", description="container engine whose storage is read")
    root: str = luigi.Parameter(default="/var/lib/rocker", description="root of the engine's storage")


class commit(luigi.Config):  # noqa: N801 - the class name is the luigi.cfg section [commit]
    output_dir: str = luigi.Parameter(default="images", description="where archives go when --output is not given")
    cache_dir: str = luigi.Parameter(default=".cache/pipeline", description="layer cache and per-commit files")


class DurableTarget(luigi.LocalTarget):
    """A LocalTarget whose temporary_path() also fsyncs and removes the temporary file on failure."""

    @contextmanager
    def temporary_path(self) -> Iterator[str]:
        with atomic_path(Path(self.path)) as temp:
            yield str(temp)

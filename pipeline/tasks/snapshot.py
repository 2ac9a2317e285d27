"""Scheduled batch snapshots: SnapshotAll requires one SnapshotContainer per selected container.

SnapshotAll ─> SnapshotContainer* ─(only if the container changed)─> WriteImageArchive (tasks/image.py)
"""

import hashlib
import os
import time
from collections.abc import Generator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import luigi

from pipeline import catalog, retention
from pipeline import commit as commits
from pipeline import snapshot as snapshots
from pipeline.atomic import write_bytes_atomic
from pipeline.catalog import SnapshotRecord
from pipeline.engines import open_storage
from pipeline.tasks.image import WriteImageArchive
from pipeline.tasks.settings import DurableTarget, HostTask, StorageTask, batch, commit, storage

log = luigi.task.logger


class SnapshotParameter(luigi.DateMinuteParameter):
    """A snapshot time (UTC), truncated to [snapshot] period_minutes so every run in one period is the same."""

    def normalize(self, x: Any) -> Any:
        value = super().normalize(x)
        if value is None:
            return None
        period = max(1, batch().period_minutes) * 60
        seconds = int(value.replace(tzinfo=UTC).timestamp())
        return datetime.fromtimestamp(seconds - seconds % period, UTC).replace(tzinfo=None)


def _settings() -> dict[str, Any]:
    """Parameters every snapshot task passes down, absolute so task ids do not depend on the cwd."""
    return {
        "engine": storage().engine,
        "storage_root": storage().storage_root(),
        "cache_dir": os.path.abspath(commit().cache_dir),
        "output_dir": os.path.abspath(commit().output_dir),
        "clamp_mtime": commits.source_date_epoch(),
    }


class SnapshotContainer(StorageTask):
    """One container's snapshot; its target is the catalog record. Unchanged containers reuse the last archive."""

    container_id: str = luigi.Parameter()
    stamp: str = luigi.Parameter()
    output_dir: str = luigi.Parameter()
    format: str = luigi.ChoiceParameter(choices=commits.FORMATS, default="both")

    def output(self) -> DurableTarget:
        return DurableTarget(str(catalog.record_path(Path(self.output_dir), self.container_id, self.stamp)))

    def run(self) -> Generator[luigi.Task, None, None]:
        started = self._started()
        container = self.open_storage().read_container(self.container_id)
        unchanged = snapshots.find_unchanged(Path(self.output_dir), container, self.stamp)
        if unchanged is not None:
            record = catalog.reuse_record(unchanged, self.stamp, time.time() - started)
        else:
            archive = self._archive_task(container)
            yield archive  # luigi runs the commit, then calls run() again from the top
            result = _read_commit(archive)
            record = snapshots.build_record(container, self.stamp, result, time.time() - started)
        write_bytes_atomic(Path(self.output().path), record.to_json())

    def _archive_task(self, container: Any) -> WriteImageArchive:
        return WriteImageArchive(
            host=self.host,
            container_id=self.container_id,
            image=snapshots.snapshot_reference(container, self.stamp),
            output_path=str(snapshots.snapshot_archive(Path(self.output_dir), container, self.stamp, self.format)),
            engine=self.engine,
            storage_root=self.storage_root,
            cache_dir=self.cache_dir,
            clamp_mtime=self.clamp_mtime,
            pause=self.pause,
            format=self.format,
        )

    def _started(self) -> float:
        # run() starts again after its commit completes (luigi's dynamic dependencies), possibly in another
        # worker process, so the start time lives in a file rather than in this object.
        path = Path(self.cache_dir) / "snapshots" / f"{_key(self.task_id)}.started"
        if not path.exists():
            write_bytes_atomic(path, repr(time.time()).encode())
        return float(path.read_text())


def _read_commit(archive: WriteImageArchive) -> snapshots.CommitResult:
    config = Path(archive.requires()["config"].output().path).read_bytes()
    return snapshots.CommitResult(Path(archive.output_path), config, archive.layer_records())


class SnapshotAll(HostTask):
    """`luigi --module pipeline SnapshotAll [--snapshot STAMP] [--containers GLOB,...] [--state S] [--keep N]`."""

    snapshot: datetime = SnapshotParameter(
        default=datetime.now(UTC).replace(tzinfo=None),
        description="snapshot time (YYYY-MM-DDTHHMM, UTC); default now, truncated to [snapshot] period_minutes",
    )
    containers: str = luigi.Parameter(default="", description="comma-separated globs over names and ids")
    state: str = luigi.ChoiceParameter(choices=["all", "running", "stopped"], default="all")
    keep: int | None = luigi.OptionalIntParameter(default=None, description="snapshots kept per container")
    prune_dry_run: bool = luigi.BoolParameter(default=False, description="print what retention would delete")
    pause: bool = luigi.BoolParameter(default=True, significant=False, parsing=luigi.BoolParameter.EXPLICIT_PARSING)
    format: str | None = luigi.OptionalChoiceParameter(
        choices=commits.FORMATS, default=None, description="image format; default [commit] format"
    )

    def stamp(self) -> str:
        return snapshots.format_stamp(self.snapshot)

    def requires(self) -> list[SnapshotContainer]:
        settings = _settings()
        globs = [g.strip() for g in self.containers.replace(" ", ",").split(",") if g.strip()]
        selected = snapshots.select_containers(
            open_storage(settings["engine"], Path(settings["storage_root"])), globs, self.state
        )
        return [
            SnapshotContainer(
                host=self.host,
                container_id=c.container_id,
                stamp=self.stamp(),
                pause=self.pause,
                format=self.format or commit().format,
                **settings,
            )
            for c in selected
        ]

    def output(self) -> DurableTarget:
        selection = _key(self.containers, self.state)
        return DurableTarget(
            os.path.join(_settings()["output_dir"], "catalog", "runs", f"{self.stamp()}-{selection}.json")
        )

    def run(self) -> None:
        settings = _settings()
        output_dir, cache_dir = Path(settings["output_dir"]), Path(settings["cache_dir"])
        records = [SnapshotRecord.from_json(Path(t.path).read_bytes(), Path(t.path)) for t in self.input()]
        catalog.write_index(output_dir)
        keep = batch().keep if self.keep is None else self.keep
        if keep > 0:
            plan = retention.plan_retention(output_dir, cache_dir, keep, grace_seconds=batch().gc_grace_minutes * 60)
            if self.prune_dry_run:
                print(retention.describe(plan))
            else:
                retention.apply_retention(plan)
                catalog.write_index(output_dir)
        seconds = time.time() - _PROCESS_STARTED
        totals = snapshots.measure_run(records, cache_dir / "blobs" / "sha256", _PROCESS_STARTED)
        log.info(snapshots.summarize(self.stamp(), records, seconds, totals))
        write_bytes_atomic(Path(self.output().path), snapshots.build_run_summary(self.stamp(), records, seconds))


_PROCESS_STARTED = time.time()


def _key(*parts: object) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]

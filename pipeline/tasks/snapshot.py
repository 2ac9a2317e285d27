"""Scheduled batch snapshots: SnapshotAll requires one SnapshotContainer per selected container.

SnapshotAll ─> SnapshotContainer* ─(only if the container changed)─> WriteImageArchive (tasks/image.py)
"""

import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import luigi

from pipeline import plan
from pipeline.engines import open_storage
from pipeline.host import failpoint
from pipeline.host.atomic import write_bytes_atomic
from pipeline.snapshots import catalog, retention
from pipeline.snapshots import snapshot as snapshots
from pipeline.store.layout import CacheLayout, key_of
from pipeline.tasks.image import WriteImageArchive
from pipeline.tasks.settings import DurableTarget, HostTask, StorageTask, commit, schedule, storage

log = luigi.task.logger


class SnapshotParameter(luigi.DateMinuteParameter):
    """A snapshot time (UTC), truncated to [snapshot] period_minutes so every run in one period is the same."""

    def normalize(self, x: Any) -> Any:
        value = super().normalize(x)
        if value is None:
            return None
        period = max(1, schedule().period_minutes) * 60
        seconds = int(value.replace(tzinfo=UTC).timestamp())
        return datetime.fromtimestamp(seconds - seconds % period, UTC).replace(tzinfo=None)


def _settings() -> dict[str, Any]:
    """Parameters every snapshot task passes down, absolute so task ids do not depend on the cwd."""
    return {
        "engine": storage().engine,
        "storage_root": storage().storage_root(),
        "cache_dir": os.path.abspath(commit().cache_dir),
        "output_dir": os.path.abspath(commit().output_dir),
        "clamp_mtime": plan.source_date_epoch(),
    }


class SnapshotContainer(StorageTask):
    """One container's snapshot; its target is the catalog record. Planned by SnapshotAll with the container's
    state at planning time: either a commit of that state, or (reuse_from) the earlier snapshot it equals."""

    container_id: str = luigi.Parameter()
    stamp: str = luigi.Parameter()
    output_dir: str = luigi.Parameter()
    format: str = luigi.ChoiceParameter(choices=plan.FORMATS, default="both")
    lower: tuple[tuple[str, ...], ...] = luigi.ListParameter(default=())  # commit.LayerSource.as_param()
    upper: tuple[str, ...] = luigi.ListParameter()
    metadata: str = luigi.Parameter()
    reuse_from: str = luigi.Parameter(default="", description="stamp of the unchanged snapshot this one reuses")
    # When the plan was made: the record's duration runs from there (not part of what the snapshot is).
    planned_at: float = luigi.FloatParameter(default=0.0, significant=False)

    def requires(self) -> list[WriteImageArchive]:
        return [] if self.reuse_from else [self._archive_task()]

    def output(self) -> DurableTarget:
        return DurableTarget(str(catalog.record_path(Path(self.output_dir), self.container_id, self.stamp)))

    def complete(self) -> bool:
        # A snapshot retention pruned (by an overlapping run's --keep) is done, not work left to do.
        pruned = catalog.pruned_path(Path(self.output_dir), self.container_id, self.stamp)
        return self.output().exists() or pruned.exists()

    def run(self) -> None:
        duration = time.time() - (self.planned_at or time.time())
        if self.reuse_from:
            previous = catalog.read_record(Path(self.output_dir), self.container_id, self.reuse_from)
            record = catalog.reuse_record(previous, self.stamp, duration)
        else:
            failpoint.reached("snapshot:record")
            container = self.open_storage().read_container(self.container_id)
            state = plan.ContainerState(
                tuple(plan.LayerSource.from_param(p) for p in self.lower),
                plan.LayerSource.from_param(self.upper),
                self.metadata,
            )
            result = _read_commit(self._archive_task())
            record = snapshots.build_record(container, self.stamp, result, duration, state)
        write_bytes_atomic(Path(self.output().path), record.to_json())

    def _archive_task(self) -> WriteImageArchive:
        container = self.open_storage().read_container(self.container_id)
        output = snapshots.snapshot_archive(Path(self.output_dir), container, self.stamp, self.format)
        return WriteImageArchive(
            host=self.host,
            container_id=self.container_id,
            lower=self.lower,
            upper=self.upper,
            metadata=self.metadata,
            image=snapshots.snapshot_reference(container, self.stamp),
            output_path=str(output),
            engine=self.engine,
            storage_root=self.storage_root,
            cache_dir=self.cache_dir,
            clamp_mtime=self.clamp_mtime,
            pause=self.pause,
            format=self.format,
        )


def _read_commit(archive: WriteImageArchive) -> snapshots.CommitResult:
    config = Path(archive.requires()["config"].output().path).read_bytes()
    fingerprint = archive.layer_records()[-1].fingerprint  # the container layer's, even when the image omits it
    return snapshots.CommitResult(Path(archive.output_path), config, archive.image_records(), fingerprint)


class ScopeParameter(luigi.Parameter):
    """The settings a snapshot run reads (engine, storage root, output and cache dirs), filled in from the
    configuration when not given: part of SnapshotAll's task id, so runs over two storages in one period are
    two tasks to luigid and keep two run summaries."""

    def normalize(self, x: Any) -> Any:
        if x:
            return x
        settings = _settings()
        return ";".join(f"{k}={settings[k]}" for k in ("engine", "storage_root", "output_dir", "cache_dir"))


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
        choices=plan.FORMATS, default=None, description="image format; default [commit] format"
    )

    def stamp(self) -> str:
        return snapshots.format_stamp(self.snapshot)

    scope: str = ScopeParameter(
        default="", description="filled in from [storage] and [commit]: the storage and dirs this run uses"
    )

    def requires(self) -> list[SnapshotContainer]:
        # Planned once per run: each container's state is taken here, and whether it changed since its previous
        # snapshot is decided here, so a run resumed or overlapping with another never mixes two states.
        if self._planned is None:
            self._planned = self._plan()
        return self._planned

    _planned: list[SnapshotContainer] | None = None

    def _plan(self) -> list[SnapshotContainer]:
        settings = _settings()
        # The storage is only ever read: no archive, catalog or cache entry may be written into it.
        plan.check_outside_storage(
            settings["storage_root"],
            {plan.OUTPUT_DIR_FLAG: settings["output_dir"], plan.CACHE_DIR_FLAG: settings["cache_dir"]},
        )
        globs = [g.strip() for g in self.containers.replace(" ", ",").split(",") if g.strip()]
        store = open_storage(settings["engine"], Path(settings["storage_root"]))
        tasks = []
        for container in snapshots.select_containers(store, globs, self.state):
            state = plan.read_state(store, container)
            task = SnapshotContainer(
                host=self.host,
                container_id=container.container_id,
                stamp=self.stamp(),
                pause=self.pause,
                format=self.format or commit().format,
                lower=tuple(s.as_param() for s in state.lower),
                upper=state.upper.as_param(),
                metadata=state.metadata,
                planned_at=time.time(),
                **settings,
            )
            # An archive of this state written for this stamp by a run killed before its record is this
            # snapshot; otherwise an unchanged container reuses its previous snapshot.
            if not task.complete() and not task.requires()[0].complete():
                previous = snapshots.find_unchanged(Path(settings["output_dir"]), container, self.stamp(), state)
                if previous is not None:
                    task = task.clone(reuse_from=previous.stamp)
            tasks.append(task)
        return tasks

    def output(self) -> DurableTarget:
        selection = key_of(self.containers, self.state, self.scope, length=16)
        return DurableTarget(str(catalog.run_summary_path(Path(_settings()["output_dir"]), self.stamp(), selection)))

    def run(self) -> None:
        settings = _settings()
        output_dir, cache_dir = Path(settings["output_dir"]), Path(settings["cache_dir"])
        keep = schedule().keep if self.keep is None else self.keep
        # Runs that overlap (two periods, two hosts) take turns here, so one's retention never deletes what the
        # other is reading.
        with catalog.locked(output_dir):
            records = catalog.read_targets([Path(t.path) for t in self.input()])
            catalog.write_index(output_dir)
            if keep > 0:
                grace = schedule().gc_grace_minutes * 60
                dry_run = self.prune_dry_run
                plan = retention.run_retention(output_dir, cache_dir, keep, grace_seconds=grace, dry_run=dry_run)
                if dry_run:
                    print(retention.describe(plan))
                else:
                    catalog.write_index(output_dir)
        seconds = time.time() - _PROCESS_STARTED
        totals = snapshots.measure_run(records, CacheLayout(cache_dir).blob_dir, _PROCESS_STARTED)
        log.info(snapshots.summarize(self.stamp(), records, seconds, totals))
        write_bytes_atomic(Path(self.output().path), snapshots.build_run_summary(self.stamp(), records, seconds))


_PROCESS_STARTED = time.time()

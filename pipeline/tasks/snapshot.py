"""Scheduled batch snapshots: SnapshotAll requires one SnapshotContainer per changed container and one
ReuseSnapshots for all the unchanged ones.

    SnapshotAll ─> PackImageLayer* (shared), SnapshotContainer* ┄> PackImageLayer*      (--format store, default)
    SnapshotAll ─> SnapshotContainer* ─> WriteImageArchive                                      (other formats)
    SnapshotAll ─> ReuseSnapshots (every container unchanged since its previous snapshot, in one task)

(┄> a dynamic dependency: a store snapshot packs its container's own layer first, then waits for the image layers.)

With the store, a container's snapshot is one task: its own layer (whole, or a delta on its previous snapshot),
config and store entry are written by one plain call (snapshots.incremental); only the image layers containers
share are tasks of their own, so luigi runs each once.
"""

import os
import time
from collections.abc import Generator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import luigi

from pipeline import packing, plan
from pipeline.engines import open_storage
from pipeline.engines.container import Container
from pipeline.errors import PipelineError, StorageError
from pipeline.host import failpoint
from pipeline.host.atomic import write_bytes_atomic
from pipeline.image.reference import Reference
from pipeline.registry.client import open_registry
from pipeline.registry.push import PushedBlobs, PushedTags, parse_push_reference
from pipeline.snapshots import catalog, incremental, metrics, retention
from pipeline.snapshots import snapshot as snapshots
from pipeline.snapshots.store import SnapshotStore
from pipeline.store.cache import LayerCache
from pipeline.store.layout import CacheLayout, key_of
from pipeline.tasks.image import Progress, WriteImageArchive, image_layer_tasks
from pipeline.tasks.push import registry
from pipeline.tasks.settings import (
    HIDDEN,
    SNAPSHOT_FORMATS,
    DurableTarget,
    HostTask,
    StorageTask,
    commit,
    schedule,
    storage,
)

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
    state at planning time: a snapshot of that state, or (reuse_from) the earlier snapshot it equals, or (problem)
    the one-line reason the container could not even be planned, which fails this task alone."""

    container_id: str = luigi.Parameter()
    container_name: str = luigi.Parameter(default="", significant=False, description="the container's name")
    stamp: str = luigi.Parameter()
    output_dir: str = luigi.Parameter(visibility=HIDDEN)
    format: str = luigi.ChoiceParameter(choices=SNAPSHOT_FORMATS, default="store")
    lower: tuple[tuple[str, ...], ...] = luigi.ListParameter(default=(), visibility=HIDDEN)  # LayerSource.as_param
    upper: tuple[str, ...] = luigi.ListParameter(default=(), visibility=HIDDEN)
    metadata: str = luigi.Parameter(default="", visibility=HIDDEN)
    problem: str = luigi.Parameter(default="", visibility=HIDDEN)
    # Another container of the run has the same reference name (web-1, WEB-1): the reference gets the short id.
    qualified: bool = luigi.BoolParameter(default=False, visibility=HIDDEN)
    full_every: int = luigi.IntParameter(default=incremental.DEFAULT_FULL_EVERY, visibility=HIDDEN)
    push: str = luigi.Parameter(
        default="", visibility=HIDDEN, description="REGISTRY/PREFIX each new snapshot is pushed under"
    )
    # When the plan was made: the record's duration runs from there (not part of what the snapshot is).
    planned_at: float = luigi.FloatParameter(default=0.0, significant=False, visibility=HIDDEN)

    def label(self) -> str:
        return f"{self.container_name or self.container_id[:12]}_{self.stamp}"

    def requires(self) -> list[luigi.Task]:
        # With the store, the image layers are waited for in run(), after the container's own layer is packed.
        if self.problem or self.format == "store":
            return []
        return [self._archive_task()]

    def image_layer_tasks(self) -> list[luigi.Task]:
        """The packing of the image layers this snapshot refers to (store format), shared with other containers."""
        return list(image_layer_tasks(self._state().lower, self.host, self.cache_dir, self.clamp_mtime))

    def output(self) -> DurableTarget:
        return DurableTarget(str(catalog.record_path(Path(self.output_dir), self.container_id, self.stamp)))

    def complete(self) -> bool:
        # A snapshot retention pruned (by an overlapping run's --keep) is done, not work left to do.
        pruned = catalog.pruned_path(Path(self.output_dir), self.container_id, self.stamp)
        return self.output().exists() or pruned.exists()

    def run(self) -> Iterator[list[luigi.Task]]:
        if self.problem:
            raise StorageError(self.problem)
        started = self.planned_at or time.time()
        output_dir = Path(self.output_dir)
        if self.format == "store":
            record = yield from self._snapshot_into_store(output_dir)
        else:
            failpoint.reached("snapshot:record")
            container = self.open_storage().read_container(self.container_id)
            result = _read_commit(self._archive_task())
            record = snapshots.build_record(container, self.stamp, result, 0.0, self._state(), qualified=self.qualified)
        record = catalog.with_duration(record, time.time() - started)
        write_bytes_atomic(Path(self.output().path), record.to_json())
        if self.format == "store" and record.status == "new":
            # The next delta starts from this snapshot's index, a redo of this one from the previous snapshot's:
            # the one before that is no longer needed.
            before = catalog.previous_record(output_dir, self.container_id, self.stamp)
            if before is not None:
                earlier = catalog.previous_record(output_dir, self.container_id, before.stamp)
                incremental.drop_superseded_index(CacheLayout(Path(self.cache_dir)), earlier, (before, record))
        _finish(self, output_dir, [self.container_id], f"{record.status}")

    def on_failure(self, exception: BaseException) -> str:
        _record_failures(self, [(self.container_id, self.container_name or self.container_id[:12])], exception)
        return super().on_failure(exception)

    def _snapshot_into_store(self, output_dir: Path) -> Generator[list[luigi.Task], None, catalog.SnapshotRecord]:
        store = SnapshotStore(catalog.store_dir(output_dir))
        container = self.open_storage().read_container(self.container_id)
        request = incremental.SnapshotRequest(
            container,
            self._state(),
            self.stamp,
            _stamp_time(self.stamp),
            self.clamp_mtime,
            self.full_every,
            self.qualified,
        )
        cache = LayerCache(Path(self.cache_dir))
        failpoint.reached("snapshot:record")
        markers = CacheLayout(cache.root).freezer_markers
        own = incremental.pack_own_layer(
            store,
            cache,
            request,
            catalog.previous_record(output_dir, self.container_id, self.stamp),
            pausing=lambda: packing.pause_while_packing(container, markers, enabled=self.pause),
            report=Progress(self),
        )
        # The container's own layer needs nothing of the image, so it is packed while other workers pack the image
        # layers (SnapshotAll's first tasks); they are waited for only now. A worker that finds them not yet packed
        # hands this task back to the scheduler, which runs it again once they are: packing finds its layer done.
        yield self.image_layer_tasks()
        record = incremental.store_snapshot(store, cache, self.open_storage(), request, own)
        if self.push:
            _push(store, Path(self.cache_dir), self.push, record.reference)
        return record

    def _state(self) -> plan.ContainerState:
        return plan.ContainerState(
            tuple(plan.LayerSource.from_param(p) for p in self.lower),
            plan.LayerSource.from_param(self.upper),
            self.metadata,
        )

    def _archive_task(self) -> WriteImageArchive:
        container = self.open_storage().read_container(self.container_id)
        output = snapshots.snapshot_archive(Path(self.output_dir), container, self.stamp, self.format)
        return WriteImageArchive(
            host=self.host,
            container_id=self.container_id,
            container_name=self.container_name,
            lower=self.lower,
            upper=self.upper,
            metadata=self.metadata,
            image=snapshots.snapshot_reference(container, self.stamp, qualified=self.qualified),
            output_path=str(output),
            engine=self.engine,
            storage_root=self.storage_root,
            cache_dir=self.cache_dir,
            clamp_mtime=self.clamp_mtime,
            pause=self.pause,
            format=self.format,
        )


class ReuseSnapshots(StorageTask):
    """The snapshots of the containers of a run that did not change since their previous snapshots, in one task
    (a task per container would cost more than the work: a worker process, a round trip to luigid and an update
    of index.json each). Each record points at the previous snapshot; in the store, the previous image is named
    again, all names in one durable update of index.json. Planned by SnapshotAll."""

    stamp: str = luigi.Parameter()
    container_ids: tuple[str, ...] = luigi.ListParameter(description="the unchanged containers")
    container_names: tuple[str, ...] = luigi.ListParameter(description="their names (as the engine has them)")
    reuse_from: tuple[str, ...] = luigi.ListParameter(visibility=HIDDEN)  # each one's previous snapshot
    qualified: tuple[bool, ...] = luigi.ListParameter(visibility=HIDDEN)  # SnapshotContainer.qualified
    output_dir: str = luigi.Parameter(visibility=HIDDEN)
    format: str = luigi.ChoiceParameter(choices=SNAPSHOT_FORMATS, default="store")
    full_every: int = luigi.IntParameter(default=incremental.DEFAULT_FULL_EVERY, visibility=HIDDEN)
    push: str = luigi.Parameter(default="", visibility=HIDDEN)
    planned_at: float = luigi.FloatParameter(default=0.0, significant=False, visibility=HIDDEN)

    def label(self) -> str:
        return f"{len(self.container_ids)}_unchanged_{self.stamp}"

    def output(self) -> list[DurableTarget]:
        output_dir = Path(self.output_dir)
        return [DurableTarget(str(catalog.record_path(output_dir, c, self.stamp))) for c in self.container_ids]

    def complete(self) -> bool:
        return not self._left()

    def _left(self) -> list[int]:
        """Which containers still have no record (one pruned by an overlapping run's retention is done)."""
        output_dir = Path(self.output_dir)
        return [
            i
            for i, c in enumerate(self.container_ids)
            if not catalog.record_path(output_dir, c, self.stamp).exists()
            and not catalog.pruned_path(output_dir, c, self.stamp).exists()
        ]

    def run(self) -> None:
        started = self.planned_at or time.time()
        output_dir = Path(self.output_dir)
        left = self._left()
        previous = [catalog.read_record(output_dir, self.container_ids[i], self.reuse_from[i]) for i in left]
        if self.format == "store":
            store = SnapshotStore(catalog.store_dir(output_dir))
            created = _stamp_time(self.stamp)
            reuses = [
                incremental.Reuse(
                    before,
                    snapshots.reference_for(
                        self.container_names[i], before.container_id, self.stamp, qualified=self.qualified[i]
                    ),
                    self.stamp,
                    created,
                )
                for i, before in zip(left, previous, strict=True)
            ]
            records = incremental.reuse_snapshots(store, reuses, 0.0)
            for record in records if self.push else []:
                _push(store, Path(self.cache_dir), self.push, record.reference)
        else:
            records = [catalog.reuse_record(before, self.stamp, 0.0) for before in previous]
        duration = time.time() - started
        for record in records:
            path = catalog.record_path(output_dir, record.container_id, self.stamp)
            write_bytes_atomic(path, catalog.with_duration(record, duration).to_json())
        _finish(self, output_dir, [self.container_ids[i] for i in left], "unchanged")

    def on_failure(self, exception: BaseException) -> str:
        failed = [
            (self.container_ids[i], self.container_names[i].lstrip("/") or self.container_ids[i][:12])
            for i in self._left()
        ]
        _record_failures(self, failed, exception)
        return super().on_failure(exception)


def _push(store: SnapshotStore, cache_dir: Path, prefix: str, reference: str) -> None:
    """Push the store's snapshot reference as PREFIX/<name>:<stamp> (--push)."""
    target = push_target(prefix, reference)
    assert target.domain is not None
    incremental.push_snapshot(
        store,
        reference,
        open_registry(target.domain, registry().options()),
        target,
        pushed=PushedBlobs.in_cache(cache_dir, target.domain),
        tags=PushedTags.in_cache(cache_dir, target.domain),
    )


def _finish(
    task: "SnapshotContainer | ReuseSnapshots", output_dir: Path, container_ids: list[str], status: str
) -> None:
    """After a snapshot task wrote its records: their earlier failures cleared, the catalog and metrics rebuilt if
    another container of the run failed (SnapshotAll, which writes them at the end, will not run), 100%."""
    for container_id in container_ids:
        catalog.clear_failure(output_dir, task.stamp, container_id)
    if catalog.read_failures(output_dir, task.stamp):
        _rebuild_catalog(output_dir)
        _write_metrics(output_dir, Path(task.cache_dir), task.stamp)
    done = catalog.count_records_of_stamp(output_dir, task.stamp)
    Progress(task).finish(f"{status}, {done} snapshot(s) of {task.stamp} recorded so far")


def _record_failures(
    task: "SnapshotContainer | ReuseSnapshots", failed: list[tuple[str, str]], exception: BaseException
) -> None:
    """The catalog and the metrics stay whole whatever fails: SnapshotAll, which writes them too, never runs once
    a container failed. failed: (container id, name) of each container whose snapshot failed."""
    output_dir = Path(task.output_dir)
    try:
        for container_id, name in failed:
            catalog.record_failure(output_dir, task.stamp, container_id, name, str(exception))
        _rebuild_catalog(output_dir)
        _write_metrics(output_dir, Path(task.cache_dir), task.stamp)
    except (OSError, PipelineError) as e:
        log.warning("%s: cannot record the failure in the catalog (%s)", output_dir, e)


def _write_metrics(output_dir: Path, cache_dir: Path, stamp: str) -> None:
    """The run's metrics as far as it got (what SnapshotAll writes at the end of a run without failures)."""
    records = catalog.read_records_of_stamp(output_dir, stamp)
    totals = snapshots.measure_run(records, CacheLayout(cache_dir).blob_dir, _PROCESS_STARTED)
    write_run_metrics(output_dir, stamp, records, totals.new_bytes)


def _rebuild_catalog(output_dir: Path) -> None:
    with catalog.locked(output_dir):
        catalog.write_index(output_dir)


def _stamp_time(stamp: str) -> datetime:
    return datetime.strptime(stamp, snapshots.STAMP_FORMAT).replace(tzinfo=UTC)


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
    pause: bool = luigi.BoolParameter(
        default=True, significant=False, parsing=luigi.BoolParameter.EXPLICIT_PARSING, visibility=HIDDEN
    )
    push: str = luigi.Parameter(
        default="", description="REGISTRY[:PORT]/PREFIX: push each snapshot as PREFIX/<name>:<stamp> (store format)"
    )
    format: str | None = luigi.OptionalChoiceParameter(
        choices=SNAPSHOT_FORMATS,
        default=None,
        description="store (default: [snapshot] format), both, docker, oci, oci-dir",
    )

    def stamp(self) -> str:
        return snapshots.format_stamp(self.snapshot)

    def label(self) -> str:
        return self.stamp()

    scope: str = ScopeParameter(
        default="",
        visibility=HIDDEN,
        description="filled in from [storage] and [commit]: the storage and dirs this run uses",
    )

    def requires(self) -> list[luigi.Task]:
        # Planned once per run: each container's state is taken here, and whether it changed since its previous
        # snapshot is decided here, so a run resumed or overlapping with another never mixes two states. The image
        # layers the store's snapshots share come first (they are scheduled first, at a higher priority, and
        # each container's task waits for them only after packing its own layer).
        if self._planned is None:
            planned = self._plan()
            layers = {
                t.task_id: t
                for task in planned
                if isinstance(task, SnapshotContainer) and task.format == "store" and not task.problem
                for t in task.image_layer_tasks()
            }
            self._planned = [*layers.values(), *planned]
        return self._planned

    _planned: list[luigi.Task] | None = None

    def _plan(self) -> list[luigi.Task]:
        settings = _settings()
        # The storage is only ever read: no archive, catalog or cache entry may be written into it.
        plan.check_outside_storage(
            settings["storage_root"],
            {plan.OUTPUT_DIR_FLAG: settings["output_dir"], plan.CACHE_DIR_FLAG: settings["cache_dir"]},
        )
        globs = [g.strip() for g in self.containers.replace(" ", ",").split(",") if g.strip()]
        store = open_storage(settings["engine"], Path(settings["storage_root"]))
        fmt = self.format or schedule().format
        if self.push:
            if fmt != "store":
                raise PipelineError(f"--push {self.push}: pushes snapshots of the store; drop --format {fmt}")
            push_target(self.push, "x:latest")  # a bad prefix fails now, not once per container
        shared = {
            "host": self.host,
            "stamp": self.stamp(),
            "pause": self.pause,
            "format": fmt,
            "full_every": max(1, schedule().full_every),
            "push": self.push,
            **settings,
        }
        tasks: list[luigi.Task] = []
        reuses: list[tuple[Container, str, bool]] = []  # unchanged: (container, previous stamp, qualified)
        in_store = (
            SnapshotStore(catalog.store_dir(Path(settings["output_dir"]))).references() if fmt == "store" else set()
        )
        image_keys: dict[
            str, tuple[str, int]
        ] = {}  # image layers scanned once per run, whichever container shows them first
        selected = snapshots.select_containers(store, globs, self.state)
        shared_names = snapshots.shared_reference_names([c for c in selected if isinstance(c, Container)])
        for found in selected:
            if isinstance(found, snapshots.Unreadable):
                tasks.append(SnapshotContainer(container_id=found.container_id, problem=found.error, **shared))
                continue
            qualified = snapshots.reference_name(found) in shared_names
            try:
                task, previous = self._plan_container(store, found, {**shared, "qualified": qualified}, image_keys)
            except PipelineError as e:  # this container's trouble stays this container's
                tasks.append(
                    SnapshotContainer(
                        container_id=found.container_id, container_name=_name(found), problem=str(e), **shared
                    )
                )
                continue
            # An unchanged container names its previous snapshot again, if the store still has it.
            if previous is not None and (fmt != "store" or previous.reference in in_store):
                reuses.append((found, previous.stamp, qualified))
            else:
                tasks.append(task)
        if reuses:
            tasks.append(
                ReuseSnapshots(
                    container_ids=tuple(c.container_id for c, _, _ in reuses),
                    container_names=tuple(c.name for c, _, _ in reuses),
                    reuse_from=tuple(stamp for _, stamp, _ in reuses),
                    qualified=tuple(q for _, _, q in reuses),
                    planned_at=time.time(),
                    **shared,
                )
            )
        return tasks

    def _plan_container(
        self, store: Any, container: Container, shared: dict[str, Any], image_keys: dict[str, tuple[str, int]]
    ) -> tuple[SnapshotContainer, catalog.SnapshotRecord | None]:
        """The container's snapshot task, and its previous snapshot when the container has not changed since."""
        state = plan.read_state(store, container, image_keys=image_keys)
        task = SnapshotContainer(
            container_id=container.container_id,
            container_name=_name(container),
            lower=tuple(s.as_param() for s in state.lower),
            upper=state.upper.as_param(),
            metadata=state.metadata,
            planned_at=time.time(),
            **shared,
        )
        # A snapshot of this state already written for this stamp by a run killed before its record is this
        # snapshot; otherwise an unchanged container reuses its previous snapshot.
        if task.complete() or (task.format != "store" and task.requires()[0].complete()):
            return task, None
        previous = snapshots.find_unchanged(Path(shared["output_dir"]), container, self.stamp(), state)
        if previous is not None and (previous.format == "store") == (task.format == "store"):
            return task, previous
        return task, None

    def _record_paths(self) -> list[Path]:
        """The catalog records of the snapshots this run required."""
        tasks = [t for t in self.requires() if isinstance(t, SnapshotContainer | ReuseSnapshots)]
        return [Path(target.path) for target in luigi.task.flatten([t.output() for t in tasks])]

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
            records = catalog.read_targets(self._record_paths())
            catalog.write_index(output_dir)
            if keep > 0:
                grace = schedule().gc_grace_minutes * 60
                dry_run = self.prune_dry_run
                plan_ = retention.run_retention(output_dir, cache_dir, keep, grace_seconds=grace, dry_run=dry_run)
                if dry_run:
                    print(retention.describe(plan_))
                else:
                    catalog.write_index(output_dir)
        seconds = time.time() - _PROCESS_STARTED
        totals = snapshots.measure_run(records, CacheLayout(cache_dir).blob_dir, _PROCESS_STARTED)
        log.info(snapshots.summarize(self.stamp(), records, seconds, totals))
        write_run_metrics(output_dir, self.stamp(), records, totals.new_bytes)
        write_bytes_atomic(Path(self.output().path), snapshots.build_run_summary(self.stamp(), records, seconds))


def write_run_metrics(output_dir: Path, stamp: str, records: list[catalog.SnapshotRecord], new_bytes: int) -> None:
    """The Prometheus textfile metrics of this run ([snapshot] metrics_file, default in the catalog)."""
    path = Path(schedule().metrics_file or catalog.catalog_dir(output_dir) / "pipeline.prom")
    metrics.write_metrics(
        path,
        records,
        run_stamp=stamp,
        started=_PROCESS_STARTED,
        finished=time.time(),
        failed=catalog.read_failures(output_dir, stamp),
        bytes_written=new_bytes,
    )


def push_target(prefix: str, reference: str) -> Reference:
    """Where --push PREFIX sends the snapshot reference (<name>:<stamp>): PREFIX/<name>:<stamp>."""
    return parse_push_reference(f"{prefix.rstrip('/')}/{reference}")


def _name(container: Container) -> str:
    return container.name.lstrip("/") or container.short_id


_PROCESS_STARTED = time.time()

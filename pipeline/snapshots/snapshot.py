"""Batch snapshots: which containers to snapshot, whether one changed since its last snapshot, and its record."""

import fnmatch
import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from pipeline.engines.container import Container, Storage
from pipeline.errors import PipelineError
from pipeline.host.process import is_alive
from pipeline.image.imageconfig import digest_of
from pipeline.image.reference import build_reference_from_name
from pipeline.layer.writer import LayerRecord
from pipeline.plan import ContainerState
from pipeline.snapshots.catalog import SnapshotRecord, archive_path, previous_record

STAMP_FORMAT = "%Y-%m-%dT%H%M"  # luigi's DateMinuteParameter format; also a valid image tag


def format_stamp(when: datetime) -> str:
    return when.strftime(STAMP_FORMAT)


@dataclass(frozen=True)
class Unreadable:
    """A container the storage lists but whose metadata cannot be read: its snapshot fails on its own, naming it."""

    container_id: str
    error: str


def select_containers(storage: Storage, globs: list[str], state: str) -> list[Container | Unreadable]:
    """Containers whose name, id or short id matches any glob (all when none given), in the given state; one whose
    metadata cannot be read is listed as Unreadable (when its id matches, or no glob is given) rather than
    stopping the others."""
    selected: list[Container | Unreadable] = []
    for container_id in storage.list_containers():
        try:
            container = storage.read_container(container_id)
        except PipelineError as e:
            if not globs or any(fnmatch.fnmatchcase(n, g) for n in (container_id, container_id[:12]) for g in globs):
                selected.append(Unreadable(container_id, str(e)))
            continue
        names = (container.name.lstrip("/"), container.container_id, container.short_id)
        if globs and not any(fnmatch.fnmatchcase(n, g) for n in names for g in globs):
            continue
        running = container.running and container.pid > 0 and is_alive(container.pid)
        if state == "all" or (state == "running") == running:
            selected.append(container)
    return selected


def snapshot_reference(container: Container, stamp: str, *, qualified: bool = False) -> str:
    """<name>:<stamp>, the name made a valid repository name; <name>-<short id>:<stamp> when qualified (another
    container of the run has the same name once made valid, as web-1 and WEB-1 do)."""
    return reference_for(container.name, container.container_id, stamp, qualified=qualified)


def reference_for(name: str, container_id: str, stamp: str, *, qualified: bool = False) -> str:
    """snapshot_reference of the container with this name and id."""
    valid = build_reference_from_name(name, container_id).name
    return f"{valid}-{container_id[:12]}:{stamp}" if qualified else f"{valid}:{stamp}"


def reference_name(container: Container) -> str:
    return build_reference_from_name(container.name, container.container_id).name


def shared_reference_names(containers: list[Container]) -> set[str]:
    """The reference names more than one of these containers would get: theirs are qualified by short id."""
    seen: dict[str, int] = {}
    for container in containers:
        name = reference_name(container)
        seen[name] = seen.get(name, 0) + 1
    return {name for name, count in seen.items() if count > 1}


def snapshot_archive(output_dir: Path, container: Container, stamp: str, fmt: str = "both") -> Path:
    """<output_dir>/snapshots/<name>-<short id>/<stamp>.tar (a directory without .tar for oci-dir); the short id
    keeps equal names apart."""
    name = build_reference_from_name(container.name, container.container_id).name.replace("/", "_")
    return archive_path(output_dir, f"{name}-{container.short_id}", stamp, fmt)


def find_unchanged(output_dir: Path, container: Container, stamp: str, state: ContainerState) -> SnapshotRecord | None:
    """The previous snapshot if the container has not changed since it was taken: the same upper-dir
    fingerprint as when it was packed, and the same image layers and metadata."""
    previous = previous_record(output_dir, container.container_id, stamp)
    if previous is None or not previous.fingerprint or previous.source != source_digest(state):
        return None
    return previous if state.upper.key.endswith(f":{previous.fingerprint}") else None


def source_digest(state: ContainerState) -> str:
    """What a snapshot was made of besides its upper dir: the image layers' keys and the metadata digest."""
    return digest_of(json.dumps([[s.key for s in state.lower], state.metadata]).encode())


@dataclass(frozen=True)
class CommitResult:
    """What one snapshot's commit produced, read back from its targets."""

    archive: Path
    config: bytes
    layers: list[LayerRecord]  # the image's layers
    fingerprint: str  # the container layer's, as it was packed


def build_record(
    container: Container,
    stamp: str,
    result: CommitResult,
    duration: float,
    state: ContainerState,
    *,
    qualified: bool = False,
) -> SnapshotRecord:
    return SnapshotRecord(
        container_id=container.container_id,
        name=container.name.lstrip("/") or container.short_id,
        stamp=stamp,
        reference=snapshot_reference(container, stamp, qualified=qualified),
        archive=str(result.archive),
        config_digest=digest_of(result.config),
        diff_ids=tuple(r.diff_id for r in result.layers),
        layer_sizes=tuple(r.size for r in result.layers),
        archive_size=output_size(result.archive),
        fingerprint=result.fingerprint,
        duration=round(duration, 3),
        status="new",
        source=source_digest(state),
    )


def output_size(path: Path) -> int:
    """An archive's size, or the apparent size of an OCI layout directory (its blobs may be shared links)."""
    if path.is_dir():
        return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


@dataclass(frozen=True)
class RunTotals:
    new_bytes: int  # bytes this run wrote: fresh layer blobs (each once) plus archive files that are not links
    reused_layers: int  # layer uses served by blobs packed before this run


def measure_run(records: list[SnapshotRecord], blob_dir: Path, run_started: float) -> RunTotals:
    """What a run cost on disk and what it took from earlier runs; unchanged snapshots cost nothing."""
    fresh: dict[str, int] = {}
    reused = archive_bytes = 0
    for record in records:
        if record.status == "reused":
            reused += len(record.diff_ids)
            continue
        archive = Path(record.archive)
        # A store snapshot adds no archive: its layers are links to cache blobs, counted below once each.
        files = (
            []
            if record.format == "store"
            else [p for p in archive.rglob("*") if p.is_file()]
            if archive.is_dir()
            else [archive]
        )
        for path in files:
            try:
                st = path.lstat()
            except FileNotFoundError:  # pruned by an overlapping run's retention
                continue
            archive_bytes += st.st_size if st.st_nlink == 1 else 0
        for diff_id, size in zip(record.diff_ids, record.layer_sizes, strict=True):
            try:
                packed_now = (blob_dir / diff_id.removeprefix("sha256:")).stat().st_mtime >= run_started
            except FileNotFoundError:
                packed_now = False
            if packed_now:
                fresh[diff_id] = size
            else:
                reused += 1
    return RunTotals(archive_bytes + sum(fresh.values()), reused)


def summarize(stamp: str, records: list[SnapshotRecord], seconds: float, totals: RunTotals) -> str:
    """The one line of totals a run ends with."""
    new = sum(1 for r in records if r.status == "new")
    return (
        f"snapshot {stamp}: {len(records)} container(s) ({new} new, {len(records) - new} unchanged),"
        f" {totals.new_bytes} new bytes written, {totals.reused_layers} layer(s) reused from earlier runs,"
        f" {seconds:.1f} s"
    )


def build_run_summary(stamp: str, records: list[SnapshotRecord], seconds: float) -> bytes:
    return json.dumps(
        {"stamp": stamp, "containers": [r.container_id for r in records], "seconds": round(seconds, 3)}, sort_keys=True
    ).encode()

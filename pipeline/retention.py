"""Retention: keep each container's newest N snapshots, delete older archives and the cache entries no kept
snapshot needs; a plan is computed first so a dry run shows exactly what would go."""

import json
import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from pipeline.atomic import is_partial, make_dirs
from pipeline.catalog import SnapshotRecord, pruned_path, read_records, record_path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetentionPlan:
    """What retention keeps and what it deletes; nothing a kept snapshot points at is ever in a delete list."""

    kept: tuple[SnapshotRecord, ...]
    pruned: tuple[SnapshotRecord, ...]
    paths: tuple[Path, ...]  # records, archives, cache blobs and cache records to delete
    freed_bytes: int
    markers: tuple[Path, ...] = ()  # catalog.pruned_path of each pruned snapshot, written before it goes


def plan_retention(output_dir: Path, cache_dir: Path, keep: int, *, grace_seconds: float) -> RetentionPlan:
    """Keep the newest `keep` snapshots of every container; cache entries younger than grace_seconds stay,
    since a commit running right now may have packed them without any record naming them yet."""
    by_container: dict[str, list[SnapshotRecord]] = defaultdict(list)
    for record in read_records(output_dir):
        by_container[record.container_id].append(record)
    kept: list[SnapshotRecord] = []
    pruned: list[SnapshotRecord] = []
    for records in by_container.values():
        kept += records[-keep:] if keep > 0 else records
        pruned += records[:-keep] if keep > 0 else []
    needed_archives = {Path(r.archive) for r in kept}
    needed_blobs = {d.removeprefix("sha256:") for r in kept for d in r.diff_ids}

    doomed: list[Path] = [record_path(output_dir, r.container_id, r.stamp) for r in pruned]
    doomed += sorted({Path(r.archive) for r in pruned} - needed_archives)
    # A kept layer's gzip/zstd forms are kept too: their mappings (compressed/*.json) name diff_id and digest.
    mappings = _read_mappings(cache_dir)
    needed_blobs |= {digest for diff_id, digest in mappings.values() if diff_id in needed_blobs}
    cutoff = time.time() - grace_seconds
    blob_dir = cache_dir / "blobs" / "sha256"
    doomed_blobs = {
        blob.name
        for blob in (sorted(blob_dir.iterdir()) if blob_dir.is_dir() else [])
        if not is_partial(blob) and blob.name not in needed_blobs and blob.stat().st_mtime < cutoff
    }
    doomed += [blob_dir / name for name in sorted(doomed_blobs)]
    # Records in the cache whose blob goes would otherwise claim a layer that is no longer there.
    for record_file in sorted(cache_dir.glob("layers/*.json")) + sorted(cache_dir.glob("commits/*/layer.json")):
        try:
            diff_id = json.loads(record_file.read_bytes())["diff_id"]
        except (OSError, ValueError, KeyError):
            continue
        if diff_id.removeprefix("sha256:") in doomed_blobs:
            doomed.append(record_file)
    doomed += [path for path, (_, digest) in sorted(mappings.items()) if digest in doomed_blobs]
    existing = [p for p in doomed if p.exists()]
    markers = tuple(pruned_path(output_dir, r.container_id, r.stamp) for r in pruned)
    return RetentionPlan(tuple(kept), tuple(pruned), tuple(existing), _sizes(existing), markers)


def _sizes(paths: list[Path]) -> int:
    total = 0
    for path in paths:
        try:
            total += path.stat().st_size
        except FileNotFoundError:  # removed by an overlapping run since it was listed
            continue
    return total


def _read_mappings(cache_dir: Path) -> dict[Path, tuple[str, str]]:
    """Each compressed-blob mapping file, with the hex of the diff_id it compresses and of its own digest."""
    mappings = {}
    for path in sorted(cache_dir.glob("compressed/*.json")):
        try:
            doc = json.loads(path.read_bytes())
            mappings[path] = (doc["diff_id"].removeprefix("sha256:"), doc["digest"].removeprefix("sha256:"))
        except (OSError, ValueError, KeyError, AttributeError):
            continue
    return mappings


def apply_retention(plan: RetentionPlan) -> None:
    for marker in plan.markers:
        make_dirs(marker.parent)
        marker.touch()
    for path in plan.paths:
        path.unlink(missing_ok=True)
    log.info(
        "retention: removed %d file(s), %d bytes; kept %d snapshot(s)",
        len(plan.paths),
        plan.freed_bytes,
        len(plan.kept),
    )


def describe(plan: RetentionPlan) -> str:
    """What a dry run prints: every path retention would delete."""
    lines = [
        f"retention would keep {len(plan.kept)} snapshot(s), prune {len(plan.pruned)}, free {plan.freed_bytes} bytes:"
    ]
    lines += [f"  delete {p}" for p in plan.paths]
    return "\n".join(lines)

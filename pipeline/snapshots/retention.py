"""Retention: keep each container's newest N snapshots, delete older archives and the cache entries no kept
snapshot needs; a plan is computed first so a dry run shows exactly what would go.

What may still be in use is never deleted: an archive a kept snapshot points at; cache blobs while any other
process uses the cache (LayerCache.collecting: commits, pushes and snapshot runs hold it shared for as long as
they run, so retention then leaves the cache alone and a later run collects it); and anything younger than the
grace period, which a run in flight may be about to name in a record (a blob just packed, an archive just written).
Besides pruned snapshots it collects what killed runs left: archives no record names, and cache entries (layer
records, commit directories, compressed-blob mappings) whose blobs are gone.
"""

import logging
import os
import shutil
import stat
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from pipeline import jsoncheck
from pipeline.host.atomic import is_partial, make_dirs, partial_path, remove_abandoned_partials
from pipeline.snapshots.catalog import (
    SnapshotRecord,
    pruned_dir,
    pruned_path,
    read_records,
    record_path,
    snapshots_dir,
    store_dir,
)
from pipeline.snapshots.snapshot import STAMP_FORMAT
from pipeline.snapshots.store import SnapshotStore
from pipeline.store.cache import LayerCache
from pipeline.store.layout import CacheLayout

log = logging.getLogger(__name__)

# A pruned snapshot's marker (catalog.pruned_path) tells a run of that stamp still in flight, or re-run later in its
# period, that the snapshot is done. Once its stamp is this much older than its container's newest kept snapshot,
# no such run is plausible and the marker goes.
MARKER_AGE = timedelta(days=7)


@dataclass(frozen=True)
class RetentionPlan:
    """What retention keeps and what it deletes; nothing a kept snapshot points at is ever in a delete list."""

    kept: tuple[SnapshotRecord, ...]
    pruned: tuple[SnapshotRecord, ...]
    paths: tuple[Path, ...]  # records, archives (files or layout directories), markers, cache entries, in that order
    freed_bytes: int
    markers: tuple[Path, ...] = ()  # catalog.pruned_path of each pruned snapshot, written before it goes
    cache_in_use: bool = False  # another process used the cache: no blob or cache entry is in paths
    store: SnapshotStore | None = None  # the snapshot store, when any snapshot is in one
    store_refs: tuple[str, ...] = ()  # the pruned snapshots' references there, dropped before their records
    store_blobs: tuple[Path, ...] = ()  # the store's blobs no kept reference needs then (collected after)


def plan_retention(
    output_dir: Path, cache_dir: Path, keep: int, *, grace_seconds: float, collect_cache: bool = True
) -> RetentionPlan:
    """Keep the newest `keep` snapshots of every container; archives and cache blobs younger than grace_seconds
    stay, since a run in flight may have written them without any record naming them yet. collect_cache=False
    leaves the cache alone (another process uses it)."""
    by_container: dict[str, list[SnapshotRecord]] = defaultdict(list)
    records = read_records(output_dir)
    for record in records:
        by_container[record.container_id].append(record)
    kept: list[SnapshotRecord] = []
    pruned: list[SnapshotRecord] = []
    for group in by_container.values():
        kept += group[-keep:] if keep > 0 else group
        pruned += group[:-keep] if keep > 0 else []
    cutoff = time.time() - grace_seconds
    needed_archives = {_real(r.archive) for r in kept}
    # A store snapshot's archive is the shared store: its reference goes, the store stays (SnapshotStore).
    in_store = [r for r in pruned if r.format == "store"]
    store = SnapshotStore(store_dir(output_dir)) if any(r.format == "store" for r in records) else None
    store_refs = tuple(r.reference for r in in_store)
    store_blobs = tuple(store.garbage_without(store_refs)) if store is not None and collect_cache else ()

    doomed: list[Path] = [record_path(output_dir, r.container_id, r.stamp) for r in pruned]
    doomed += sorted(
        {Path(r.archive) for r in pruned if r.format != "store" and _real(r.archive) not in needed_archives}
    )
    named = {_real(r.archive) for r in records}
    doomed += _orphan_archives(output_dir, named, cutoff)
    newest = {cid: group[-1].stamp for cid, group in by_container.items() if group}
    markers = tuple(
        pruned_path(output_dir, r.container_id, r.stamp)
        for r in pruned
        if not _stale(r.stamp, newest.get(r.container_id))
    )
    doomed += _stale_markers(output_dir, newest)
    if collect_cache:
        doomed += _cache_garbage(cache_dir, kept, cutoff)
    existing = [p for p in dict.fromkeys(doomed) if os.path.lexists(p)]
    freed = _freed([*existing, *store_blobs])
    return RetentionPlan(
        tuple(kept), tuple(pruned), tuple(existing), freed, markers, not collect_cache, store, store_refs, store_blobs
    )


def run_retention(
    output_dir: Path, cache_dir: Path, keep: int, *, grace_seconds: float, dry_run: bool = False
) -> RetentionPlan:
    """Plan and (unless dry_run) apply retention; the cache is collected only while no other process uses it."""
    if dry_run:
        return plan_retention(output_dir, cache_dir, keep, grace_seconds=grace_seconds)
    with LayerCache(cache_dir).collecting() as alone:
        if not alone:
            log.info(
                "retention: the cache %s is in use by another process (a commit, push or snapshot run); its blobs"
                " are left for a later run to collect",
                cache_dir,
            )
        plan = plan_retention(output_dir, cache_dir, keep, grace_seconds=grace_seconds, collect_cache=alone)
        apply_retention(plan)
        if alone:
            remove_abandoned_partials(CacheLayout(cache_dir).commits_dir)
    return plan


def _real(path: str | Path) -> str:
    return os.path.realpath(path)


def _parse_stamp(stamp: str) -> datetime | None:
    try:
        return datetime.strptime(stamp, STAMP_FORMAT).replace(tzinfo=UTC)
    except ValueError:
        return None


def _stale(stamp: str, newest: str | None) -> bool:
    """Whether a pruned marker for stamp is no longer worth keeping, newest being its container's newest record."""
    when = _parse_stamp(stamp)
    reference = _parse_stamp(newest) if newest else datetime.now(UTC)
    return when is not None and reference is not None and when < reference - MARKER_AGE


def _stale_markers(output_dir: Path, newest: dict[str, str]) -> list[Path]:
    found = []
    for directory in sorted(pruned_dir(output_dir).glob("*")):
        for marker in sorted(directory.glob("*")) if directory.is_dir() else []:
            if _stale(marker.name, newest.get(directory.name)):
                found.append(marker)
    return found


def _orphan_archives(output_dir: Path, named: set[str], cutoff: float) -> list[Path]:
    """Snapshot archives (<stamp>.tar files, <stamp> layout directories) under <output_dir>/snapshots that no
    record names and that are older than cutoff: what a run killed between an archive and its record left."""
    orphans = []
    for directory in sorted(snapshots_dir(output_dir).glob("*")):
        for entry in sorted(directory.iterdir()) if directory.is_dir() and not directory.is_symlink() else []:
            try:
                st = entry.lstat()
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode) and entry.suffix == ".tar":
                stamp = entry.name.removesuffix(".tar")
            elif stat.S_ISDIR(st.st_mode):
                stamp = entry.name
            else:
                continue
            if _parse_stamp(stamp) is None or _real(entry) in named or st.st_mtime >= cutoff:
                continue
            orphans.append(entry)
    return orphans


def _cache_garbage(cache_dir: Path, kept: list[SnapshotRecord], cutoff: float) -> list[Path]:
    """Blobs no kept snapshot needs (older than cutoff), then the cache entries that name a blob that is gone or
    going: layer records, commit directories, compressed-blob mappings. Entries are listed before blobs, so a
    run killed halfway leaves blobs nothing names (collected next time), never an entry naming a missing blob."""
    needed = {d.removeprefix("sha256:") for r in kept for d in r.diff_ids}
    # A kept layer's gzip/zstd forms are kept too: their mappings (compressed/*.json) name diff_id and digest.
    layout = CacheLayout(cache_dir)
    mappings = _read_mappings(layout)
    needed |= {digest for diff_id, digest in mappings.values() if diff_id in needed}
    blob_dir = layout.blob_dir
    present: set[str] = set()
    doomed_blobs: list[Path] = []
    for blob in sorted(blob_dir.iterdir()) if blob_dir.is_dir() else []:
        if is_partial(blob):
            continue
        try:
            mtime = blob.lstat().st_mtime
        except FileNotFoundError:
            continue
        if blob.name not in needed and mtime < cutoff:
            doomed_blobs.append(blob)
        else:
            present.add(blob.name)

    # Blobs written only into an archive assembled in place (a pack) are found through their pointers: a pointer
    # is collected as its blob would be, a pack once no pointer is left into it.
    doomed_pointers: list[Path] = []
    live_packs: set[str] = set()
    for pointer in layout.blob_pointers():
        try:
            mtime = pointer.lstat().st_mtime
            packed = jsoncheck.loads(pointer.read_bytes())["pack"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if pointer.stem not in needed and mtime < cutoff:
            doomed_pointers.append(pointer)
        else:
            present.add(pointer.stem)
            live_packs.add(str(packed))
    doomed_packs: list[Path] = []
    for packed in layout.packs():
        try:
            mtime = packed.lstat().st_mtime
        except FileNotFoundError:
            continue
        if packed.name not in live_packs and mtime < cutoff:
            doomed_packs += [packed, layout.pack_state(packed)]

    entries: list[Path] = []
    for record_file in layout.layer_records():
        try:
            diff_id = jsoncheck.loads(record_file.read_bytes())["diff_id"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if isinstance(diff_id, str) and diff_id.removeprefix("sha256:") not in present:
            entries.append(record_file)
    for commit in layout.commit_dirs():
        if is_partial(commit) or not commit.is_dir():
            continue
        try:
            diff_ids = jsoncheck.loads(layout.commit_file(commit, "config.json").read_bytes())["rootfs"]["diff_ids"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if isinstance(diff_ids, list) and any(str(d).removeprefix("sha256:") not in present for d in diff_ids):
            entries.append(commit)
    entries += [path for path, (_, digest) in sorted(mappings.items()) if digest not in present]
    return entries + doomed_pointers + doomed_blobs + [p for p in doomed_packs if p.exists()]


def _freed(paths: list[Path]) -> int:
    """Bytes deleting paths frees: each file (inside directories too) counted once, and only when every one of
    its hardlinks goes (an OCI layout's layer blobs are links into the cache)."""
    links: dict[tuple[int, int], int] = defaultdict(int)
    sizes: dict[tuple[int, int], tuple[int, int]] = {}
    for path in paths:
        for file in _files(path):
            try:
                st = file.lstat()
            except FileNotFoundError:  # removed by an overlapping run since it was listed
                continue
            key = (st.st_dev, st.st_ino)
            links[key] += 1
            sizes[key] = (st.st_size, st.st_nlink)
    return sum(size for key, (size, nlink) in sizes.items() if links[key] >= nlink)


def _files(path: Path) -> list[Path]:
    if path.is_dir() and not path.is_symlink():
        return [p for p in path.rglob("*") if not p.is_dir() or p.is_symlink()]
    return [path]


def _read_mappings(layout: CacheLayout) -> dict[Path, tuple[str, str]]:
    """Each compressed-blob mapping file, with the hex of the diff_id it compresses and of its own digest."""
    mappings = {}
    for path in layout.compressed_mappings():
        try:
            doc = jsoncheck.loads(path.read_bytes())
            mappings[path] = (doc["diff_id"].removeprefix("sha256:"), doc["digest"].removeprefix("sha256:"))
        except (OSError, ValueError, KeyError, AttributeError, TypeError):
            continue
    return mappings


def apply_retention(plan: RetentionPlan) -> None:
    for marker in plan.markers:
        make_dirs(marker.parent)
        marker.touch()
    if plan.store is not None and plan.store_refs:
        # References before records: a kill between leaves records of snapshots no longer in the store (pruned
        # again next time, and never chained on), never a reference no record will ever prune.
        plan.store.remove_references(plan.store_refs)
    failed = 0
    for path in plan.paths:
        try:
            _delete(path)
        except OSError as e:
            failed += 1
            log.warning("retention: cannot delete %s (%s); a later run tries again", path, e.strerror or e)
    if plan.store is not None and not plan.cache_in_use:
        plan.store.collect_garbage()
    log.info(
        "retention: removed %d path(s), %d bytes; kept %d snapshot(s)%s",
        len(plan.paths) - failed,
        plan.freed_bytes,
        len(plan.kept),
        "; the cache was in use, so no blob was collected" if plan.cache_in_use else "",
    )


def _delete(path: Path) -> None:
    """Remove a file, or a directory (an OCI layout, a commit's cache directory): first renamed to a temporary
    name in one step, so it is never seen half-deleted under its own name; a kill meanwhile leaves only that
    temporary name, which atomic.remove_abandoned_partials clears."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        path.unlink(missing_ok=True)
        return
    aside = partial_path(path)
    try:
        os.rename(path, aside)
    except FileNotFoundError:  # removed by an overlapping run since it was listed
        return
    shutil.rmtree(aside)


def describe(plan: RetentionPlan) -> str:
    """What a dry run prints: every path retention would delete."""
    lines = [
        f"retention would keep {len(plan.kept)} snapshot(s), prune {len(plan.pruned)}, free {plan.freed_bytes} bytes:"
    ]
    lines += [f"  drop {ref} from the store {plan.store}" for ref in plan.store_refs]
    lines += [f"  delete {p}" for p in (*plan.paths, *plan.store_blobs)]
    return "\n".join(lines)

"""Packing a commit's layers into the layer cache: image layers once per cache, the container's own layer in one state
(fingerprinted before and after, frozen while packed if it runs)."""

import logging
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

from pipeline.engines.container import Container, Layer
from pipeline.errors import SourceChanged
from pipeline.host import failpoint, freezer
from pipeline.host.atomic import write_bytes_atomic
from pipeline.image.imageconfig import EMPTY_LAYER_DIFF_ID
from pipeline.layer.delta import build_lower_lookup
from pipeline.layer.index import IndexUnavailable
from pipeline.layer.writer import LayerRecord, LayerScan, encode_record, read_record, scan_layer
from pipeline.plan import ContainerState, upper_key
from pipeline.store.cache import LayerCache

log = logging.getLogger(__name__)


def pack_into_cache(
    cache: LayerCache,
    record_path: Path,
    pack: Callable[[LayerCache], LayerRecord],
    *,
    pausing: Callable[[], AbstractContextManager[object]] = nullcontext,
    step: str = "pack",
) -> None:
    """Pack a layer into cache and write its record at record_path (a CacheLayout.layer_record), once across
    processes: under the entry's lock, and not at all when another process packed it while this one waited.
    pausing keeps the layer still while it is packed (the container's own layer); step names the failpoint."""
    with cache.lock(record_path.stem):
        if cache.has_record(record_path):
            return
        with pausing():
            failpoint.reached(step)
            record = pack(cache)
        write_bytes_atomic(record_path, encode_record(record))


def image_layers(records: Sequence[LayerRecord], *, squash: bool) -> list[LayerRecord]:
    """The layers an image of these records holds: all but a container layer with no changes (an empty tar),
    which docker commit leaves out, marking its history entry empty_layer instead (moby daemon/images/
    image_commit.go: the diff_id is appended only when it is not layer.DigestSHA256EmptyTar)."""
    if not squash and len(records) > 1 and records[-1].diff_id == EMPTY_LAYER_DIFF_ID:
        return list(records[:-1])
    return list(records)


def pause_while_packing(container: Container, marker_dir: Path, *, enabled: bool) -> AbstractContextManager[object]:
    """Freeze a running container's cgroup while its layer is packed, as `docker commit` does by default.

    Only the cgroup named after the container's id is frozen, never the one its recorded pid merely sits in (a
    stale or forged pid may name any process), and a container already paused stays paused: its engine readers
    report a paused container as not running, and freezer.paused leaves any cgroup it finds frozen alone.
    Containers frozen by a commit that was killed are thawed first (their markers sit in marker_dir).
    """
    freezer.thaw_abandoned(marker_dir)
    if not enabled or not container.running or container.pid <= 0:
        return nullcontext()
    label = f"{container.name.lstrip('/')} ({container.short_id})"
    return freezer.paused(container.pid, marker_dir, label=label, container_id=container.container_id)


def pack_image_layer(
    cache: LayerCache,
    layer: Layer,
    *,
    clamp_mtime: int | None,
    report: Callable[[int, int], None],
    planned: LayerScan | None = None,
) -> LayerRecord:
    """An image layer's blob: its original tar reassembled from tar-split when the engine kept one (so the
    image shares the base layer's diff_id and registries deduplicate it), else the directory packed (planned:
    the scan planning took of it, whose fingerprint names its record, so it is not walked twice)."""
    if layer.tar_split is not None and layer.diff_id:
        record = cache.reassemble_layer(layer.layer_dir, layer.tar_split, layer.diff_id)
        if record is not None:
            return record
    return pack_scanned_layer(
        cache,
        layer.layer_dir,
        clamp_mtime=clamp_mtime,
        report=report,
        overlay_xattrs=layer.overlay_xattrs,
        scan=planned,
    )


def pack_scanned_layer(
    cache: LayerCache,
    layer_dir: Path,
    *,
    clamp_mtime: int | None,
    report: Callable[[int, int], None],
    overlay_xattrs: str = "trusted",
    since: "Since | None" = None,
    scan: LayerScan | None = None,
) -> LayerRecord:
    """Scan layer_dir (fingerprint and size; unless given the scan already taken), then pack it, reporting
    (bytes done, bytes expected) as it goes.

    The fingerprint is taken before packing, so a layer changed meanwhile never looks unchanged later. since:
    record the entry index of the state packed, and pack only what changed since an earlier one (Since).
    """
    scan = scan or scan_layer(layer_dir)
    record = cache.pack_layer(
        layer_dir,
        clamp_mtime=clamp_mtime,
        progress=lambda done: report(done, scan.file_bytes),
        overlay_xattrs=overlay_xattrs,
        index_path=None if since is None else since.index_for(scan.fingerprint),
        previous_index=None if since is None else since.previous_index,
        lower_has=None if since is None else since.lower_has,
    )
    return replace(record, fingerprint=scan.fingerprint)


@dataclass(frozen=True)
class Since:
    """Where a container layer's entry index goes (by the fingerprint of the state packed), and what the layer is
    a delta on: previous_index, the index of the state an earlier snapshot packed (None: the layer whole)."""

    index_for: Callable[[str], Path]
    previous_index: Path | None = None
    lower_has: Callable[[bytes], bool] | None = None


def pack_container_layer(
    cache: LayerCache,
    layer_dir: Path,
    *,
    clamp_mtime: int | None,
    report: Callable[[int, int], None],
    overlay_xattrs: str = "trusted",
    since: Since | None = None,
    planned: LayerScan | None = None,
) -> LayerRecord:
    """The container's upper dir packed, its fingerprint taken before packing and again after, so the record
    describes one state of the container: an entry added, removed or rewritten meanwhile (even one packing had
    already passed) makes the layer be packed once more, and a second change is an error. planned: the scan
    planning took, which serves as the first "before" (equal after packing, nothing changed since planning)."""
    for attempt in (1, 2):
        record = pack_scanned_layer(
            cache,
            layer_dir,
            clamp_mtime=clamp_mtime,
            report=report,
            overlay_xattrs=overlay_xattrs,
            since=since,
            scan=planned if attempt == 1 else None,
        )
        if scan_layer(layer_dir).fingerprint == record.fingerprint:
            return record
        if attempt == 1:
            log.warning("%s: the container's layer changed while it was packed; packing it again", layer_dir)
    raise SourceChanged(
        f"{layer_dir}: the container's layer changed while it was packed (twice); pause the container"
        " (--pause true) or stop writes to it, then re-run"
    )


def pack_upper_layer(
    cache: LayerCache,
    container_id: str,
    state: ContainerState,
    *,
    since: str | None,
    clamp_mtime: int | None,
    pausing: Callable[[], AbstractContextManager[object]],
    report: Callable[[int, int], None],
) -> LayerRecord:
    """The container's upper dir of state packed into cache once, with the entry index a later delta starts
    from; its record. Whole when since is None (the record PackContainerLayer writes), else only what changed
    since the state of fingerprint `since`, whose index an earlier snapshot recorded, as one delta layer
    (layer.delta); that raises LayerError (DeltaNotExpressible, an index missing or damaged) when no delta can be
    made: pack the layer whole then."""
    upper = state.upper
    layout = cache.layout
    indexing = Since(lambda fingerprint: layout.entry_index(upper_key(container_id, fingerprint)))
    key = upper.key
    if since is not None:
        previous = layout.entry_index(upper_key(container_id, since))
        if not previous.is_file():
            raise IndexUnavailable(f"{previous}: the entry index of the previous snapshot is gone")
        lower_has = build_lower_lookup([Path(s.layer_dir) for s in state.lower], upper.overlay_xattrs)
        indexing = replace(indexing, previous_index=previous, lower_has=lower_has)
        key = f"delta:{since}:{upper.key}"
    record_path = layout.layer_record(key, clamp_mtime)

    def pack(into: LayerCache) -> LayerRecord:
        return pack_container_layer(
            into,
            Path(upper.layer_dir),
            clamp_mtime=clamp_mtime,
            report=report,
            overlay_xattrs=upper.overlay_xattrs,
            since=indexing,
            planned=upper.planned_scan(),
        )

    pack_into_cache(cache, record_path, pack, pausing=pausing, step="pack:PackContainerLayer")
    record = read_record(record_path)
    if not layout.entry_index(upper_key(container_id, record.fingerprint)).is_file():
        # Packed by a CommitImage, which records no index: pack once more, with one (the blob is the same).
        record_path.unlink(missing_ok=True)
        pack_into_cache(cache, record_path, pack, pausing=pausing, step="pack:PackContainerLayer")
        record = read_record(record_path)
    return record

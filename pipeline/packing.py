"""Packing a commit's layers into the layer cache: image layers once per cache, the container's own layer in one state
(fingerprinted before and after, frozen while packed if it runs)."""

import logging
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace
from pathlib import Path

from pipeline.engines.container import Container, Layer
from pipeline.errors import SourceChanged
from pipeline.host import failpoint, freezer
from pipeline.host.atomic import write_bytes_atomic
from pipeline.image.imageconfig import EMPTY_LAYER_DIFF_ID
from pipeline.layer.writer import LayerRecord, encode_record, scan_layer
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
) -> LayerRecord:
    """An image layer's blob: its original tar reassembled from tar-split when the engine kept one (so the
    image shares the base layer's diff_id and registries deduplicate it), else the directory packed."""
    if layer.tar_split is not None and layer.diff_id:
        record = cache.reassemble_layer(layer.layer_dir, layer.tar_split, layer.diff_id)
        if record is not None:
            return record
    return pack_scanned_layer(
        cache, layer.layer_dir, clamp_mtime=clamp_mtime, report=report, overlay_xattrs=layer.overlay_xattrs
    )


def pack_scanned_layer(
    cache: LayerCache,
    layer_dir: Path,
    *,
    clamp_mtime: int | None,
    report: Callable[[int, int], None],
    overlay_xattrs: str = "trusted",
) -> LayerRecord:
    """Scan layer_dir (fingerprint and size), then pack it, reporting (bytes done, bytes expected) as it goes.

    The fingerprint is taken before packing, so a layer changed meanwhile never looks unchanged later.
    """
    scan = scan_layer(layer_dir)
    record = cache.pack_layer(
        layer_dir,
        clamp_mtime=clamp_mtime,
        progress=lambda done: report(done, scan.file_bytes),
        overlay_xattrs=overlay_xattrs,
    )
    return replace(record, fingerprint=scan.fingerprint)


def pack_container_layer(
    cache: LayerCache,
    layer_dir: Path,
    *,
    clamp_mtime: int | None,
    report: Callable[[int, int], None],
    overlay_xattrs: str = "trusted",
) -> LayerRecord:
    """The container's upper dir packed, its fingerprint taken before packing and again after, so the record
    describes one state of the container: an entry added, removed or rewritten meanwhile (even one packing had
    already passed) makes the layer be packed once more, and a second change is an error."""
    for attempt in (1, 2):
        record = pack_scanned_layer(
            cache, layer_dir, clamp_mtime=clamp_mtime, report=report, overlay_xattrs=overlay_xattrs
        )
        if scan_layer(layer_dir).fingerprint == record.fingerprint:
            return record
        if attempt == 1:
            log.warning("%s: the container's layer changed while it was packed; packing it again", layer_dir)
    raise SourceChanged(
        f"{layer_dir}: the container's layer changed while it was packed (twice); pause the container"
        " (--pause true) or stop writes to it, then re-run"
    )

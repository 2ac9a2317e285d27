"""A container's snapshot into the snapshot store: its own layer packed whole, or as a delta on its previous
snapshot (the chain rule below), its config, its store entry and its catalog record.

The chain rule: a changed container's snapshot is its previous snapshot's layers plus one delta layer holding only
what changed in its upper dir since (pipeline.layer.delta), unless that previous snapshot is not in the store, its
image layers or metadata changed, its entry index is gone or damaged, the upper dir changed in a way one layer
cannot express, it already has full_every deltas, or one more layer would pass MAX_LAYERS; then the layer is
packed whole again and the chain starts over.
"""

import logging
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from pipeline import assembly, packing
from pipeline.engines.container import Container, Storage
from pipeline.errors import LayerError, StorageError
from pipeline.image.imageconfig import EMPTY_LAYER_DIFF_ID, CommitOptions, digest_of
from pipeline.image.reference import Reference
from pipeline.layer.writer import LayerRecord, read_record
from pipeline.plan import ContainerState, upper_key
from pipeline.registry.client import Blob, Registry
from pipeline.registry.push import Image, PushedBlobs, PushedTags, PushResult, push_image
from pipeline.snapshots.catalog import SnapshotRecord, reuse_record
from pipeline.snapshots.snapshot import snapshot_reference, source_digest
from pipeline.snapshots.store import Renaming, SnapshotStore, StoreEntry
from pipeline.store.cache import LayerCache
from pipeline.store.compression import StoredBlob
from pipeline.store.layout import CacheLayout

log = logging.getLogger(__name__)

# Docker's layer store refuses an image of more than 125 layers (moby layer/layer_store.go, maxLayerDepth: the
# 127 some graph drivers allow, less the container's init and writable layers); containerd's overlay snapshotter
# (about 350-500 lowers, by the mount options' page) and containers-storage's overlay driver (500, the kernel's
# OVL_MAX_STACK) allow more. 100 leaves room for images built FROM a snapshot.
MAX_LAYERS = 100
# Deltas on one full container layer before the next snapshot packs it whole again (measured: see README).
DEFAULT_FULL_EVERY = 24


@dataclass(frozen=True)
class SnapshotRequest:
    """One container's snapshot as its run planned it."""

    container: Container
    state: ContainerState
    stamp: str
    created: datetime  # the snapshot's time (UTC), in the store entry
    clamp_mtime: int | None = None
    full_every: int = DEFAULT_FULL_EVERY
    qualified: bool = False  # another container of the run has the same reference name

    @property
    def reference(self) -> str:
        return snapshot_reference(self.container, self.stamp, qualified=self.qualified)


@dataclass(frozen=True)
class _Chain:
    """What a delta extends: the previous snapshot, its store entry and image, and the index of its upper dir."""

    previous: SnapshotRecord
    entry: StoreEntry
    config: dict[str, object]
    layers: list[StoredBlob]
    index: Path


@dataclass(frozen=True)
class OwnLayer:
    """A container's own layer packed for its snapshot: whole (chain None) or a delta on chain's snapshot."""

    upper: LayerRecord
    chain: _Chain | None


def pack_own_layer(
    store: SnapshotStore,
    cache: LayerCache,
    request: SnapshotRequest,
    previous: SnapshotRecord | None,
    *,
    pausing: Callable[[], AbstractContextManager[object]],
    report: Callable[[int, int], None],
) -> OwnLayer:
    """The first half of a changed container's snapshot, which needs nothing of the image layers (so it can run
    while they are packed): the chain rule decided (a delta on previous when it allows, else the container layer
    whole) and the container's layer packed into cache (once: a second call finds it)."""

    def _pack(since: str | None) -> LayerRecord:
        return packing.pack_upper_layer(
            cache,
            request.container.container_id,
            request.state,
            since=since,
            clamp_mtime=request.clamp_mtime,
            pausing=pausing,
            report=report,
        )

    chain = _find_chain(store, cache.layout, request, previous)
    if chain is not None:
        try:
            return OwnLayer(_pack(chain.previous.fingerprint), chain)
        except LayerError as e:  # DeltaNotExpressible, or the index turned out damaged
            log.warning("%s: %s; packing the container's layer whole", request.reference, e)
    return OwnLayer(_pack(None), None)


def store_snapshot(
    store: SnapshotStore, cache: LayerCache, storage: Storage, request: SnapshotRequest, own: OwnLayer
) -> SnapshotRecord:
    """The second half, once the image layers are packed into cache: the image config and the store entry; the
    snapshot's record."""
    if own.chain is None:
        return _store_full(store, cache, storage, request, own.upper)
    return _store_delta(store, cache, storage, request, own.chain, own.upper)


def drop_superseded_index(
    layout: CacheLayout, earlier: SnapshotRecord | None, needed: tuple[SnapshotRecord, ...]
) -> None:
    """Delete the entry index of the earlier snapshot unless one of the needed snapshots (the newest two: the next
    delta starts from the newest, a redo of the newest from the one before) has the same state."""
    if earlier is not None and earlier.fingerprint and earlier.fingerprint not in {r.fingerprint for r in needed}:
        layout.entry_index(upper_key(earlier.container_id, earlier.fingerprint)).unlink(missing_ok=True)


@dataclass(frozen=True)
class Reuse:
    """An unchanged container's next snapshot: its previous snapshot (previous) named again as reference."""

    previous: SnapshotRecord
    reference: str
    stamp: str
    created: datetime  # the snapshot's time (UTC), in the store entry


def reuse_snapshots(store: SnapshotStore, reuses: Sequence[Reuse], duration: float) -> list[SnapshotRecord]:
    """Unchanged containers' snapshots: each previous image named again in the store, all in one update of
    index.json, no blob written; their records."""
    store.add_references(
        [Renaming(r.previous.reference, r.reference, r.previous.container_id, r.stamp, r.created) for r in reuses]
    )
    return [replace(reuse_record(r.previous, r.stamp, duration), reference=r.reference) for r in reuses]


def push_snapshot(
    store: SnapshotStore,
    reference: str,
    registry: Registry,
    target: Reference,
    *,
    pushed: PushedBlobs | None = None,
    tags: PushedTags | None = None,
) -> PushResult:
    """Push the snapshot reference of store to target: the blobs the registry lacks (mounted when another of its
    repositories has them, so a delta snapshot sends its delta layer and config), then its manifest."""
    entry = store.find(reference)
    if entry is None:
        raise StorageError(f"{store.index_path}: no snapshot {reference} to push; take it again")
    manifest = store.read_manifest_bytes(entry)
    config, _, layers = store.read_image(entry)
    config_type = store.read_manifest(entry)["config"]["mediaType"]
    image = Image(
        manifest,
        Blob(digest_of(config), len(config), config_type, data=config),
        tuple(Blob(b.digest, b.size, b.media_type, path=store.blob_path(b.digest)) for b in layers),
    )
    return push_image(registry, target, image, pushed, tags)


def _find_chain(
    store: SnapshotStore, layout: CacheLayout, request: SnapshotRequest, previous: SnapshotRecord | None
) -> _Chain | None:
    """What a delta would extend, or None (with the reason logged) when the chain rule says full."""
    if previous is None or previous.format != "store" or not previous.fingerprint:
        return None
    why = ""
    if previous.source != source_digest(request.state):
        why = "its image layers or settings changed"
    elif previous.deltas + 1 > request.full_every:
        why = f"it has {previous.deltas} delta layer(s), [snapshot] full_every"
    elif len(previous.diff_ids) + 1 > MAX_LAYERS:
        why = f"one more layer would pass {MAX_LAYERS} (docker loads at most 125)"
    entry = store.find(previous.reference) if not why else None
    index = layout.entry_index(upper_key(request.container.container_id, previous.fingerprint))
    if not why and entry is None:
        why = f"its previous snapshot {previous.reference} is no longer in the store"
    elif not why and not index.is_file():
        why = "the entry index of its previous snapshot is gone"
    if why or entry is None:
        log.info("%s: packing the container's layer whole: %s", request.reference, why)
        return None
    if entry.container_id and entry.container_id != request.container.container_id:
        log.info("%s: packing the container's layer whole: its name is another container's", request.reference)
        return None
    try:
        _, config, layers = store.read_image(entry)
    except StorageError as e:  # the previous snapshot's manifest or config is damaged: nothing to chain on
        log.warning("%s: packing the container's layer whole: %s", request.reference, e)
        return None
    lost = [b.digest for b in layers if not _has_blob(store, b)]
    if lost:
        log.warning("%s: packing the container's layer whole: the store lost %s", request.reference, lost[0])
        return None
    return _Chain(previous, entry, config, layers, index)


def _has_blob(store: SnapshotStore, blob: StoredBlob) -> bool:
    try:
        return store.blob_path(blob.digest).stat().st_size == blob.size
    except FileNotFoundError:
        return False


def _store_full(
    store: SnapshotStore, cache: LayerCache, storage: Storage, request: SnapshotRequest, upper: LayerRecord
) -> SnapshotRecord:
    lower = [read_record(cache.layout.layer_record(s.key, request.clamp_mtime)) for s in request.state.lower]
    records = packing.image_layers([*lower, upper], squash=False)
    blobs = assembly.layer_blobs(cache, records, "none", None)
    config = assembly.build_config_bytes(
        storage, request.container.container_id, records, request.clamp_mtime or _epoch(request.created)
    )
    paths = [cache.blob_file(b.digest, b.size) for b in blobs]
    return _add(store, request, config, blobs, paths, upper, deltas=0)


def _store_delta(
    store: SnapshotStore,
    cache: LayerCache,
    storage: Storage,
    request: SnapshotRequest,
    chain: _Chain,
    delta: LayerRecord,
) -> SnapshotRecord:
    blobs, paths = list(chain.layers), [store.blob_path(b.digest) for b in chain.layers]
    if delta.diff_id != EMPTY_LAYER_DIFF_ID:
        [blob] = assembly.layer_blobs(cache, [delta], "none", None)
        blobs.append(blob)
        paths.append(cache.blob_file(blob.digest, blob.size))
    history = chain.config.get("history")
    options = CommitOptions(
        message=f"changes since snapshot {chain.previous.stamp}",
        previous_history=tuple(h for h in history if isinstance(h, dict)) if isinstance(history, list) else (),
    )
    records = [LayerRecord(b.diff_id, b.size) for b in blobs]
    config = assembly.build_config_bytes(
        storage, request.container.container_id, records, request.clamp_mtime or _epoch(request.created), options
    )
    return _add(store, request, config, blobs, paths, delta, deltas=chain.previous.deltas + 1)


def _add(
    store: SnapshotStore,
    request: SnapshotRequest,
    config: bytes,
    blobs: list[StoredBlob],
    paths: list[Path],
    upper: LayerRecord,
    *,
    deltas: int,
) -> SnapshotRecord:
    container = request.container
    store.add_image(
        request.reference,
        config,
        blobs,
        paths,
        container_id=container.container_id,
        stamp=request.stamp,
        created=request.created,
    )
    return SnapshotRecord(
        container_id=container.container_id,
        name=container.name.lstrip("/") or container.short_id,
        stamp=request.stamp,
        reference=request.reference,
        archive=str(store.root),
        config_digest=digest_of(config),
        diff_ids=tuple(b.diff_id for b in blobs),
        layer_sizes=tuple(b.size for b in blobs),
        archive_size=sum(b.size for b in blobs) + len(config),
        fingerprint=upper.fingerprint,
        duration=0.0,
        status="new",
        source=source_digest(request.state),
        format="store",
        deltas=deltas,
    )


def _epoch(created: datetime) -> int:
    return int(created.replace(tzinfo=created.tzinfo or UTC).timestamp())

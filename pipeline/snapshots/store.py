"""The snapshot store: one OCI image layout holding many snapshots, each an entry of its index.json named
`<name>:<stamp>`, and every blob in it once, however many snapshots name it.

Spec: https://github.com/opencontainers/image-spec/blob/main/image-layout.md (with manifest.md and
annotations.md). Read as it is by `skopeo copy oci:<root>:<ref>`, `umoci unpack --image <root>:<ref>` and
`podman pull oci:<root>:<ref>` (`podman load -i <root>` refuses a layout holding more than one image; export one
with export_image). Those tools split `<root>:<ref>` at the first colon, so the root's path must hold none.

    <root>/
      oci-layout            {"imageLayoutVersion": "1.0.0"}
      index.json            one manifest descriptor per snapshot, annotated with REF_NAME, CREATED, CONTAINER_ID, STAMP
      blobs/sha256/<hex>    layer tars (hardlinks into the layer cache where the filesystem allows), configs, manifests

Two flocks keep concurrent processes (workers of one luigid, overlapping runs) apart; both are taken on directories
every layout has, so the store holds no file an OCI tool does not expect:
- the index lock, `<root>/blobs` taken exclusively, around every read-modify-write of index.json and around
  garbage collection, so no process loses another's entry;
- the gc lock, `<root>` itself, which is the layer cache's protocol over the store root (LayerCache.hold and
  collecting; the store's blobs sit where a cache's do): every process that uses the store holds it shared until
  it exits, and collect_garbage deletes only when it gets it exclusively without waiting.
Every write follows one order: blobs whole and fsync'd, then index.json replaced atomically (temporary file,
fsync, rename, directory fsync), so a kill at any point leaves an index that names only whole blobs.
"""

import errno
import fcntl
import logging
import os
import re
import shutil
import stat
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline import assembly, jsoncheck
from pipeline.errors import InvalidReference, OutputError, PipelineError, StorageError
from pipeline.host.atomic import (
    fsync_dir,
    make_dirs,
    no_space_error,
    partial_path,
    remove_abandoned_partials,
    write_bytes_atomic,
)
from pipeline.image import ocilayout
from pipeline.image.imageconfig import digest_of, encode_json
from pipeline.image.reference import parse_reference
from pipeline.plan import check_outside_storage
from pipeline.store.cache import LayerCache
from pipeline.store.compression import DOCKER_ARCHIVE_ALGORITHMS, MEDIA_TYPES, StoredBlob
from pipeline.store.layout import digest_hex

log = logging.getLogger(__name__)

# The annotations of a snapshot's index entry: the OCI-defined reference and creation time, and the project's own.
REF_NAME = "org.opencontainers.image.ref.name"
CREATED = "org.opencontainers.image.created"
CONTAINER_ID = "io.github.rocker-commit.container-id"
STAMP = "io.github.rocker-commit.snapshot-stamp"

EXPORT_FORMATS = ("both", "docker", "oci")
# containers/image (internal/iolimits) refuses manifests and image configs over 4 MiB: a descriptor that claims
# more is damage, and is never read into memory. index.json grows by ~400 bytes per snapshot.
MAX_MANIFEST_SIZE = 4 << 20
MAX_CONFIG_SIZE = 4 << 20
MAX_INDEX_SIZE = 256 << 20
_MANIFEST_TYPES = (ocilayout.MANIFEST_MEDIA_TYPE, "application/vnd.docker.distribution.manifest.v2+json")
_INDEX_TYPES = (ocilayout.INDEX_MEDIA_TYPE, "application/vnd.docker.distribution.manifest.list.v2+json")
_MAX_INDEX_DEPTH = 8
_ALGORITHM_OF = {media_type: algorithm for algorithm, media_type in MEDIA_TYPES.items()}
_HEX = re.compile(r"[0-9a-f]{64}")
# link(2) cannot link across filesystems (EXDEV), where fs.protected_hardlinks or the filesystem forbid it (EPERM,
# EACCES, EOPNOTSUPP), or past the inode's link limit (EMLINK): then the blob is cloned or copied.
_LINK_FALLBACK = (errno.EXDEV, errno.EPERM, errno.EACCES, errno.EOPNOTSUPP, errno.EMLINK)
# ioctl FICLONE (linux/fs.h, _IOW(0x94, 9, int)): a copy-on-write clone where the filesystem has them (btrfs, XFS
# with reflink, bcachefs); refused elsewhere (ext4: EOPNOTSUPP; another filesystem: EXDEV), then copied.
_FICLONE = 0x40049409
_COPY_CHUNK = 1 << 20
_DAMAGED = "the store is damaged: restore the file, or remove that snapshot's entry from index.json"


@dataclass(frozen=True)
class StoreEntry:
    """One snapshot in the store: its reference (REF_NAME), the manifest it names (digest, size, media type), and
    its annotations ("" where an entry another tool wrote lacks them; created is RFC 3339)."""

    reference: str
    digest: str
    size: int
    container_id: str = ""
    stamp: str = ""
    created: str = ""
    media_type: str = ocilayout.MANIFEST_MEDIA_TYPE


@dataclass(frozen=True)
class Renaming:
    """An unchanged container's next snapshot: the image of existing_ref named again as new_ref."""

    existing_ref: str
    new_ref: str
    container_id: str
    stamp: str
    created: datetime


@dataclass(frozen=True)
class _Blob:
    """A blob to place: a layer copied from the cache (source), or small bytes (data)."""

    digest: str
    size: int
    source: Path | None = None
    data: bytes = b""


class SnapshotStore:
    """Many snapshots in one OCI layout, each blob stored once; see the module docstring for its locks."""

    def __init__(self, root: Path) -> None:
        self.root = root
        # The gc lock (shared while in use, exclusive to collect) is the layer cache's over the store root.
        self._gc = LayerCache(root)

    @property
    def index_path(self) -> Path:
        return self.root / "index.json"

    @property
    def blob_dir(self) -> Path:
        return self.root / "blobs" / "sha256"

    def blob_path(self, digest: str) -> Path:
        """Where the blob is (the digest checked before it becomes a path)."""
        return self.blob_dir / digest_hex(digest)

    # --- adding snapshots --------------------------------------------------------------------------------------

    def add_image(
        self,
        reference: str,
        config: bytes,
        layers: Sequence[StoredBlob],
        layer_paths: Sequence[Path],
        *,
        container_id: str,
        stamp: str,
        created: datetime,
    ) -> StoreEntry:
        """Store an image (config, and layers oldest first from layer_paths, the cache's blob files) under
        reference, replacing an entry of that name. A blob already present is kept; a layer is hardlinked, else
        cloned, else copied. A naive created is taken as UTC."""
        if len(layers) != len(layer_paths):
            raise ValueError(f"{len(layers)} layers but {len(layer_paths)} layer paths")
        ref = str(parse_reference(reference))
        manifest = encode_json(ocilayout.build_image_manifest(config, layers))
        blobs = [_Blob(b.digest, b.size, source=p) for b, p in zip(layers, layer_paths, strict=True)]
        blobs += [_Blob(digest_of(config), len(config), data=config)]
        blobs += [_Blob(digest_of(manifest), len(manifest), data=manifest)]
        entry = StoreEntry(ref, digest_of(manifest), len(manifest), container_id, stamp, _format_created(created))
        self._create_layout()
        placed = self._place_blobs(blobs)
        with self._index_lock():
            # A collect_garbage the gc lock did not keep out (a forked worker shares its parent's hold) may have
            # deleted these unnamed blobs meanwhile. It deletes only under this lock, so checked here (a stat
            # each) and put back if gone, they are whole when the index names them.
            self._place_blobs(blobs)
            # Every name durable before the index names it, also those another process placed (and was
            # killed before it synced the directory).
            fsync_dir(self.blob_dir)
            doc, descriptors = self._read_index()
            self._write_index(doc, _replaced(descriptors, entry))
        new_bytes = sum(b.size for b, how in zip(blobs, placed, strict=True) if how != "present")
        log.info("%s: stored %s (%s; %d new bytes)", self.root, ref, _count(placed), new_bytes)
        return entry

    def add_reference(
        self, existing_ref: str, new_ref: str, *, container_id: str, stamp: str, created: datetime
    ) -> StoreEntry:
        """Name existing_ref's image again as new_ref (an unchanged container's next snapshot): one more index
        entry pointing at the same manifest, no blob written."""
        return self.add_references([Renaming(existing_ref, new_ref, container_id, stamp, created)])[0]

    def add_references(self, renamings: Sequence["Renaming"]) -> list[StoreEntry]:
        """add_reference for many unchanged containers at once: one read and one durable write of index.json.
        All or none: a missing or damaged existing image fails the call (naming it) before anything is written."""
        refs = [str(parse_reference(r.new_ref)) for r in renamings]
        self._create_layout()
        entries = []
        with self._index_lock():
            doc, descriptors = self._read_index()
            by_name = {name: d for d in descriptors if (name := _reference_of(d))}
            for ref, renaming in zip(refs, renamings, strict=True):
                found = by_name.get(renaming.existing_ref) or _find_descriptor(descriptors, renaming.existing_ref)
                if found is None:
                    raise StorageError(self._describe_missing(renaming.existing_ref, descriptors))
                entry = StoreEntry(
                    ref,
                    found["digest"],
                    found["size"],
                    renaming.container_id,
                    renaming.stamp,
                    _format_created(renaming.created),
                    found["mediaType"],
                )
                path = self.blob_path(entry.digest)
                if _regular_size(path) != entry.size:
                    raise StorageError(
                        f"{path}: the manifest of {renaming.existing_ref} is missing or damaged; {_DAMAGED}"
                    )
                entries.append(entry)
            named = set(refs)
            kept = [d for d in descriptors if _reference_of(d) not in named]
            self._write_index(doc, kept + [_descriptor_of(e) for e in entries])
        for renaming, entry in zip(renamings, entries, strict=True):
            log.info(
                "%s: stored %s as the image of %s (no new bytes)", self.root, entry.reference, renaming.existing_ref
            )
        return entries

    def references(self) -> set[str]:
        """The names of every snapshot in the store (none when there is no store yet). Reading index.json alone
        takes no hold on the store's blobs (a planning process must not keep retention from collecting)."""
        return {name for d in self._parse_index_file()[1] if (name := _reference_of(d))}

    def remove_references(self, refs: Iterable[str]) -> None:
        """Drop these snapshots' index entries (refs not in the store are ignored); their blobs stay until
        collect_garbage."""
        if not self.blob_dir.parent.is_dir():
            return
        with self._index_lock():
            doc, descriptors = self._read_index()
            doomed = [id(d) for ref in refs if (d := _find_descriptor(descriptors, ref)) is not None]
            if doomed:
                self._write_index(doc, [d for d in descriptors if id(d) not in doomed])

    # --- reading -----------------------------------------------------------------------------------------------

    def entries(self) -> list[StoreEntry]:
        """Every snapshot in the store, in index order (each added or replaced one last)."""
        return [_entry_of(d) for d in self._read_index()[1]]

    def find(self, reference: str) -> StoreEntry | None:
        """The entry named reference (as given, else as Docker's grammar completes it: web-1 is web-1:latest)."""
        found = _find_descriptor(self._read_index()[1], reference)
        return None if found is None else _entry_of(found)

    def read_manifest(self, entry: StoreEntry) -> dict[str, Any]:
        """The image manifest entry names, its digest and every descriptor in it checked."""
        if entry.media_type not in _MANIFEST_TYPES:
            raise StorageError(
                f"{self.index_path}: {entry.reference or entry.digest} names a {entry.media_type!r}, not an image"
                " manifest; export it with skopeo instead"
            )
        data, path = self._read_blob(entry.digest, entry.size, MAX_MANIFEST_SIZE, "manifest")
        return _parse_manifest(data, path)

    def read_manifest_bytes(self, entry: StoreEntry) -> bytes:
        """The bytes of the image manifest entry names (read_manifest checks them first)."""
        self.read_manifest(entry)
        return self._read_blob(entry.digest, entry.size, MAX_MANIFEST_SIZE, "manifest")[0]

    def read_config(self, entry: StoreEntry) -> dict[str, Any]:
        """The image config entry's manifest names, checked as an image's consumers check it."""
        return self.read_image(entry)[1]

    # --- garbage collection ------------------------------------------------------------------------------------

    def collect_garbage(self, *, dry_run: bool = False) -> list[Path]:
        """Delete the blobs no index entry needs (through its manifests, their configs and layers) and temporary
        files killed writers left; return what was deleted (dry_run: what would be, deleting nothing).

        Deletes only while no other process uses the store (its gc lock taken exclusively without waiting);
        otherwise deletes nothing, says so and returns [].
        """
        if not self.blob_dir.is_dir():
            return []
        if dry_run:
            with self._index_lock():
                return self._find_garbage()
        with self._gc.collecting() as alone:
            if not alone:
                log.warning(
                    "%s: in use by another process (a snapshot run, an export); no blob deleted, collect again later",
                    self.root,
                )
                return []
            with self._index_lock():
                doomed = self._find_garbage()
                for path in doomed:
                    path.unlink(missing_ok=True)
                doomed += remove_abandoned_partials(self.blob_dir) + remove_abandoned_partials(self.root)
                fsync_dir(self.blob_dir)
        log.info("%s: collected %d unreferenced blob(s) and temporary file(s)", self.root, len(doomed))
        return doomed

    def garbage_without(self, refs: Iterable[str]) -> list[Path]:
        """The blobs collect_garbage would delete once refs are removed (for a dry run; nothing is changed)."""
        if not self.blob_dir.is_dir():
            return []
        dropped = set(refs)
        with self._index_lock():
            return self._find_garbage([d for d in self._read_index()[1] if _reference_of(d) not in dropped])

    def _find_garbage(self, descriptors: list[dict[str, Any]] | None = None) -> list[Path]:
        """Blobs no index entry (of descriptors, default all) needs; the caller holds the index lock."""
        needed = self._needed_blobs(self._read_index()[1] if descriptors is None else descriptors)
        return sorted(
            self.blob_dir / name
            for name in os.listdir(self.blob_dir)
            if _HEX.fullmatch(name) and name not in needed and not (self.blob_dir / name).is_dir()
        )

    def _needed_blobs(self, descriptors: list[dict[str, Any]]) -> set[str]:
        """The hex of every blob the descriptors name, through manifests and nested indexes. A blob of another kind
        cannot be looked inside, so then nothing is collected."""
        needed: set[str] = set()
        walked: set[str] = set()
        pending = [(d, 0) for d in descriptors]
        while pending:
            descriptor, depth = pending.pop()
            needed.add(digest_hex(descriptor["digest"]))
            if descriptor["digest"] in walked:
                continue
            walked.add(descriptor["digest"])
            media_type = descriptor["mediaType"]
            if media_type in _MANIFEST_TYPES:
                data, path = self._read_blob(descriptor["digest"], descriptor["size"], MAX_MANIFEST_SIZE, "manifest")
                manifest = _parse_manifest(data, path)
                needed.update(digest_hex(d["digest"]) for d in [manifest["config"], *manifest["layers"]])
            elif media_type in _INDEX_TYPES and depth < _MAX_INDEX_DEPTH:
                data, path = self._read_blob(descriptor["digest"], descriptor["size"], MAX_MANIFEST_SIZE, "index")
                pending += [(d, depth + 1) for d in _parse_index(data, path)[1]]
            else:
                raise StorageError(
                    f"{self.index_path}: names {descriptor['digest']}, a {media_type!r} the store cannot look inside;"
                    " nothing was collected: remove that entry, or delete unneeded blobs by hand"
                )
        return needed

    # --- exporting ---------------------------------------------------------------------------------------------

    def export_image(self, reference: str, dest: Path, fmt: str = "both") -> StoreEntry:
        """Write reference's image as a standalone archive at dest (atomically): a docker-archive and OCI archive
        in one tar (both), or either alone, as a commit writes them (assembly.write_commit_output)."""
        if fmt not in EXPORT_FORMATS:
            raise PipelineError(f"--format {fmt}: not an archive format; choose one of {', '.join(EXPORT_FORMATS)}")
        check_outside_storage(self.root, {"-o": dest})  # never over the store's own index or blobs
        descriptors = self._read_index()[1]
        found = _find_descriptor(descriptors, reference)
        if found is None:
            raise StorageError(self._describe_missing(reference, descriptors))
        entry = _entry_of(found)
        config, doc, layers = self.read_image(entry)
        unloadable = [b for b in layers if b.algorithm not in DOCKER_ARCHIVE_ALGORITHMS]
        if fmt != "oci" and unloadable:
            raise OutputError(
                f"{entry.reference}: has {unloadable[0].algorithm} layers, which a docker-archive cannot hold"
                " (docker load reads plain and gzip layers); export it with --format oci"
            )
        image = parse_reference(entry.reference)
        docker_files = {
            "manifest.json": assembly.build_manifest_bytes(config, layers, image),
            "repositories": assembly.build_repositories_bytes(config, image),
        }
        mtime = assembly.archive_mtime(config) if "created" in doc else 0
        # The store's blobs sit where a cache's do, so the commit's writer reads them through LayerCache(root).
        assembly.write_commit_output(dest, fmt, self._gc, layers, config, docker_files, image, mtime=mtime)
        log.info("%s: exported %s (%s)", dest, entry.reference, fmt)
        return entry

    def read_image(self, entry: StoreEntry) -> tuple[bytes, dict[str, Any], list[StoredBlob]]:
        """entry's config bytes, the config parsed, and its layers as stored blobs, oldest first."""
        manifest = self.read_manifest(entry)
        descriptor = manifest["config"]
        config, path = self._read_blob(descriptor["digest"], descriptor["size"], MAX_CONFIG_SIZE, "config")
        doc = _parse_config(config, path)
        diff_ids = doc["rootfs"]["diff_ids"]
        if len(diff_ids) != len(manifest["layers"]):
            raise StorageError(f"{path}: {len(diff_ids)} diff_ids for {len(manifest['layers'])} layers; {_DAMAGED}")
        layers = []
        for layer, diff_id in zip(manifest["layers"], diff_ids, strict=True):
            algorithm = _ALGORITHM_OF.get(layer["mediaType"])
            if algorithm is None:
                raise StorageError(
                    f"{self.blob_path(entry.digest)}: layer {layer['digest']} has media type {layer['mediaType']!r},"
                    " not an OCI layer tar; copy that image with skopeo instead"
                )
            # The level is not recorded in a manifest, and nothing that reads a StoredBlob here needs it.
            layers.append(StoredBlob(layer["digest"], layer["size"], diff_id, algorithm, 0, layer["mediaType"]))
        return config, doc, layers

    # --- the layout's files ------------------------------------------------------------------------------------

    def _create_layout(self) -> None:
        """The blob directory and oci-layout (an existing one checked), and this process's hold on the store."""
        make_dirs(self.blob_dir)
        self._gc.hold()
        layout = self.root / "oci-layout"
        try:
            current = layout.read_bytes()
        except FileNotFoundError:
            _write_small(layout, ocilayout.OCI_LAYOUT)
            return
        try:
            version = jsoncheck.loads(current).get("imageLayoutVersion")
        except (ValueError, AttributeError):
            version = None
        if version != "1.0.0":
            raise StorageError(f"{layout}: not an OCI image layout of version 1.0.0; give the store an empty directory")

    def _place_blobs(self, blobs: list[_Blob]) -> list[str]:
        """Put each blob in place unless it is there at its size; say how each got there."""
        return [self._place_blob(b) for b in blobs]

    def _place_blob(self, blob: _Blob) -> str:
        target = self.blob_path(blob.digest)
        if _regular_size(target) == blob.size:
            return "present"
        if blob.source is None:
            _write_small(target, blob.data)
            return "written"
        if _regular_size(blob.source) != blob.size:
            raise OutputError(f"{blob.source}: cached layer is missing or damaged; re-run to repack it")
        temp = partial_path(target)
        try:
            how = _link_or_copy(blob.source, temp)
            if temp.stat().st_size != blob.size:  # containers/image checks a blob's size after each copy too
                raise OutputError(f"{blob.source}: changed while it was stored; re-run to repack it")
            os.replace(temp, target)
            # rename(2) does nothing when both names are links to one inode (another process linked the same
            # cache blob first): the temporary name would stay behind.
            temp.unlink(missing_ok=True)
        except OSError as e:
            temp.unlink(missing_ok=True)
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise no_space_error(target, e, needed=blob.size) from e
            raise OutputError(
                f"{target}: cannot store the layer from {blob.source} ({e.strerror}); fix and re-run"
            ) from e
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        return how

    @contextmanager
    def _index_lock(self) -> Iterator[None]:
        """Exclusive between processes (flock on <root>/blobs) for a read-modify-write of index.json.

        The gc lock is always taken first (held shared, or exclusive by collect_garbage): taking it under this
        lock could wait for a collect_garbage that itself waits for this lock.
        """
        self._gc.hold()
        fd = os.open(self.blob_dir.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.debug("waiting for another process updating %s", self.index_path)
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _read_index(self) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """index.json and its checked manifest descriptors; both empty when the store has none yet."""
        self._gc.hold()
        return self._parse_index_file()

    def _parse_index_file(self) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        try:
            data = _read_limited(self.index_path, MAX_INDEX_SIZE)
        except FileNotFoundError:
            return {}, []
        except OSError as e:
            raise StorageError(
                f"{self.index_path}: cannot read the store's index ({e.strerror}); fix and re-run"
            ) from e
        if len(data) > MAX_INDEX_SIZE:
            raise StorageError(f"{self.index_path}: over {MAX_INDEX_SIZE} bytes; {_DAMAGED}")
        return _parse_index(data, self.index_path)

    def _write_index(self, doc: dict[str, Any], descriptors: list[dict[str, Any]]) -> None:
        index = {**doc, "schemaVersion": 2, "mediaType": ocilayout.INDEX_MEDIA_TYPE, "manifests": descriptors}
        _write_small(self.index_path, encode_json(index))

    def _read_blob(self, digest: str, size: int, limit: int, what: str) -> tuple[bytes, Path]:
        """A small blob's bytes, whole and matching its digest, and its path; never through a symlink."""
        path = self.blob_path(digest)
        if size > limit:
            raise StorageError(
                f"{path}: the {what} is {size} bytes by the descriptor naming it, more than the {limit} any"
                f" consumer reads; {_DAMAGED}"
            )
        self._gc.hold()
        try:
            data = _read_limited(path, limit)
        except OSError as e:
            raise StorageError(f"{path}: cannot read the {what} ({e.strerror or e}); {_DAMAGED}") from e
        if len(data) != size or digest_of(data) != digest:
            raise StorageError(f"{path}: the {what} has {len(data)} bytes and does not match its digest; {_DAMAGED}")
        return data, path

    def _describe_missing(self, reference: str, descriptors: list[dict[str, Any]]) -> str:
        """reference is not in the store: which snapshots are (the same name's first, newest last)."""
        names = [name for d in descriptors if (name := _reference_of(d))]
        if not self.index_path.exists():
            return f"{self.root}: no snapshot store here (no index.json), so no {reference!r}; check the store's path"
        if not names:
            return f"{self.root}: no snapshot {reference!r}, the store holds none"
        stem = reference.rpartition(":")[0] or reference
        similar = [n for n in names if n.rpartition(":")[0] == stem] or names
        shown = ", ".join(similar[-5:]) + (f" and {len(similar) - 5} more" if len(similar) > 5 else "")
        return f"{self.root}: no snapshot {reference!r} in the store; it holds {shown}"


# --- index.json and manifests ------------------------------------------------------------------------------------


def _descriptor_of(entry: StoreEntry) -> dict[str, Any]:
    annotations = {REF_NAME: entry.reference, CREATED: entry.created, CONTAINER_ID: entry.container_id}
    return {
        "mediaType": entry.media_type,
        "digest": entry.digest,
        "size": entry.size,
        "annotations": {**annotations, STAMP: entry.stamp},
    }


def _entry_of(descriptor: dict[str, Any]) -> StoreEntry:
    annotations = descriptor.get("annotations") or {}
    return StoreEntry(
        reference=annotations.get(REF_NAME, ""),
        digest=descriptor["digest"],
        size=descriptor["size"],
        container_id=annotations.get(CONTAINER_ID, ""),
        stamp=annotations.get(STAMP, ""),
        created=annotations.get(CREATED, ""),
        media_type=descriptor["mediaType"],
    )


def _reference_of(descriptor: dict[str, Any]) -> str:
    return str((descriptor.get("annotations") or {}).get(REF_NAME, ""))


def _replaced(descriptors: list[dict[str, Any]], entry: StoreEntry) -> list[dict[str, Any]]:
    """descriptors without any of entry's name, then entry's."""
    return [d for d in descriptors if _reference_of(d) != entry.reference] + [_descriptor_of(entry)]


def _find_descriptor(descriptors: list[dict[str, Any]], reference: str) -> dict[str, Any] | None:
    """The last descriptor named reference as given, else as Docker's grammar completes it."""
    names = [reference]
    try:
        names.append(str(parse_reference(reference)))
    except InvalidReference:
        pass
    for name in names:
        found = [d for d in descriptors if _reference_of(d) == name]
        if found:
            return found[-1]
    return None


def _parse_index(data: bytes, path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    doc = _loads(data, path)
    with jsoncheck.fields_of(path, _DAMAGED):
        if not isinstance(doc, dict):
            raise jsoncheck.FieldError("the index", "a JSON object", doc)
        descriptors = doc.get("manifests")
        if descriptors is None:
            descriptors = []
        if not isinstance(descriptors, list):
            raise jsoncheck.FieldError("manifests", "an array of descriptors", descriptors)
        for index, descriptor in enumerate(descriptors):
            _check_descriptor(descriptor, f"manifests[{index}]")
    return doc, descriptors


def _parse_manifest(data: bytes, path: Path) -> dict[str, Any]:
    doc = _loads(data, path)
    with jsoncheck.fields_of(path, _DAMAGED):
        if not isinstance(doc, dict):
            raise jsoncheck.FieldError("the manifest", "a JSON object", doc)
        jsoncheck.whole_number(doc.get("schemaVersion"), "schemaVersion", 2, 2)
        _check_descriptor(doc.get("config"), "config")
        layers = doc.get("layers")
        if not isinstance(layers, list):
            raise jsoncheck.FieldError("layers", "an array of descriptors", layers)
        for index, layer in enumerate(layers):
            _check_descriptor(layer, f"layers[{index}]")
    return doc


def _parse_config(data: bytes, path: Path) -> dict[str, Any]:
    doc = _loads(data, path)
    with jsoncheck.fields_of(path, _DAMAGED):
        if not isinstance(doc, dict):
            raise jsoncheck.FieldError("the image config", "a JSON object", doc)
        rootfs = doc.get("rootfs")
        if not isinstance(rootfs, dict):
            raise jsoncheck.FieldError("rootfs", "an object", rootfs)
        diff_ids = rootfs.get("diff_ids")
        if not isinstance(diff_ids, list):
            raise jsoncheck.FieldError("rootfs.diff_ids", "an array of digests", diff_ids)
        for index, diff_id in enumerate(diff_ids):
            _check_digest(diff_id, f"rootfs.diff_ids[{index}]")
        jsoncheck.optional(doc, "created", "created", jsoncheck.date, "")
        jsoncheck.check_image_config(doc)
    return doc


def _check_descriptor(value: Any, field: str) -> None:
    """An OCI content descriptor with what the store relies on: a media type, a sha256 digest, a size, and
    annotations of strings."""
    if not isinstance(value, dict):
        raise jsoncheck.FieldError(field, "a descriptor object", value)
    jsoncheck.string(value.get("mediaType"), f"{field}.mediaType")
    _check_digest(value.get("digest"), f"{field}.digest")
    jsoncheck.whole_number(value.get("size"), f"{field}.size", 0)
    jsoncheck.string_map(value.get("annotations"), f"{field}.annotations")


def _check_digest(value: Any, field: str) -> None:
    """A sha256 digest, checked before it ever becomes a path (sha256:../../x never does)."""
    if not isinstance(value, str) or not value.startswith("sha256:") or not _HEX.fullmatch(value[7:]):
        raise jsoncheck.FieldError(field, "a sha256 digest (sha256: and 64 lowercase hex digits)", value)


def _loads(data: bytes, path: Path) -> Any:
    try:
        return jsoncheck.loads(data)
    except ValueError as e:
        raise StorageError(f"{path}: not a JSON document ({e}); {_DAMAGED}") from None


# --- files -------------------------------------------------------------------------------------------------------


def _read_limited(path: Path, limit: int) -> bytes:
    """A regular file's bytes, at most limit + 1 of them; never through a symlink (OSError otherwise)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with open(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        return f.read(limit + 1)


def _regular_size(path: Path) -> int | None:
    """The size of the regular file at path (not following a symlink), or None when there is none."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None


def _write_small(path: Path, data: bytes) -> None:
    """A small file written atomically and durably (host.atomic), with a one-line error."""
    try:
        write_bytes_atomic(path, data)
    except OSError as e:
        raise OutputError(f"{path}: cannot write ({e.strerror}); fix and re-run") from e


def _link_or_copy(source: Path, temp: Path) -> str:
    """temp made a hardlink to source, else a reflink clone, else a copy (fsync'd); which one it became."""
    try:
        os.link(source, temp)
        return "linked"
    except OSError as e:
        if e.errno not in _LINK_FALLBACK:
            raise
    with open(source, "rb") as src, open(temp, "xb") as dst:
        try:
            fcntl.ioctl(dst.fileno(), _FICLONE, src.fileno())
            how = "cloned"
        except OSError:
            shutil.copyfileobj(src, dst, _COPY_CHUNK)
            how = "copied"
        dst.flush()
        os.fsync(dst.fileno())
    return how


def _format_created(when: datetime) -> str:
    """RFC 3339 in UTC, whole seconds; a naive datetime is UTC (luigi's date parameters are)."""
    aware = when if when.tzinfo is not None else when.replace(tzinfo=UTC)
    return aware.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _count(placed: list[str]) -> str:
    return ", ".join(f"{placed.count(how)} {how}" for how in dict.fromkeys(placed))

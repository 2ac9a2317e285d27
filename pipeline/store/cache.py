"""The layer cache: content-addressed blobs (blobs/sha256/<hex>) shared by every commit that uses a cache_dir."""

import errno
import fcntl
import hashlib
import io
import json
import logging
import os
import stat
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TypeVar, cast

from pipeline import jsoncheck
from pipeline.errors import LayerError, PipelineError, SourceChanged
from pipeline.host import failpoint
from pipeline.host.atomic import (
    atomic_path,
    fsync_dir,
    make_dirs,
    no_space_error,
    partial_path,
    remove_abandoned_partials,
    write_bytes_atomic,
)
from pipeline.host.writeback import WritebackFile
from pipeline.layer.delta import write_delta
from pipeline.layer.index import IndexWriter
from pipeline.layer.tarsplit import TarSplitMismatch, write_layer_from_tarsplit
from pipeline.layer.writer import LayerRecord, read_record, walk_metadata, write_layer
from pipeline.store import pack
from pipeline.store.layout import CacheLayout, digest_hex

log = logging.getLogger(__name__)

_BUFFER = 1 << 20
_R = TypeVar("_R")
# The cache-wide lock between users of blobs (shared) and retention's deletion of blobs (exclusive) is a flock on
# the cache directory itself (per-entry locks are files under locks/, the catalog's its own file).
# _HELD: the caches this process uses (their real path), each with the descriptor of its shared hold. A process
# uses a cache from the moment it first looks at a blob until it exits: luigi decides a blob is there (complete())
# long before a later task copies or uploads it, so no narrower span is safe. Forked workers share the hold.
_HELD: dict[str, int] = {}
_COLLECTING: set[str] = set()  # caches this process holds exclusively (in collecting())
_HELD_LOCK = threading.Lock()


@dataclass(frozen=True)
class Slot:
    """Where a layer goes when it is packed for an archive assembled in place: slot `index` of the pack at
    `path` (store.pack), instead of a blob file of its own."""

    path: Path
    index: int


@dataclass(frozen=True)
class BlobSource:
    """Where a blob's bytes are: size bytes at offset of path (a blob file from 0, or a pack)."""

    path: Path
    offset: int
    size: int
    assembling: bool = False  # in a pack whose assembly was interrupted: not readable until it is finished

    @property
    def in_pack(self) -> bool:
        return self.path.suffix == ".tar"


class LayerCache:
    """Blobs named by their digest, so a layer packed once is found again by any commit that produces it: each a
    file of its own, or a layer tar written only into an image archive assembled in place (a pack), found through
    its pointer.

    into: pack layers into that slot of a pack instead (Slot); compressed forms always get blob files.
    """

    def __init__(self, root: Path, *, into: Slot | None = None) -> None:
        self.root = root
        self.layout = CacheLayout(root)
        self.into = into

    def blob_path(self, digest: str) -> Path:
        """Where the blob is; naming a blob is using it, so this process holds the cache against retention."""
        self.hold()
        return self.layout.blob(digest)

    def hold(self) -> None:
        """Keep retention from deleting blobs while this process may still use them: a shared flock on the cache
        directory, taken once and held until the process exits. Retention deletes blobs only with the
        exclusive lock (collecting()); while it holds it, this waits. A cache that does not exist yet holds
        nothing to protect (it is held once packing creates it)."""
        key = os.path.realpath(self.root)
        with _HELD_LOCK:
            if key in _HELD or key in _COLLECTING:
                return
            _release_vanished()
            fd = self._open_gc_lock()
            if fd is None:
                return
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("waiting for retention to finish deleting blobs in %s", self.root)
                fcntl.flock(fd, fcntl.LOCK_SH)
            _HELD[key] = fd

    @contextmanager
    def collecting(self) -> Iterator[bool]:
        """Exclusive use of the blobs for retention: True inside when no other process uses the cache (its own
        shared hold, if any, is converted and given back afterwards), False when another one does (a commit,
        push or snapshot run): then nothing may be deleted, and this never waits."""
        key = os.path.realpath(self.root)
        with _HELD_LOCK:
            own = _HELD.pop(key, None)
        fd = own if own is not None else self._open_gc_lock()
        if fd is None:
            yield False
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            acquired = True
        except BlockingIOError:
            acquired = False
        with _HELD_LOCK:
            _COLLECTING.add(key)
        try:
            yield acquired
        finally:
            with _HELD_LOCK:
                _COLLECTING.discard(key)
            if own is None:
                os.close(fd)
            else:
                # Back to shared. A conversion that failed dropped the shared lock (flock(2)); if it cannot be
                # had back at once, the next use of a blob takes it again.
                try:
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                else:
                    with _HELD_LOCK:
                        _HELD.setdefault(key, fd)

    def _open_gc_lock(self) -> int | None:
        """The cache directory itself, opened to be flock'ed: the gc lock needs no file of its own."""
        try:
            return os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:  # no cache (yet): nothing to protect, or nothing to collect
            log.debug("%s: cannot take the cache's gc lock (%s)", self.root, e)
            return None

    def has_blob(self, record: LayerRecord, *, recorded_ns: int | None = None) -> bool:
        """Whether record's blob is intact (blob_intact; recorded_ns None: size only, for callers that just
        verified it), as a file or in a pack."""
        path = self.blob_path(record.diff_id)
        if not path.exists():
            source = self.locate(record.diff_id, record.size)
            if source is not None:
                return source.assembling or recorded_ns is None or _region_intact(source, record.diff_id)
        return blob_intact(path, record.diff_id, record.size, recorded_ns, "packing it")

    def locate(self, digest: str, size: int) -> BlobSource | None:
        """Where the blob digest of size bytes is: its file, else the pack its pointer names if the pack still
        holds it there; None when neither."""
        path = self.blob_path(digest)
        try:
            if path.stat().st_size == size:
                return BlobSource(path, 0, size)
        except FileNotFoundError:
            pass
        pointed = self._pointer(digest)
        if pointed is None:
            return None
        packed, offset = pointed
        try:
            fd = os.open(packed, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            if not _holds(fd, offset, digest, size) and str(packed) not in pack.ASSEMBLING:
                # Moved by an assembly in progress (another process's), which points it anew before it lets go
                # of the pack: wait for that, then look again.
                fcntl.flock(fd, fcntl.LOCK_SH)
                pointed = self._pointer(digest)
                if pointed is None or pointed[0] != packed:
                    return None if pointed is None else self.locate(digest, size)
                offset = pointed[1]
            if _holds(fd, offset, digest, size):
                return BlobSource(packed, offset, size)
        finally:
            os.close(fd)
        if not pack.read_state(self.layout.pack_state(packed)).keys().isdisjoint(("collapsing", "collapsed")):
            # Its archive's assembly was interrupted halfway (the blob is in there, moving): the commit's re-run
            # finishes it and points the blob at its new place; nobody else can read it until then.
            return BlobSource(packed, offset, size, assembling=True)
        return None

    def _pointer(self, digest: str) -> tuple[Path, int] | None:
        """The pack and offset the blob's pointer names, or None (no pointer, or a damaged one)."""
        pointer = self.layout.blob_pointer(digest)
        try:
            doc = jsoncheck.loads(pointer.read_bytes())
            packed = self.layout.pack_named(jsoncheck.string(doc.get("pack"), "pack"))
            return packed, jsoncheck.whole_number(doc.get("offset"), "offset", 0)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, PipelineError) as e:
            log.warning("%s: damaged blob pointer (%s); packing the layer again", pointer, e)
            return None

    def forget_pointer(self, digest: str) -> None:
        """Drop a pointer to a pack that no longer holds the blob there: it is packed again when next needed."""
        self.layout.blob_pointer(digest).unlink(missing_ok=True)

    def point(self, digest: str, packed: Path, offset: int) -> None:
        """Record that the blob digest is at offset of the pack packed."""
        doc = {"pack": packed.name, "offset": offset}
        write_bytes_atomic(self.layout.blob_pointer(digest), json.dumps(doc, sort_keys=True).encode())

    def blob_file(self, digest: str, size: int) -> Path:
        """The blob as a file of its own (for hardlinks, uploads and compression), copied out of its pack the
        first time one is asked for."""
        path = self.blob_path(digest)
        source = self.locate(digest, size)
        if source is None or not source.in_pack:
            return path
        if source.assembling:
            self.forget_pointer(digest)
            raise LayerError(f"{source.path}: layer {digest} is in an archive whose assembly was interrupted; re-run")
        with self.lock(f"blob-{digest_hex(digest)}"):
            if path.exists():
                return path

            def copy(out: BinaryIO) -> str:
                with open(source.path, "rb", buffering=0) as f:
                    fcntl.flock(f.fileno(), fcntl.LOCK_SH)  # not while the pack is being assembled
                    if not pack.holds(f.fileno(), source.offset, digest):
                        raise LayerError(f"{source.path}: no longer holds layer {digest}; re-run to pack it again")
                    f.seek(source.offset)
                    hashed = _copy_hashing(f, out, size)
                if hashed != digest:
                    raise LayerError(f"{source.path}: layer {digest} there hashes to {hashed}; re-run to repack it")
                return hashed

            self.write_blob(copy, lambda d: d, needed=lambda: size, step="materialize", into_slot=False)
        return path

    def has_record(self, path: Path) -> bool:
        """Whether the layer record at path exists and its blob is intact: a blob deleted, truncated or altered
        since the record was written must be packed again (a damaged record raises LayerError naming it)."""
        try:
            recorded_ns = path.stat().st_mtime_ns
        except FileNotFoundError:
            return False
        record = read_record(path)
        if not self.has_blob(record, recorded_ns=recorded_ns):
            return False
        try:
            if self.blob_path(record.diff_id).stat().st_ctime_ns > recorded_ns:
                # Verified by its digest just now: a hardlink into an OCI layout or snapshot store moves the blob's
                # ctime without changing a byte, and without this the blob would be hashed at every later check.
                # (A blob in a pack has no file of its own; its pack is checked by size and mtime instead.)
                os.utime(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            log.debug("%s: cannot refresh the record's time (%s)", path, e)
        return True

    @contextmanager
    def lock(self, key: str) -> Iterator[None]:
        """Exclusive across processes (flock), so two workers never pack the same layer at the same moment."""
        path = self.layout.lock(key)
        make_dirs(path.parent)
        self.hold()
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("waiting for another process working on cache entry %s", key)
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def pack_layer(
        self,
        layer_dir: Path,
        *,
        clamp_mtime: int | None = None,
        progress: Callable[[int], None] | None = None,
        overlay_xattrs: str | None = "trusted",
        index_path: Path | None = None,
        previous_index: Path | None = None,
        lower_has: Callable[[bytes], bool] | None = None,
    ) -> LayerRecord:
        """Pack layer_dir into the cache and return its record; a file changing meanwhile gets one retry.
        overlay_xattrs says where the layer's overlay markers live (layer.write_layer). index_path: where the entry
        index of the state packed goes (a CacheLayout.entry_index), for the next delta. previous_index: pack only
        what changed since that index was recorded (layer.delta.write_delta, which asks lower_has)."""

        def write(out: BinaryIO) -> LayerRecord:
            with _index_file(index_path) as index:
                if previous_index is None:
                    return write_layer(
                        layer_dir, out, clamp_mtime=clamp_mtime, progress=progress, overlay_xattrs=overlay_xattrs,
                        index=index,
                    )  # fmt: skip
                return write_delta(
                    layer_dir,
                    previous_index,
                    out,
                    lower_has=lower_has or (lambda path: True),
                    index=index,
                    clamp_mtime=clamp_mtime,
                    overlay_xattrs=overlay_xattrs,
                    progress=progress,
                )

        try:
            return self._store(layer_dir, write)
        except SourceChanged as e:
            log.warning("%s; packing the layer again", e)
        try:
            return self._store(layer_dir, write)
        except SourceChanged as e:
            raise SourceChanged(f"{e} (twice); pause the container or stop writes to it, then re-run") from e

    def reassemble_layer(self, layer_dir: Path, tar_split: Path, diff_id: str) -> LayerRecord | None:
        """The layer's original tar rebuilt from its tar-split records and layer_dir, if it still hashes to
        diff_id; None (with a warning) when the records or the files no longer match."""
        try:
            return self._store(layer_dir, lambda out: write_layer_from_tarsplit(layer_dir, tar_split, out), diff_id)
        except TarSplitMismatch as e:
            log.warning("%s; packing the directory instead (the layer gets a new diff_id)", e)
            return None

    def _store(
        self, layer_dir: Path, write: Callable[[BinaryIO], LayerRecord], expected: str | None = None
    ) -> LayerRecord:
        """Write a layer blob (write_blob), refusing one that does not hash to expected when given."""

        def checked(out: BinaryIO) -> LayerRecord:
            record = write(out)
            if expected is not None and record.diff_id != expected:
                raise TarSplitMismatch(
                    f"{layer_dir}: reassembled to {record.diff_id}, not the recorded {expected}; files changed"
                )
            return record

        record = self.write_blob(checked, lambda r: r.diff_id, needed=lambda: _estimate_size(layer_dir))
        log.info("packed %s into %s (%d bytes)", layer_dir, record.diff_id, record.size)
        return record

    def write_blob(
        self,
        write: Callable[[BinaryIO], _R],
        digest_of: Callable[[_R], str],
        *,
        needed: Callable[[], int],
        step: str = "pack",
        into_slot: bool = True,
    ) -> _R:
        """Write a blob through a temporary file in the blob directory, fsync'd and then named by its digest
        (digest_of what write returned), so a blob under its name is always whole; or, when this cache packs
        into a slot (and into_slot), into that slot of its pack (_write_into_slot). needed estimates the bytes
        for a full-disk error; step names the failpoints (<step>:started, :before-rename, :after-rename)."""
        if self.into is not None and into_slot:
            return self._write_into_slot(self.into, write, digest_of, needed=needed, step=step)
        blob_dir = self.layout.blob_dir
        make_dirs(blob_dir)
        self.hold()  # before anything is written: a blob with no record yet is only safe from retention this way
        remove_abandoned_partials(blob_dir)
        temp = partial_path(blob_dir / "blob")
        try:
            with open(temp, "wb", buffering=_BUFFER) as f:
                failpoint.reached(f"{step}:started")
                result = write(cast(BinaryIO, WritebackFile(f)))  # its pages head for the disk as it grows
                f.flush()
                os.fsync(f.fileno())
            failpoint.reached(f"{step}:before-rename")
            # Same name, same content: replacing an existing blob changes nothing a reader could see.
            os.replace(temp, self.blob_path(digest_of(result)))
        except OSError as e:
            temp.unlink(missing_ok=True)
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise no_space_error(blob_dir, e, needed=needed()) from e
            raise
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        fsync_dir(blob_dir)
        failpoint.reached(f"{step}:after-rename")
        return result

    def _write_into_slot(
        self,
        slot: Slot,
        write: Callable[[BinaryIO], _R],
        digest_of: Callable[[_R], str],
        *,
        needed: Callable[[], int],
        step: str,
    ) -> _R:
        """Write a blob into its slot of a pack, fsync it, seal the slot (store.pack) and point the blob there:
        the layer's only copy until the pack is assembled into the archive. A pack already assembled is never
        written again: the blob then gets a file of its own."""
        make_dirs(slot.path.parent)
        self.hold()
        fd = os.open(slot.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)  # assembly takes it exclusively
            if pack.read_state(self.layout.pack_state(slot.path)):
                return self.write_blob(write, digest_of, needed=needed, step=step, into_slot=False)
            pack.clear_slot(fd, slot.index)
            with open(fd, "r+b", buffering=_BUFFER, closefd=False) as f:
                f.seek(pack.data_offset(slot.index))
                failpoint.reached(f"{step}:started")
                try:
                    result = write(cast(BinaryIO, WritebackFile(f)))
                    f.flush()
                except OSError as e:
                    if e.errno in (errno.ENOSPC, errno.EDQUOT):
                        raise no_space_error(slot.path.parent, e, needed=needed()) from e
                    raise
                size = f.tell() - pack.data_offset(slot.index)
            digest = digest_of(result)
            if size > pack.MAX_LAYER:
                raise LayerError(f"{slot.path}: layer {digest} is too large for a pack; re-run with --format oci-dir")
            os.fsync(fd)
            failpoint.reached(f"{step}:before-rename")
            pack.seal(fd, slot.index, digest, size)
            os.fsync(fd)
        finally:
            os.close(fd)
        self.point(digest, slot.path, pack.data_offset(slot.index))
        failpoint.reached(f"{step}:after-rename")
        return result


@contextmanager
def _index_file(path: Path | None) -> Iterator[IndexWriter | None]:
    """An IndexWriter into a temporary sibling of path, renamed into place once the walk wrote it whole."""
    if path is None:
        yield None
        return
    with atomic_path(path) as temp, open(temp, "wb") as f:
        yield IndexWriter(f)


def blob_intact(path: Path, digest: str, size: int, recorded_ns: int | None, redo: str) -> bool:
    """Whether the blob at path is intact: size, and digest if it changed since recorded_ns (None: size only).

    Any write to a file moves its ctime past the moment its record was written, so an unchanged ctime means
    unchanged bytes; only a blob touched since (truncated, altered, or written again by another process) is
    hashed. redo names what follows a failed check in the warning ("packing it", "compressing it").
    """
    try:
        st = path.stat()
    except FileNotFoundError:
        log.warning("cached blob %s is missing; %s again", path, redo)
        return False
    if st.st_size != size:
        log.warning("cached blob %s has %d bytes, %d recorded; %s again", path, st.st_size, size, redo)
        return False
    if recorded_ns is None or st.st_ctime_ns <= recorded_ns:
        return True
    with open(path, "rb") as f:
        intact = "sha256:" + hashlib.file_digest(f, "sha256").hexdigest() == digest
    if not intact:
        log.warning("cached blob %s does not match its digest; %s again", path, redo)
    return intact


def _holds(fd: int, offset: int, digest: str, size: int) -> bool:
    return os.fstat(fd).st_size >= offset + size and pack.holds(fd, offset, digest)


def _region_intact(source: BlobSource, digest: str) -> bool:
    """Whether a blob in a pack is intact: hashed only when the pack is finished and was written into since
    (store.pack.finished_unchanged); a pack being assembled is written by its commit's own tasks, and its slots
    are sealed only when whole."""
    try:
        if pack.finished_unchanged(source.path) is not False:
            return True
    except FileNotFoundError:
        return False
    with open(source.path, "rb", buffering=0) as f:
        f.seek(source.offset)
        intact = _copy_hashing(f, None, source.size) == digest
    if not intact:
        log.warning("layer %s in %s does not match its digest; packing it again", digest, source.path)
    return intact


def _copy_hashing(src: io.FileIO, out: BinaryIO | None, size: int) -> str:
    """The digest of size bytes read from src, written to out as they are read when given."""
    h = hashlib.sha256()
    buf = memoryview(bytearray(_BUFFER))
    remaining = size
    while remaining:
        n = src.readinto(buf[: min(remaining, _BUFFER)])
        if not n:
            raise LayerError(f"{src.name}: ends {remaining} bytes before the layer does; re-run to pack it again")
        h.update(buf[:n])
        if out is not None:
            out.write(buf[:n])
        remaining -= n
    return "sha256:" + h.hexdigest()


def _estimate_size(layer_dir: Path) -> int:
    """The tar size of layer_dir, roughly: data rounded to blocks plus a header per entry."""
    total = 1024
    try:
        for _, st in walk_metadata(layer_dir):  # at any depth (no recursion, no path strings, few fds)
            size = 0 if stat.S_ISDIR(st.st_mode) else st.st_size
            total += 512 + -(-size // 512) * 512
    except PipelineError:  # a directory moved meanwhile: what was counted is estimate enough
        pass
    return total


def _release_vanished() -> None:
    """Drop holds on caches whose lock file is gone (a test's temporary cache deleted): nothing left to protect,
    and a process that uses many short-lived caches must not keep a descriptor for each."""
    for key, fd in list(_HELD.items()):
        try:
            gone = os.fstat(fd).st_nlink == 0
        except OSError:
            gone = True
        if gone:
            os.close(fd)
            del _HELD[key]

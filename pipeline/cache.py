"""The layer cache: content-addressed blobs (blobs/sha256/<hex>) shared by every commit that uses a cache_dir."""

import errno
import fcntl
import hashlib
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from pipeline import failpoint
from pipeline.atomic import fsync_dir, make_dirs, no_space_error, partial_path, remove_abandoned_partials
from pipeline.errors import SourceChanged
from pipeline.layer import LayerRecord, write_layer
from pipeline.tarsplit import TarSplitMismatch, write_layer_from_tarsplit

log = logging.getLogger(__name__)

_BUFFER = 1 << 20


class LayerCache:
    """Blobs named by their digest, so a layer packed once is found again by any commit that produces it."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def blob_path(self, digest: str) -> Path:
        algorithm, _, hex_digest = digest.partition(":")
        return self.root / "blobs" / algorithm / hex_digest

    def has_blob(self, record: LayerRecord, *, recorded_ns: int | None = None) -> bool:
        """Whether the blob is intact: the recorded size, and the recorded digest if it changed since recorded_ns
        (None: size only, for callers that just verified it).

        Any write to a file moves its ctime past the moment its record was written, so an unchanged ctime means
        unchanged bytes; only a blob touched since (truncated, altered or re-packed by another worker) is hashed.
        """
        path = self.blob_path(record.diff_id)
        try:
            st = path.stat()
        except FileNotFoundError:
            return False
        if st.st_size != record.size:
            log.warning("cached blob %s has %d bytes, %d recorded; packing it again", path, st.st_size, record.size)
            return False
        if recorded_ns is None or st.st_ctime_ns <= recorded_ns:
            return True
        with open(path, "rb") as f:
            intact = "sha256:" + hashlib.file_digest(f, "sha256").hexdigest() == record.diff_id
        if not intact:
            log.warning("cached blob %s does not match its digest; packing it again", path)
        return intact

    @contextmanager
    def lock(self, key: str) -> Iterator[None]:
        """Exclusive across processes (flock), so two workers never pack the same layer at the same moment."""
        lock_dir = self.root / "locks"
        make_dirs(lock_dir)
        fd = os.open(lock_dir / f"{key}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
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
    ) -> LayerRecord:
        """Pack layer_dir into the cache and return its record; a file changing meanwhile gets one retry."""

        def write(out: BinaryIO) -> LayerRecord:
            return write_layer(layer_dir, out, clamp_mtime=clamp_mtime, progress=progress)

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
        """Write a layer blob through a temporary file, named by its digest once complete and fsync'd."""
        blob_dir = self.root / "blobs" / "sha256"
        make_dirs(blob_dir)
        remove_abandoned_partials(blob_dir)
        temp = partial_path(blob_dir / "layer")
        try:
            with open(temp, "wb", buffering=_BUFFER) as f:
                failpoint.reached("pack:started")
                record = write(f)
                f.flush()
                os.fsync(f.fileno())
            if expected is not None and record.diff_id != expected:
                raise TarSplitMismatch(
                    f"{layer_dir}: reassembled to {record.diff_id}, not the recorded {expected}; files changed"
                )
            failpoint.reached("pack:before-rename")
            # Same name, same content: replacing an existing blob changes nothing a reader could see.
            os.replace(temp, self.blob_path(record.diff_id))
        except OSError as e:
            temp.unlink(missing_ok=True)
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise no_space_error(blob_dir / "layer", e, needed=_estimate_size(layer_dir)) from e
            raise
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        fsync_dir(blob_dir)
        failpoint.reached("pack:after-rename")
        log.info("packed %s into %s (%d bytes)", layer_dir, record.diff_id, record.size)
        return record


def _estimate_size(layer_dir: Path) -> int:
    """The tar size of layer_dir, roughly: data rounded to blocks plus a header per entry."""
    total = 1024
    for dirpath, dirnames, filenames in os.walk(layer_dir):
        for name in dirnames + filenames:
            try:
                size = os.lstat(os.path.join(dirpath, name)).st_size if name in filenames else 0
            except OSError:
                size = 0
            total += 512 + -(-size // 512) * 512
    return total

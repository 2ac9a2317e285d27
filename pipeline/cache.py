"""The layer cache: content-addressed blobs (blobs/sha256/<hex>) shared by every commit that uses a cache_dir."""

import errno
import os
from pathlib import Path

from pipeline.atomic import atomic_path, fsync_dir, make_dirs, partial_path
from pipeline.errors import OutputError
from pipeline.layer import LayerRecord, write_layer

_BUFFER = 1 << 20


class LayerCache:
    """Blobs named by their digest, so a layer packed once is found again by any commit that produces it."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def blob_path(self, digest: str) -> Path:
        algorithm, _, hex_digest = digest.partition(":")
        return self.root / "blobs" / algorithm / hex_digest

    def has_blob(self, record: LayerRecord) -> bool:
        """Whether the blob is present with the recorded size (a cheap check run on every reuse)."""
        try:
            return self.blob_path(record.diff_id).stat().st_size == record.size
        except FileNotFoundError:
            return False

    def pack_layer(self, layer_dir: Path, *, clamp_mtime: int | None = None) -> LayerRecord:
        """Pack layer_dir into the cache and return its record; identical content lands on the same blob."""
        blob_dir = self.root / "blobs" / "sha256"
        make_dirs(blob_dir)
        temp = partial_path(blob_dir / "layer")
        try:
            with open(temp, "wb", buffering=_BUFFER) as f:
                record = write_layer(layer_dir, f, clamp_mtime=clamp_mtime)
                f.flush()
                os.fsync(f.fileno())
            # Same name, same content: replacing an existing blob changes nothing a reader could see.
            os.replace(temp, self.blob_path(record.diff_id))
        except OSError as e:
            temp.unlink(missing_ok=True)
            if e.errno == errno.ENOSPC:
                raise OutputError(f"{blob_dir}: no space left while packing {layer_dir}; free space and re-run") from e
            raise
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        fsync_dir(blob_dir)
        return record

    def write_blob(self, data: bytes, digest: str) -> Path:
        """Store a small blob (an image config) under its digest."""
        path = self.blob_path(digest)
        if not path.exists():
            with atomic_path(path) as temp:
                temp.write_bytes(data)
        return path

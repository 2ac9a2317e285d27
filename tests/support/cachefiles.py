"""A layer's blob as the cache holds it: a file of its own, or a region of an archive assembled in place (a pack,
found through the blob's pointer); tests read, remove and damage it wherever it is."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.store.cache import BlobSource
from pipeline.store.layout import CacheLayout


def recorded_size(cache: Path, digest: str) -> int:
    """The size the cache's layer records give the blob digest."""
    for record in CacheLayout(cache).layer_records():
        doc = json.loads(record.read_bytes())
        if doc.get("diff_id") == digest:
            return int(doc["size"])
    raise AssertionError(f"no layer record names {digest}")


def blob_source(cache: Path, digest: str, size: int | None = None) -> BlobSource:
    """Where the cache holds the blob: its file, else the pack region its pointer names (read here directly: a
    LayerCache would hold the cache, and its filesystem, busy until the test process ends)."""
    size = recorded_size(cache, digest) if size is None else size
    layout = CacheLayout(cache)
    if layout.blob(digest).exists():
        return BlobSource(layout.blob(digest), 0, size)
    pointer = json.loads(layout.blob_pointer(digest).read_bytes())
    return BlobSource(layout.pack_dir / pointer["pack"], pointer["offset"], size)


def blob_bytes(cache: Path, digest: str) -> bytes:
    source = blob_source(cache, digest)
    with open(source.path, "rb") as f:
        f.seek(source.offset)
        return f.read(source.size)


def lose_blob(cache: Path, digest: str) -> None:
    """Remove the blob as a person or a full disk might: its file, or its pointer into a pack."""
    blob = CacheLayout(cache).blob(digest)
    if blob.exists():
        blob.unlink()
    else:
        CacheLayout(cache).blob_pointer(digest).unlink()


def damage_blob(cache: Path, digest: str, how: str) -> None:
    """Truncate the blob to 100 bytes ("truncate": a pack is cut there) or flip its byte 600 ("alter")."""
    source = blob_source(cache, digest)
    with open(source.path, "r+b") as f:
        if how == "truncate":
            f.truncate(source.offset + 100)
            return
        f.seek(source.offset + 600)
        byte = f.read(1)[0]
        f.seek(source.offset + 600)
        f.write(bytes([byte ^ 0xFF]))

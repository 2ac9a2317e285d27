"""A read-only reader of bbolt (BoltDB) files, enough to look up keys in nested buckets.

Format: go.etcd.io/bbolt (db.go meta pages, page.go branch/leaf pages and element flags, bucket.go inline
buckets); podman 4 keeps its container configs in libpod/bolt_state.db.
"""

import struct
from pathlib import Path

from pipeline.errors import StorageError

_BOLT_MAGIC = 0xED0CDAED
_BOLT_VERSION = 2
_BRANCH_PAGE, _LEAF_PAGE = 0x01, 0x02  # page.go page flags
_BUCKET_LEAF = 0x01  # page.go leaf element flag: the value is a nested bucket's header
_PAGE_HEADER = 16  # id u64, flags u16, count u16, overflow u32
_ELEMENT = 16  # branch: pos u32, ksize u32, pgid u64; leaf: flags u32, pos u32, ksize u32, vsize u32
_MAX_DEPTH = 64  # a B+tree over any real file is far shallower; deeper means a page cycle


class BoltFile:
    """Key lookups in nested buckets of a bbolt file image; the file is never opened for writing or locked."""

    def __init__(self, data: bytes, path: Path) -> None:
        self._data, self._path = data, path
        first = self._read_meta(0)
        # The second meta page follows the first; db.go falls back to a 4096-byte page when the first is damaged.
        second = self._read_meta(first[1] if first else 4096)
        metas = [m for m in (first, second) if m is not None]
        if not metas:
            raise self._corrupt("no valid meta page")
        # db.go uses the meta page with the highest transaction id: the other one is the previous commit.
        self._order, self._page_size, self._root, _txid = max(metas, key=lambda m: m[3])

    def get(self, *keys: bytes) -> bytes | None:
        """The value at keys (bucket names, then a key), or None when a bucket or the key is missing."""
        try:
            page = (self._data, self._root * self._page_size)
            for name in keys[:-1]:
                found = self._lookup(page, name)
                if found is None or not found[1]:
                    return None
                page = self._bucket_page(found[0])
            found = self._lookup(page, keys[-1])
        except (struct.error, IndexError) as e:
            raise self._corrupt(f"truncated page ({e})") from e
        return None if found is None or found[1] else found[0]

    def _read_meta(self, offset: int) -> tuple[str, int, int, int] | None:
        # bbolt writes native-endian integers; the magic number tells which.
        for order in "<>":
            try:
                fields = struct.unpack_from(order + "IIIIQQQQQQ", self._data, offset + _PAGE_HEADER)
            except struct.error:
                return None
            magic, version, page_size, _flags, root, _sequence, _freelist, _pgid, txid, checksum = fields
            if magic != _BOLT_MAGIC:
                continue
            meta = self._data[offset + _PAGE_HEADER : offset + _PAGE_HEADER + 56]
            valid_size = page_size >= 512 and page_size & (page_size - 1) == 0
            if version != _BOLT_VERSION or not valid_size or _fnv1a_64(meta) != checksum:
                return None
            return order, page_size, root, txid
        return None

    def _bucket_page(self, header: bytes) -> tuple[bytes, int]:
        root, _sequence = struct.unpack_from(self._order + "QQ", header)
        # bucket.go: a small bucket is stored inline, its page right after the 16-byte header in the value.
        return (header, 16) if root == 0 else (self._data, self._checked_page(root))

    def _checked_page(self, pgid: int) -> int:
        offset = pgid * self._page_size
        if pgid < 2 or offset + _PAGE_HEADER > len(self._data):
            raise self._corrupt(f"page {pgid} is outside the file")
        return offset

    def _lookup(self, page: tuple[bytes, int], key: bytes) -> tuple[bytes, bool] | None:
        buf, offset = page
        for _ in range(_MAX_DEPTH):
            _id, flags, count, _overflow = struct.unpack_from(self._order + "QHHI", buf, offset)
            elements = offset + _PAGE_HEADER
            if flags & _BRANCH_PAGE:
                # Element i holds the first key of child i: descend into the last child whose first key <= key.
                child = None
                for i in range(count):
                    at = elements + i * _ELEMENT
                    pos, ksize, pgid = struct.unpack_from(self._order + "IIQ", buf, at)
                    if i > 0 and self._slice(buf, at + pos, ksize) > key:
                        break
                    child = pgid
                if child is None:
                    raise self._corrupt("empty branch page")
                buf, offset = self._data, self._checked_page(child)
                continue
            if not flags & _LEAF_PAGE:
                raise self._corrupt(f"page of unknown type {flags:#x} inside a bucket")
            for i in range(count):
                at = elements + i * _ELEMENT
                element_flags, pos, ksize, vsize = struct.unpack_from(self._order + "IIII", buf, at)
                if self._slice(buf, at + pos, ksize) == key:
                    return self._slice(buf, at + pos + ksize, vsize), bool(element_flags & _BUCKET_LEAF)
            return None
        raise self._corrupt("bucket tree deeper than any real database")

    def _slice(self, buf: bytes, start: int, size: int) -> bytes:
        if start + size > len(buf):
            raise self._corrupt("an element points past the end of its page")
        return buf[start : start + size]

    def _corrupt(self, problem: str) -> StorageError:
        return StorageError(f"{self._path}: podman's BoltDB database is corrupt ({problem}); run podman ps to check it")


def _fnv1a_64(data: bytes) -> int:
    """FNV-1a, 64 bits: the checksum of a bbolt meta page (db.go meta.sum64)."""
    value = 0xCBF29CE484222325
    for byte in data:
        value = ((value ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return value

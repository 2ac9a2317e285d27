"""Writes small bbolt database files for tests, laid out as bbolt does (https://github.com/etcd-io/bbolt page.go,
bucket.go, db.go): two meta pages, a freelist page, then one page (plus overflow pages) per bucket node."""

from __future__ import annotations

import struct

MAGIC = 0xED0CDAED
VERSION = 2
BRANCH_PAGE, LEAF_PAGE, META_PAGE, FREELIST_PAGE = 0x01, 0x02, 0x04, 0x10
BUCKET_LEAF = 0x01
PAGE_HEADER = 16
ELEMENT = 16
META_SIZE = 64  # magic, version, page size, flags, root bucket (16), freelist, pgid, txid, checksum

# A tree is a dict of byte keys to byte values (plain keys) or to nested trees (buckets).
Tree = dict[bytes, "bytes | Tree"]


def fnv1a_64(data: bytes) -> int:
    value = 0xCBF29CE484222325
    for byte in data:
        value = ((value ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return value


class _Writer:
    def __init__(self, page_size: int, order: str, leaf_items: int | None, inline: bool) -> None:
        self.page_size, self.order, self.leaf_items, self.inline = page_size, order, leaf_items, inline
        self.pages: dict[int, bytes] = {}
        self.next_pgid = 3  # 0 and 1 are the meta pages, 2 the freelist

    def allocate(self, body: bytes, flags: int, count: int) -> int:
        """Store one node as a page (with overflow pages when it is larger than a page); return its pgid."""
        pgid = self.next_pgid
        total = PAGE_HEADER + len(body)
        npages = -(-total // self.page_size)
        header = struct.pack(self.order + "QHHI", pgid, flags, count, npages - 1)
        self.pages[pgid] = (header + body).ljust(npages * self.page_size, b"\0")
        self.next_pgid += npages
        return pgid

    def leaf_body(self, items: list[tuple[bytes, bytes, int]]) -> bytes:
        elements, data = b"", b""
        start = len(items) * ELEMENT
        for i, (key, value, flags) in enumerate(items):
            pos = start + len(data) - i * ELEMENT  # relative to the element itself
            elements += struct.pack(self.order + "IIII", flags, pos, len(key), len(value))
            data += key + value
        return elements + data

    def bucket(self, tree: Tree, *, top: bool = False) -> bytes:
        """The 16-byte bucket header (root pgid, sequence), followed by the inline page when the bucket is inline."""
        items = []
        for key in sorted(tree):
            value = tree[key]
            if isinstance(value, dict):
                items.append((key, self.bucket(value), BUCKET_LEAF))
            else:
                items.append((key, value, 0))
        if self.inline and not top and (self.leaf_items is None or len(items) <= self.leaf_items):
            page = struct.pack(self.order + "QHHI", 0, LEAF_PAGE, len(items), 0) + self.leaf_body(items)
            return struct.pack(self.order + "QQ", 0, 0) + page
        size = self.leaf_items or max(len(items), 1)
        chunks = [items[i : i + size] for i in range(0, len(items), size)] or [[]]
        leaves = [
            (chunk[0][0] if chunk else b"", self.allocate(self.leaf_body(chunk), LEAF_PAGE, len(chunk)))
            for chunk in chunks
        ]
        if len(leaves) == 1:
            return struct.pack(self.order + "QQ", leaves[0][1], 0)
        elements, data = b"", b""
        start = len(leaves) * ELEMENT
        for i, (key, pgid) in enumerate(leaves):
            pos = start + len(data) - i * ELEMENT
            elements += struct.pack(self.order + "IIQ", pos, len(key), pgid)
            data += key
        return struct.pack(self.order + "QQ", self.allocate(elements + data, BRANCH_PAGE, len(leaves)), 0)

    def meta(self, pgid: int, root: int, txid: int) -> bytes:
        fields = struct.pack(
            self.order + "IIIIQQQQQ", MAGIC, VERSION, self.page_size, 0, root, 0, 2, self.next_pgid, txid
        )
        body = fields + struct.pack(self.order + "Q", fnv1a_64(fields))
        return (struct.pack(self.order + "QHHI", pgid, META_PAGE, 0, 0) + body).ljust(self.page_size, b"\0")


def build_bolt_file(
    tree: Tree,
    *,
    page_size: int = 4096,
    order: str = "<",
    leaf_items: int | None = None,
    inline: bool = False,
    txids: tuple[int, int] = (1, 2),
) -> bytes:
    """A bbolt file holding `tree`; leaf_items splits buckets into several leaves under a branch page, inline
    stores small nested buckets inside their parent's value as bbolt does; txids go to meta pages 0 and 1."""
    writer = _Writer(page_size, order, leaf_items, inline)
    root = struct.unpack_from(order + "Q", writer.bucket(tree, top=True))[0]
    freelist = struct.pack(order + "QHHI", 2, FREELIST_PAGE, 0, 0).ljust(page_size, b"\0")
    out = writer.meta(0, root, txids[0]) + writer.meta(1, root, txids[1]) + freelist
    for pgid in range(3, writer.next_pgid):
        if pgid in writer.pages:
            out += writer.pages[pgid]
    return out


def meta_offset(index: int, page_size: int = 4096) -> int:
    """Where meta page `index` (0 or 1) starts; its fields begin PAGE_HEADER bytes later."""
    return index * page_size

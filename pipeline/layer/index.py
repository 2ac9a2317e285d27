"""The entry index of a packed layer_dir: every entry its walk listed, with a signature that changes whenever the
entry does, so that the next snapshot of the same upper dir can pack only what changed (pipeline.layer.delta).

The signature is the entry's inode, mode, owner, size, mtime, ctime, link count and device number. ctime and the
inode are in it on purpose: no user-space call sets ctime back, so a rewrite that restores mtime and size (or a
chmod, chown, setfattr, link or unlink) still changes it, and a file replaced by another has a new inode.

File format, version FORMAT_VERSION: MAGIC, the version as a 4-byte little-endian number, then one zstd frame
(with its content checksum) holding
  - the source: the layer_dir's st_dev and st_ino (u64 each) and the marker namespace (u8: 0 none, 1 trusted,
    2 user), so an index is never compared with another directory than its own;
  - one listing per directory, in the order the walk lists them (the root's, then each subdirectory's as the walk
    enters it: depth first, in tar-name order): b"L", the number of entries (u32), then per entry its kind (u8:
    PLAIN, WHITEOUT or OPAQUE, what whiteout.convert made of it), the length of its name (u16), the signature
    (_SIGNATURE) and its tar name relative to the directory ("name/" for a directory, ".wh.name" for a
    whiteout), in tar-name order; b"X" instead where a directory had more than MAX_LISTING entries (the index
    ends there);
  - b"E", the number of entries and of listings (u64 each).
Listings rather than one record per path: a delta needs, when it enters a directory, every name the directory had
before (to tell a name gone from one replaced, and to put each whiteout at its place in tar-name order); paths
relative to their directory are also smaller. read_index gives the entries with whole tar paths, in the walk's
order. Readers iterate: one listing per level of the walk in memory, never the whole index, and every length is
capped, so a damaged or forged index raises IndexDamaged (a LayerError naming the file) and never exhausts memory.
An index of another version raises IndexUnavailable: the caller packs the layer whole.
"""

import os
import stat
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, NamedTuple

import zstandard

from pipeline.errors import LayerError
from pipeline.layer import whiteout
from pipeline.layer.walk import Entry

MAGIC = b"PLINDEX\n"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<8sI")  # MAGIC, FORMAT_VERSION; outside the compressed frame, so any reader can tell
_SOURCE = struct.Struct("<QQB")  # root st_dev, st_ino, marker namespace
_COUNT = struct.Struct("<I")
_END = struct.Struct("<QQ")  # entries, listings
_RECORD = struct.Struct("<BH")  # kind, name length
_SIGNATURE = struct.Struct("<QIIIQqqQQ")  # st_ino, st_mode, st_uid, st_gid, st_size, st_mtime_ns, st_ctime_ns,
# st_nlink, st_rdev
_FIXED = _RECORD.size + _SIGNATURE.size
_MODE, _MODE_OFFSET = struct.Struct("<I"), 8  # st_mode in a signature
_LISTING, _ENDING, _ABANDONED = b"L", b"E", b"X"
_NAMESPACES = (None, "trusted", "user")

# What an entry is written as (whiteout.Conversion):
PLAIN, WHITEOUT, OPAQUE = 0, 1, 2
# A name is at most NAME_MAX (255) bytes, a whiteout's 4 more (".wh."), a directory's one more ("/").
_MAX_NAME = 255 + len(whiteout.WHITEOUT_PREFIX) + 1
# Entries in one directory: more than ext4 holds without large_dir. A listing over it is not indexed (the next
# snapshot is packed whole), and a reader never holds more than this many entries of one listing.
MAX_LISTING = 1 << 24
# zstd level 3 (its default), measured on /usr (140,000 entries): 11.4 bytes an entry (83 before compression), written
# in 3 us an entry beside the walk's 35 us (stat and xattrs), read in 6-7 us; level 1 gave 12.0 bytes, gzip level 6
# 11.9 bytes in 4.6 times zstd's compression time, gzip level 1 14.1 bytes.
_LEVEL = 3
_READ_SIZE = 1 << 16


class IndexUnavailable(LayerError):
    """No usable index: missing, of another format version, or recorded for another directory."""


class IndexDamaged(IndexUnavailable):
    """An index whose bytes are not what an IndexWriter wrote: truncated, altered or forged."""


class Signature(NamedTuple):
    """The fields of an entry's signature (_SIGNATURE)."""

    ino: int
    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    ctime_ns: int
    nlink: int
    rdev: int


@dataclass(frozen=True, slots=True)
class IndexEntry:
    """One indexed entry: its tar name (relative to its directory in a listing, the whole tar path from
    read_index), what it is written as (kind: PLAIN, WHITEOUT or OPAQUE) and its packed signature."""

    name: bytes
    kind: int
    signature: bytes

    @property
    def fields(self) -> Signature:
        return Signature._make(_SIGNATURE.unpack(self.signature))

    @property
    def opaque(self) -> bool:
        return self.kind == OPAQUE

    @property
    def is_dir(self) -> bool:
        return self.name.endswith(b"/")

    @property
    def own_name(self) -> bytes:
        """The entry's name in its directory: the tar name without "/" or, for a whiteout, without ".wh."."""
        base = self.name.rstrip(b"/").rpartition(b"/")[2]
        return base[len(whiteout.WHITEOUT_PREFIX) :] if self.kind == WHITEOUT else base


def signature_of(st: os.stat_result) -> bytes:
    """The packed signature of an entry whose lstat is st (a whiteout device's without its ctime and link count,
    which a remount changes: whiteout.is_whiteout_device)."""
    if whiteout.is_whiteout_device(st):
        return _SIGNATURE.pack(st.st_ino, st.st_mode, st.st_uid, st.st_gid, 0, st.st_mtime_ns, 0, 0, 0)
    return _SIGNATURE.pack(
        st.st_ino,
        st.st_mode,
        st.st_uid,
        st.st_gid,
        st.st_size,
        st.st_mtime_ns,
        st.st_ctime_ns,
        st.st_nlink,
        st.st_rdev,
    )


def kind_of(conversion: whiteout.Conversion) -> int:
    """What an entry converted so is written as."""
    if isinstance(conversion, whiteout.Whiteout):
        return WHITEOUT
    return OPAQUE if isinstance(conversion, whiteout.OpaqueDirectory) else PLAIN


class IndexWriter:
    """Streams the index of one walk to out: the packers (write_layer, write_delta) call begin, then add_listing
    with each directory's listing as their walk reads it, then finish.

    out receives a partial index until finish returns; write it to a temporary file and rename it into place
    (pipeline.host.atomic.atomic_path), as every other cache file.
    """

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._frame: zstandard.ZstdCompressionWriter | None = None
        self._abandoned = False
        self._finished = False
        self.entries = 0
        self.listings = 0

    def begin(self, root: os.stat_result, overlay_xattrs: str | None) -> None:
        """Start the index of the layer_dir whose fstat is root, whose markers live in overlay_xattrs."""
        if self._frame is not None or self._finished:
            raise ValueError("an IndexWriter records one walk")
        self._out.write(_HEADER.pack(MAGIC, FORMAT_VERSION))
        compressor = zstandard.ZstdCompressor(level=_LEVEL, write_checksum=True)
        self._frame = compressor.stream_writer(self._out, closefd=False)
        self._frame.write(_SOURCE.pack(root.st_dev, root.st_ino, _NAMESPACES.index(overlay_xattrs)))

    def add_listing(self, entries: Sequence[Entry]) -> None:
        """Record one directory's listing (walk.list_dir: sorted by tar name)."""
        frame = self._started()
        if self._abandoned:
            return
        if len(entries) > MAX_LISTING:
            # Indexing stops here, and the next snapshot is packed whole: no reader may hold such a listing.
            self._abandoned = True
            frame.write(_ABANDONED)
            return
        parts = [_LISTING, _COUNT.pack(len(entries))]
        for entry in entries:
            parts += (_RECORD.pack(kind_of(entry.conversion), len(entry.tar_name)), signature_of(entry.st))
            parts.append(entry.tar_name)
        frame.write(b"".join(parts))
        self.entries += len(entries)
        self.listings += 1

    def finish(self) -> None:
        """End the index (its counts, the frame's checksum); out then holds all of it."""
        frame = self._started()
        if not self._abandoned:
            frame.write(_ENDING + _END.pack(self.entries, self.listings))
        frame.flush(zstandard.FLUSH_FRAME)
        self._frame = None
        self._finished = True

    def _started(self) -> zstandard.ZstdCompressionWriter:
        if self._frame is None:
            raise ValueError("IndexWriter.begin was not called, or finish was")
        return self._frame


class IndexReader:
    """Reads an index listing by listing, in the order it was written; any damage raises IndexDamaged naming the
    file. finish() checks its end: the counts and the frame's checksum are only known there, so a caller acts on
    what it read only once finish() returned."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._file = open(path, "rb")
        except FileNotFoundError as e:
            raise IndexUnavailable(f"{path}: no entry index; the layer is packed whole") from e
        except OSError as e:
            raise IndexUnavailable(
                f"{path}: cannot read the entry index ({e.strerror}); the layer is packed whole"
            ) from e
        try:
            header = self._file.read(_HEADER.size)
            if len(header) < _HEADER.size or header[: len(MAGIC)] != MAGIC:
                raise self._damaged("not an entry index")
            version = _HEADER.unpack(header)[1]
            if version != FORMAT_VERSION:
                raise IndexUnavailable(
                    f"{path}: entry index of format version {version}, this version reads {FORMAT_VERSION};"
                    " the layer is packed whole"
                )
            self._frame = zstandard.ZstdDecompressor().stream_reader(
                self._file, read_size=_READ_SIZE, read_across_frames=False, closefd=False
            )
            self._buffer = b""
            self._pos = 0
            dev, ino, namespace = _SOURCE.unpack(self._take(_SOURCE.size))
            if namespace >= len(_NAMESPACES):
                raise self._damaged(f"unknown marker namespace {namespace}")
            self.source = (dev, ino)
            self.overlay_xattrs = _NAMESPACES[namespace]
        except BaseException:
            self._file.close()
            raise
        self.entries = 0
        self.listings = 0

    def __enter__(self) -> "IndexReader":
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    def check_source(self, root: os.stat_result, overlay_xattrs: str | None) -> None:
        """Refuse (IndexUnavailable) an index recorded for another directory than the one whose fstat is root, or
        with markers of another namespace: its inodes and kinds mean nothing here."""
        if self.source != (root.st_dev, root.st_ino) or self.overlay_xattrs != overlay_xattrs:
            raise IndexUnavailable(
                f"{self.path}: the entry index was recorded for another directory (device, inode, markers"
                f" {self.source + (self.overlay_xattrs,)}, here {(root.st_dev, root.st_ino, overlay_xattrs)});"
                " the layer is packed whole"
            )

    def read_listing(self) -> list[IndexEntry]:
        """The next directory's entries, in tar-name order."""
        self._take_tag(_LISTING, f"listing {self.listings + 1}")
        (count,) = _COUNT.unpack(self._take(_COUNT.size))
        if count > MAX_LISTING:
            raise self._damaged(f"a listing of {count} entries, more than {MAX_LISTING}")
        entries: list[IndexEntry] = []
        previous = b""
        owns: set[bytes] = set()
        for _ in range(count):
            fixed = self._take(_FIXED)
            kind, length = _RECORD.unpack_from(fixed)
            if not 0 < length <= _MAX_NAME:
                raise self._damaged(f"a name of {length} bytes")
            name = self._take(length)
            signature = fixed[_RECORD.size :]
            wrong = _wrong_record(name, kind, _MODE.unpack_from(signature, _MODE_OFFSET)[0], previous)
            if wrong:
                raise self._damaged(wrong)
            # One entry per name in a directory: a name listed twice (as "x" and "x/", or "x" and ".wh.x") would
            # become two whiteouts of one path.
            own = name[len(whiteout.WHITEOUT_PREFIX) :] if kind == WHITEOUT else name.rstrip(b"/")
            if own in owns:
                raise self._damaged(f"{name!r}, a second entry named {own!r}")
            owns.add(own)
            entries.append(IndexEntry(name, kind, signature))
            previous = name
        self.entries += count
        self.listings += 1
        return entries

    def skip_subtrees(self, count: int) -> None:
        """Read past the listings of count directories and everything below them."""
        while count:
            count += sum(1 for e in self.read_listing() if e.is_dir) - 1

    def finish(self) -> None:
        """Check the end: nothing but the counts after the last listing, then the end of the frame (whose
        checksum covers every byte read)."""
        self._take_tag(_ENDING, f"the end after {self.listings} listings")
        if _END.unpack(self._take(_END.size)) != (self.entries, self.listings):
            raise self._damaged(f"its end counts other than the {self.entries} entries in {self.listings} listings")
        if self._pos < len(self._buffer) or self._read(1):
            raise self._damaged("data after its end")

    def _take_tag(self, expected: bytes, what: str) -> None:
        """The next record's tag, which must be expected (what names it in the error)."""
        tag = self._take(1)
        if tag == _ABANDONED:
            raise IndexUnavailable(
                f"{self.path}: a directory of more than {MAX_LISTING} entries was not indexed; the layer is"
                " packed whole"
            )
        if tag != expected:
            raise self._damaged(f"{what} expected, found {tag!r}")

    def _take(self, size: int) -> bytes:
        start = self._pos
        end = start + size
        if end <= len(self._buffer):
            self._pos = end
            return self._buffer[start:end]
        while end > len(self._buffer):
            chunk = self._read(_READ_SIZE)
            if not chunk:
                raise self._damaged("truncated")
            self._buffer = self._buffer[self._pos :] + chunk
            self._pos, end = 0, size
        data = self._buffer[self._pos : end]
        self._pos = end
        return data

    def _read(self, size: int) -> bytes:
        try:
            return self._frame.read(size)
        except zstandard.ZstdError as e:
            raise self._damaged(str(e)) from e
        except OSError as e:
            raise IndexUnavailable(
                f"{self.path}: cannot read the entry index ({e.strerror}); the layer is packed whole"
            ) from e

    def _damaged(self, why: str) -> IndexDamaged:
        return IndexDamaged(f"{self.path}: damaged entry index ({why}); delete it, the layer is then packed whole")


def _wrong_record(name: bytes, kind: int, mode: int, previous: bytes) -> str:
    """What is wrong with a record the walk cannot have written ("" if nothing): names the delta would otherwise
    turn into tar names."""
    is_dir = name.endswith(b"/")
    base = name[:-1] if is_dir else name
    if b"/" in base or b"\0" in base or base in (b"", b".", b".."):
        return f"the name {name!r}"
    if is_dir != stat.S_ISDIR(mode):
        return f"{name!r} of mode {mode:o}"
    marker = base.startswith(whiteout.WHITEOUT_PREFIX)
    if kind == WHITEOUT:
        valid = not is_dir and marker and len(base) > len(whiteout.WHITEOUT_PREFIX)
    else:
        valid = kind in (PLAIN, OPAQUE) and not marker and (is_dir or kind == PLAIN)
    if not valid:
        return f"{name!r} of kind {kind}"
    if name <= previous:
        return f"{name!r} out of order after {previous!r}"
    return ""


def read_index(path: Path) -> Iterator[IndexEntry]:
    """Every entry of the index at path with its whole tar path, in the walk's order (sorted by tar path); the end
    is checked after the last one (IndexReader.finish)."""
    with IndexReader(path) as reader:
        pending = [reader.read_listing()[::-1]]  # per level, the entries to come, last first
        prefixes = [b""]
        while pending:
            if not pending[-1]:
                pending.pop()
                prefixes.pop()
                continue
            entry = pending[-1].pop()
            full = IndexEntry(prefixes[-1] + entry.name, entry.kind, entry.signature)
            yield full
            if entry.is_dir:
                pending.append(reader.read_listing()[::-1])
                prefixes.append(full.name)
        reader.finish()

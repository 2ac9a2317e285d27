"""Packs one overlay layer_dir into an OCI layer tar in one streaming pass, hashing while writing.

Spec: https://github.com/opencontainers/image-spec/blob/main/layer.md. Entries are sorted by their tar path
bytes, overlay whiteouts and opaque directories are translated (pipeline.whiteout), and the diff_id is the
sha256 of exactly the bytes written.
"""

import errno
import hashlib
import json
import logging
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from pipeline import tarheader, whiteout
from pipeline.errors import LayerError, SourceChanged
from pipeline.tarheader import Header

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
_ZEROS = memoryview(bytes(_CHUNK))
# O_NOATIME keeps packing from touching the source's atimes; only the owner or root may ask for it.
_O_NOATIME = getattr(os, "O_NOATIME", 0)


@dataclass(frozen=True)
class LayerRecord:
    """What a packed layer is: diff_id (sha256 of the uncompressed tar), its size in bytes, and the
    fingerprint of the layer_dir taken just before packing ("" when not taken)."""

    diff_id: str
    size: int
    fingerprint: str = ""

    @property
    def hex(self) -> str:
        return self.diff_id.removeprefix("sha256:")


class HashingSink:
    """Forwards writes to a file while hashing and counting them."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes | memoryview) -> None:
        self._hash.update(data)
        self._out.write(data)
        self.size += len(data)

    def record(self) -> LayerRecord:
        return LayerRecord(diff_id="sha256:" + self._hash.hexdigest(), size=self.size)


@dataclass(frozen=True)
class _Entry:
    tar_name: bytes  # the name this entry gets in the tar; the sort key
    name: bytes  # its name in the parent directory
    st: os.stat_result
    xattrs: dict[str, bytes]


@dataclass(frozen=True)
class LayerScan:
    """A metadata walk of a layer_dir: a fingerprint that changes when any entry changes, and its size."""

    fingerprint: str
    entries: int
    file_bytes: int


def scan_layer(layer_dir: Path) -> LayerScan:
    """Walk layer_dir's metadata (path, size, mtime, ctime, inode, mode) without reading file contents.

    ctime is in the fingerprint because no user-space call can set it back: any write, chmod, rename or
    utime since the last scan changes it, so an equal fingerprint means an unchanged layer.
    """
    digest = hashlib.sha256()
    entries = file_bytes = 0
    for dirpath, dirnames, filenames in os.walk(os.fsencode(layer_dir)):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            path = os.path.join(dirpath, name)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            digest.update(
                b"%s\0%d %d %d %d %d\n" % (path, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_mode)
            )
            entries += 1
            if stat.S_ISREG(st.st_mode):
                file_bytes += st.st_size
    return LayerScan("sha256:" + digest.hexdigest(), entries, file_bytes)


def write_layer(
    layer_dir: Path,
    out: BinaryIO,
    *,
    clamp_mtime: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> LayerRecord:
    """Write layer_dir as a tar to out and return its diff_id and size; out receives every byte exactly once.

    progress, if given, is called with the bytes written so far after each regular file.
    """
    try:
        root_fd = os.open(layer_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as e:
        raise LayerError(f"{layer_dir}: cannot open layer directory ({e.strerror})") from e
    try:
        whiteout.check_markers_visible(layer_dir)
    except BaseException:
        os.close(root_fd)
        raise
    sink = HashingSink(out)
    hardlinks: dict[tuple[int, int], bytes] = {}
    try:
        for parent_fd, prefix, entry in _walk(root_fd, layer_dir):
            _write_entry(sink, parent_fd, prefix, entry, layer_dir, hardlinks, clamp_mtime)
            if progress is not None and stat.S_ISREG(entry.st.st_mode):
                progress(sink.size)
    finally:
        os.close(root_fd)
    sink.write(tarheader.END_OF_ARCHIVE)
    return sink.record()


def _walk(root_fd: int, layer_dir: Path) -> Iterator[tuple[int, bytes, _Entry]]:
    """Yield (parent fd, tar prefix, entry) in tar-name order; directories are opened relative to their parent."""
    # An explicit stack, not recursion: a container can nest directories deeper than Python's recursion limit.
    stack: list[tuple[int, bytes, Iterator[_Entry]]] = [(root_fd, b"", iter(_list_dir(root_fd, layer_dir, b"")))]
    try:
        while stack:
            fd, prefix, entries = stack[-1]
            entry = next(entries, None)
            if entry is None:
                stack.pop()
                if fd != root_fd:
                    os.close(fd)
                continue
            yield fd, prefix, entry
            if stat.S_ISDIR(entry.st.st_mode):
                child_fd = _open_at(fd, entry.name, os.O_DIRECTORY, layer_dir, prefix)
                child_prefix = prefix + entry.name + b"/"
                stack.append((child_fd, child_prefix, iter(_list_dir(child_fd, layer_dir, child_prefix))))
    finally:
        for fd, _, _ in stack:
            if fd != root_fd:
                os.close(fd)


def _list_dir(fd: int, layer_dir: Path, prefix: bytes) -> list[_Entry]:
    entries = []
    for text_name in os.listdir(fd):
        name = os.fsencode(text_name)
        try:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError as e:
            raise SourceChanged(_describe(layer_dir, prefix + name) + ": vanished while the layer was packed") from e
        xattrs = _read_xattrs(fd, name, layer_dir, prefix)
        if whiteout.is_whiteout(st.st_mode, st.st_rdev, xattrs):
            tar_name = prefix + whiteout.whiteout_name(name)
        else:
            whiteout.check_not_marker(_describe_bytes(layer_dir, prefix + name), name)
            # Directories sort as "name/" so that a walk in this order is also ordered by full tar path.
            tar_name = prefix + name + (b"/" if stat.S_ISDIR(st.st_mode) else b"")
        entries.append(_Entry(tar_name, name, st, xattrs))
    entries.sort(key=lambda e: e.tar_name)
    return entries


def _read_xattrs(fd: int, name: bytes, layer_dir: Path, prefix: bytes) -> dict[str, bytes]:
    # Through /proc/self/fd the parent is pinned: a directory swapped for a symlink cannot redirect the read.
    path = b"/proc/self/fd/%d/%s" % (fd, name)
    try:
        names = os.listxattr(path, follow_symlinks=False)
        return {n: os.getxattr(path, n, follow_symlinks=False) for n in names}
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.ENODATA):
            return {}
        raise LayerError(f"{_describe(layer_dir, prefix + name)}: cannot read xattrs ({e.strerror})") from e


def _open_at(dir_fd: int, name: bytes, flags: int, layer_dir: Path, prefix: bytes) -> int:
    base = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | flags
    try:
        try:
            return os.open(name, base | _O_NOATIME, dir_fd=dir_fd)
        except PermissionError:
            return os.open(name, base, dir_fd=dir_fd)
    except OSError as e:
        what = _describe(layer_dir, prefix + name)
        if e.errno in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR):
            raise SourceChanged(f"{what}: replaced or removed while the layer was packed") from e
        raise LayerError(f"{what}: cannot open ({e.strerror}); check its permissions") from e


def _write_entry(
    sink: HashingSink,
    fd: int,
    prefix: bytes,
    entry: _Entry,
    layer_dir: Path,
    hardlinks: dict[tuple[int, int], bytes],
    clamp_mtime: int | None,
) -> None:
    st, xattrs = entry.st, entry.xattrs
    whiteout.check_supported(_describe_bytes(layer_dir, prefix + entry.name), xattrs)
    # Whole seconds from the integer nanoseconds: the float st_mtime rounds x.999999999 up to the next second.
    seconds = st.st_mtime_ns // 1_000_000_000
    mtime = seconds if clamp_mtime is None else min(seconds, clamp_mtime)
    common: dict[str, Any] = {"uid": st.st_uid, "gid": st.st_gid, "mtime": mtime}
    mode = st.st_mode
    if whiteout.is_whiteout(mode, st.st_rdev, xattrs):
        # moby writes whiteouts as empty 0600 files; owners and mtime are kept for reproducibility.
        sink.write(tarheader.build_header(Header(entry.tar_name, tarheader.REGULAR, mode=0o600, **common)))
        return
    kept = whiteout.kept_xattrs(xattrs)
    if stat.S_ISDIR(mode):
        sink.write(tarheader.build_header(Header(entry.tar_name, tarheader.DIRECTORY, mode, xattrs=kept, **common)))
        if whiteout.is_opaque(xattrs):
            marker = entry.tar_name + whiteout.OPAQUE_MARKER
            sink.write(tarheader.build_header(Header(marker, tarheader.REGULAR, mode=0o600, **common)))
    elif stat.S_ISREG(mode):
        key = (st.st_dev, st.st_ino)
        if st.st_nlink > 1 and key in hardlinks:
            link = Header(entry.tar_name, tarheader.HARDLINK, mode, linkname=hardlinks[key], xattrs=kept, **common)
            sink.write(tarheader.build_header(link))
            return
        if st.st_nlink > 1:
            hardlinks[key] = entry.tar_name
        _write_file(sink, fd, prefix, entry, layer_dir, kept, common)
    elif stat.S_ISLNK(mode):
        target = os.readlink(entry.name, dir_fd=fd)
        header = Header(entry.tar_name, tarheader.SYMLINK, 0o777, linkname=target, xattrs=kept, **common)
        sink.write(tarheader.build_header(header))
    elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        kind = tarheader.CHAR_DEVICE if stat.S_ISCHR(mode) else tarheader.BLOCK_DEVICE
        major, minor = os.major(st.st_rdev), os.minor(st.st_rdev)
        header = Header(entry.tar_name, kind, mode, devmajor=major, devminor=minor, xattrs=kept, **common)
        sink.write(tarheader.build_header(header))
    elif stat.S_ISFIFO(mode):
        sink.write(tarheader.build_header(Header(entry.tar_name, tarheader.FIFO, mode, xattrs=kept, **common)))
    else:
        # Sockets are endpoints of live processes; no image format can carry one (docker skips them too).
        log.warning("skipping socket %s: sockets cannot be stored in an image", _describe(layer_dir, entry.tar_name))


def _write_file(
    sink: HashingSink,
    dir_fd: int,
    prefix: bytes,
    entry: _Entry,
    layer_dir: Path,
    xattrs: dict[str, bytes],
    common: dict[str, Any],
) -> None:
    what = _describe(layer_dir, prefix + entry.name)
    fd = _open_at(dir_fd, entry.name, 0, layer_dir, prefix)
    try:
        st = os.fstat(fd)
        if (st.st_ino, st.st_dev) != (entry.st.st_ino, entry.st.st_dev):
            raise SourceChanged(f"{what}: replaced while the layer was packed")
        size = st.st_size
        sink.write(
            tarheader.build_header(
                Header(entry.tar_name, tarheader.REGULAR, st.st_mode, size=size, xattrs=xattrs, **common)
            )
        )
        with open(fd, "rb", buffering=0, closefd=False) as f:
            if st.st_blocks * 512 < size:
                _copy_sparse(sink, f, fd, size, what)
            else:
                _copy_range(sink, f, size, what)
            if f.read(1):
                raise SourceChanged(f"{what}: grew while the layer was packed")
        after = os.fstat(fd)
        if (after.st_size, after.st_mtime_ns) != (size, st.st_mtime_ns):
            raise SourceChanged(f"{what}: modified while the layer was packed")
    finally:
        os.close(fd)
    sink.write(tarheader.padding(size))


def _copy_range(sink: HashingSink, f: BinaryIO, count: int, what: str) -> None:
    buf = memoryview(bytearray(min(_CHUNK, max(count, 1))))
    while count:
        n = f.readinto(buf[: min(count, len(buf))])  # type: ignore[attr-defined]
        if not n:
            raise SourceChanged(f"{what}: shrank while the layer was packed")
        sink.write(buf[:n])
        count -= n


def _copy_sparse(sink: HashingSink, f: BinaryIO, fd: int, size: int, what: str) -> None:
    # SEEK_DATA/SEEK_HOLE skip the holes: they cost hashing of zeros, never disk reads.
    pos = 0
    while pos < size:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno != errno.ENXIO:
                raise
            data = size
        data = min(data, size)
        while pos < data:
            n = min(data - pos, len(_ZEROS))
            sink.write(_ZEROS[:n])
            pos += n
        if pos >= size:
            break
        try:
            hole = min(os.lseek(fd, pos, os.SEEK_HOLE), size)
        except OSError as e:
            if e.errno != errno.ENXIO:  # ENXIO: pos is past the end, so the file shrank since it was listed
                raise
            raise SourceChanged(f"{what}: shrank while the layer was packed") from e
        os.lseek(fd, pos, os.SEEK_SET)
        _copy_range(sink, f, hole - pos, what)
        pos = hole
    os.lseek(fd, size, os.SEEK_SET)


def _describe_bytes(layer_dir: Path, rel: bytes) -> bytes:
    return os.fsencode(layer_dir) + b"/" + rel


def _describe(layer_dir: Path, rel: bytes) -> str:
    return os.fsdecode(_describe_bytes(layer_dir, rel)).encode("utf-8", "backslashreplace").decode("utf-8")


def encode_record(record: LayerRecord) -> bytes:
    doc = {"diff_id": record.diff_id, "size": record.size, "fingerprint": record.fingerprint}
    return json.dumps(doc, sort_keys=True).encode()


def read_record(path: Path) -> LayerRecord:
    """A record written by encode_record; a damaged one raises LayerError naming the file."""
    try:
        doc = json.loads(path.read_bytes())
        return LayerRecord(
            diff_id=str(doc["diff_id"]), size=int(doc["size"]), fingerprint=str(doc.get("fingerprint", ""))
        )
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise LayerError(f"{path}: damaged layer record ({e}); delete it and re-run") from e

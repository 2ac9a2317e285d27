"""Packs one overlay layer_dir into an OCI layer tar in one streaming pass, hashing while writing.

Spec: https://github.com/opencontainers/image-spec/blob/main/layer.md. Entries are sorted by their tar path
bytes, each is converted once, as its directory is listed, by the whiteout rules (pipeline.layer.whiteout.convert),
and the diff_id is the sha256 of exactly the bytes written.
"""

import errno
import hashlib
import json
import logging
import os
import re
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO, assert_never

from pipeline import jsoncheck
from pipeline.errors import LayerError, SourceChanged
from pipeline.layer import tarheader, whiteout
from pipeline.layer.tarheader import Header

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
_ZEROS = memoryview(bytes(_CHUNK))
# O_NOATIME keeps packing from touching the source's atimes; only the owner or root may ask for it.
_O_NOATIME = getattr(os, "O_NOATIME", 0)
_SURROGATE_ESCAPE = re.compile("[\udc80-\udcff]")  # os.fsdecode's stand-ins for bytes that are not UTF-8
_DIFF_ID = re.compile(r"sha256:[0-9a-f]{64}")
# A walk holds at most this many directory fds besides the layer's root, however deep the tree: going deeper closes
# the shallowest, which is re-opened as ".." of its child when the walk climbs back (_OpenDirs).
MAX_DIR_FDS = 16
# Go's archive/tar, which docker, podman, containerd, skopeo and umoci load layers with, refuses a PAX header over
# 1 MiB (reader.go, maxSpecialFileSize) and so the whole archive: a longer path is refused here, naming it. A
# hardlink's header holds two paths, which leaves room for them and the other records.
MAX_TAR_NAME = 256 << 10


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
    tar_name: bytes  # the name this entry gets in the tar (from _list_dir: relative to its directory); the sort key
    name: bytes  # its name in the parent directory
    st: os.stat_result
    conversion: whiteout.Conversion  # what to write for it


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
    base = os.path.join(os.fsencode(layer_dir), b"")  # the bytes os.walk's paths began with
    for rel, st in walk_metadata(layer_dir):
        digest.update(
            b"%s%s\0%d %d %d %d %d\n" % (base, rel, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_mode)
        )
        entries += 1
        if stat.S_ISREG(st.st_mode):
            file_bytes += st.st_size
    return LayerScan("sha256:" + digest.hexdigest(), entries, file_bytes)


def walk_metadata(layer_dir: Path) -> Iterator[tuple[bytes, os.stat_result]]:
    """(path relative to layer_dir, lstat) of every entry below it, in os.walk's order (a directory's entries sorted
    by name, then each subdirectory's in that order), so fingerprints stay those os.walk gave, but at any depth:
    no recursion, no path strings (PATH_MAX), at most MAX_DIR_FDS directory fds (_OpenDirs). As with os.walk, an
    entry gone or a directory unreadable meanwhile is left out; an ancestor moved meanwhile is SourceChanged."""
    try:
        root_fd = os.open(layer_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return
    dirs = _OpenDirs(root_fd, layer_dir)
    prefix = b""
    prefix_ends: list[int] = []  # where each ancestor's path ends in prefix
    pending: list[list[tuple[bytes, os.stat_result]]] = []  # per level, the subdirectories still to walk, last first
    try:
        while True:
            listed = _stat_dir(dirs.fd)
            for name, st in listed:
                yield prefix + name, st
            pending.append([(name, st) for name, st in reversed(listed) if stat.S_ISDIR(st.st_mode)])
            while True:  # on to the next subdirectory, climbing out of the directories done
                while pending and not pending[-1]:
                    pending.pop()
                    if pending:
                        dirs.leave(prefix)
                        prefix = prefix[: prefix_ends.pop()]
                if not pending:
                    return
                name, st = pending[-1].pop()
                try:
                    dirs.enter(name, st, prefix)
                    break
                except LayerError:  # gone, replaced or unreadable since it was listed: os.walk skips it too
                    continue
            prefix_ends.append(len(prefix))
            prefix += name + b"/"
    finally:
        dirs.close()
        os.close(root_fd)


def _stat_dir(fd: int) -> list[tuple[bytes, os.stat_result]]:
    """(name, lstat) of the entries of the directory open as fd, sorted by name; [] if it cannot be listed."""
    try:
        names = sorted(os.fsencode(n) for n in os.listdir(fd))
    except OSError:
        return []
    found = []
    for name in names:
        try:
            found.append((name, os.stat(name, dir_fd=fd, follow_symlinks=False)))
        except FileNotFoundError:
            continue
    return found


def write_layer(
    layer_dir: Path,
    out: BinaryIO,
    *,
    clamp_mtime: int | None = None,
    progress: Callable[[int], None] | None = None,
    overlay_xattrs: str | None = "trusted",
) -> LayerRecord:
    """Write layer_dir as a tar to out and return its diff_id and size; out receives every byte exactly once.

    progress, if given, is called with the bytes written so far after each regular file. overlay_xattrs names the
    xattr namespace of the layer's overlay markers ("trusted" or "user", container.Layer), or is None for a merged
    view, which has none: overlay xattrs of any other namespace are never read as markers (whiteout.py).
    """
    try:
        root_fd = os.open(layer_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as e:
        raise LayerError(f"{layer_dir}: cannot open layer directory ({e.strerror})") from e
    try:
        whiteout.check_markers_visible(layer_dir, overlay_xattrs)
    except BaseException:
        os.close(root_fd)
        raise
    sink = HashingSink(out)
    hardlinks: dict[tuple[int, int], bytes] = {}
    try:
        for parent_fd, prefix, entry in _walk(root_fd, layer_dir, overlay_xattrs):
            _write_entry(sink, parent_fd, prefix, entry, layer_dir, hardlinks, clamp_mtime)
            if progress is not None and stat.S_ISREG(entry.st.st_mode):
                progress(sink.size)
    finally:
        os.close(root_fd)
    sink.write(tarheader.END_OF_ARCHIVE)
    return sink.record()


def _walk(root_fd: int, layer_dir: Path, overlay_xattrs: str | None) -> Iterator[tuple[int, bytes, _Entry]]:
    """Yield (parent fd, tar prefix, entry) in tar-name order; directories are opened relative to their parent.

    Any depth the kernel allows: an explicit stack rather than recursion (a container can nest directories far
    deeper than Python's recursion limit), no path strings (PATH_MAX), at most MAX_DIR_FDS directory fds
    (_OpenDirs), and per level only the entries still to come, named relative to their directory, so memory grows
    with the depth, not with its square. A path longer than loaders read (MAX_TAR_NAME) is refused naming it.
    """
    dirs = _OpenDirs(root_fd, layer_dir)
    prefix = b""
    prefix_ends: list[int] = []  # where each ancestor's tar path ends in prefix
    pending = [_list_dir(root_fd, layer_dir, b"", overlay_xattrs)]  # per level, the entries to come, last first
    try:
        while True:
            if not pending[-1]:
                pending.pop()
                if not pending:
                    return
                dirs.leave(prefix)
                prefix = prefix[: prefix_ends.pop()]
                continue
            entry = pending[-1].pop()
            tar_name = prefix + entry.tar_name
            if len(tar_name) > MAX_TAR_NAME:
                raise LayerError(
                    f"{_describe(layer_dir, tar_name[:128])}...{_describe_tail(tar_name[-128:])}: a path of"
                    f" {len(tar_name)} bytes, longer than image loaders read ({MAX_TAR_NAME}; Go's archive/tar"
                    " refuses a tar header over 1 MiB); shorten the directory chain in the container"
                )
            yield dirs.fd, prefix, replace(entry, tar_name=tar_name)
            if stat.S_ISDIR(entry.st.st_mode):
                dirs.enter(entry.name, entry.st, prefix)
                prefix_ends.append(len(prefix))
                prefix += entry.name + b"/"
                pending.append(_list_dir(dirs.fd, layer_dir, prefix, overlay_xattrs))
    finally:
        dirs.close()


class _OpenDirs:
    """The directories from a walk's root down to the one it is in, at most MAX_DIR_FDS of them open (plus the
    root, whose fd stays the caller's).

    Each is opened relative to its parent's fd with O_NOFOLLOW and must be the inode its parent listed. Going
    deeper than MAX_DIR_FDS closes the shallowest open one; climbing back to a closed one re-opens it as ".." of its
    child (the kernel's link to the parent: never a symlink, never a path string, so neither a symlink planted
    meanwhile nor PATH_MAX matters), which must again be the inode listed, else SourceChanged: a directory moved
    while the layer is packed cannot make the walk read another one. Each climb costs one open, so the whole walk
    stays linear in the number of directories.
    """

    def __init__(self, root_fd: int, layer_dir: Path) -> None:
        st = os.fstat(root_fd)
        self._fds: list[int | None] = [root_fd]
        self._ids = [(st.st_dev, st.st_ino)]
        self._shallowest = 1  # the levels from here down are open; those above it (but the root) are closed
        self._layer_dir = layer_dir

    @property
    def fd(self) -> int:
        """The fd of the directory the walk is in."""
        fd = self._fds[-1]
        assert fd is not None
        return fd

    def enter(self, name: bytes, listed: os.stat_result, prefix: bytes) -> None:
        """Go into the subdirectory name of the current directory (whose tar path is prefix), listed as listed."""
        fd = _open_at(self.fd, name, os.O_DIRECTORY, self._layer_dir, prefix)
        ident = (listed.st_dev, listed.st_ino)
        _check_same_dir(fd, ident, self._layer_dir, prefix + name)
        self._fds.append(fd)
        self._ids.append(ident)
        if len(self._fds) - self._shallowest > MAX_DIR_FDS:
            shallowest = self._fds[self._shallowest]
            assert shallowest is not None
            os.close(shallowest)
            self._fds[self._shallowest] = None
            self._shallowest += 1

    def leave(self, prefix: bytes) -> None:
        """Climb back to the parent of the current directory (whose tar path is prefix), re-opening it if closed."""
        fd = self.fd
        self._fds.pop()
        self._ids.pop()
        try:
            if self._fds[-1] is None:
                parent = _open_at(fd, b"..", os.O_DIRECTORY, self._layer_dir, prefix)
                _check_same_dir(parent, self._ids[-1], self._layer_dir, prefix + b"..")
                self._fds[-1] = parent
                self._shallowest = len(self._fds) - 1
        finally:
            os.close(fd)

    def close(self) -> None:
        """Close every fd it opened."""
        for fd in self._fds[1:]:
            if fd is not None:
                os.close(fd)
        del self._fds[1:], self._ids[1:]


def _check_same_dir(fd: int, ident: tuple[int, int], layer_dir: Path, rel: bytes) -> None:
    st = os.fstat(fd)
    if (st.st_dev, st.st_ino) != ident:
        os.close(fd)
        raise SourceChanged(f"{_describe(layer_dir, rel)}: replaced or moved while the layer was packed")


def _list_dir(fd: int, layer_dir: Path, prefix: bytes, overlay_xattrs: str | None) -> list[_Entry]:
    entries = []
    try:
        text_names = os.listdir(fd)
    except OSError as e:
        raise LayerError(f"{_describe(layer_dir, prefix)}: cannot list ({e.strerror}); {_remedy(e)}") from e
    where = _describe_bytes(layer_dir, prefix)  # the path of this directory, for errors naming an entry
    for text_name in text_names:
        name = os.fsencode(text_name)
        try:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError as e:
            raise SourceChanged(_describe(layer_dir, prefix + name) + ": vanished while the layer was packed") from e
        xattrs = _read_xattrs(fd, name, layer_dir, prefix)
        # Converted here rather than when written: a whiteout's tar name, not its own, decides where it sorts.
        conversion = whiteout.convert(where + name, st, xattrs, overlay_xattrs)
        # Directories sort as "name/" so that a walk in this order is also ordered by full tar path.
        tar_name = conversion.name + (b"/" if stat.S_ISDIR(st.st_mode) else b"")
        entries.append(_Entry(tar_name, name, st, conversion))
    # Relative tar names (_walk prepends the prefix they share) and last first, for _walk to pop.
    entries.sort(key=lambda e: e.tar_name, reverse=True)
    return entries


def _read_xattrs(fd: int, name: bytes, layer_dir: Path, prefix: bytes) -> dict[str, bytes]:
    # Through /proc/self/fd the parent is pinned: a directory swapped for a symlink cannot redirect the read.
    path = b"/proc/self/fd/%d/%s" % (fd, name)
    try:
        names = os.listxattr(path, follow_symlinks=False)
        xattrs = {n: os.getxattr(path, n, follow_symlinks=False) for n in names}
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.ENODATA):
            return {}
        raise LayerError(f"{_describe(layer_dir, prefix + name)}: cannot read xattrs ({e.strerror})") from e
    # The kernel allows any bytes but NUL in a name; a SCHILY.xattr.<name> pax record needs UTF-8 (POSIX: pax
    # keywords are UTF-8) and no "=" (every reader splits the record at the first one, so the image would get
    # another xattr than the file has). listxattr gives bytes that are not UTF-8 as surrogate escapes.
    for kept in whiteout.kept_xattrs(xattrs):
        if "=" in kept or _SURROGATE_ESCAPE.search(kept):
            raise LayerError(
                f"{_describe(layer_dir, prefix + name)}: has the xattr {os.fsencode(kept)!r}, whose name a layer tar"
                " cannot carry (not UTF-8, or holding '='); remove it in the container"
                " (setfattr -x) before committing"
            )
    return xattrs


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
        raise LayerError(f"{what}: cannot open ({e.strerror}); {_remedy(e)}") from e


def _remedy(e: OSError) -> str:
    if e.errno in (errno.EMFILE, errno.ENFILE):
        # The walk itself needs MAX_DIR_FDS + 3 at any depth: this is a limit set far too low, or a leak.
        return "raise the open files limit (ulimit -n, systemd LimitNOFILE=) and re-run"
    return "check its permissions"


def _write_entry(
    sink: HashingSink,
    fd: int,
    prefix: bytes,
    entry: _Entry,
    layer_dir: Path,
    hardlinks: dict[tuple[int, int], bytes],
    clamp_mtime: int | None,
) -> None:
    st = entry.st
    # Whole seconds from the integer nanoseconds: the float st_mtime rounds x.999999999 up to the next second.
    seconds = st.st_mtime_ns // 1_000_000_000
    mtime = seconds if clamp_mtime is None else min(seconds, clamp_mtime)
    common: dict[str, Any] = {"uid": st.st_uid, "gid": st.st_gid, "mtime": mtime}
    match entry.conversion:
        case whiteout.Whiteout():
            _write_marker(sink, entry.tar_name, common)
        case whiteout.OpaqueDirectory(xattrs=kept):
            header = Header(entry.tar_name, tarheader.DIRECTORY, st.st_mode, xattrs=kept, **common)
            sink.write(tarheader.build_header(header))
            _write_marker(sink, entry.tar_name + whiteout.OPAQUE_MARKER, common)
        case whiteout.Plain(xattrs=kept):
            _write_plain(sink, fd, prefix, entry, layer_dir, kept, hardlinks, common)
        case unknown:
            assert_never(unknown)


def _write_marker(sink: HashingSink, tar_name: bytes, common: dict[str, Any]) -> None:
    # moby writes whiteouts as empty 0600 files; owners and mtime are kept for reproducibility.
    sink.write(tarheader.build_header(Header(tar_name, tarheader.REGULAR, mode=0o600, **common)))


def _write_plain(
    sink: HashingSink,
    fd: int,
    prefix: bytes,
    entry: _Entry,
    layer_dir: Path,
    kept: dict[str, bytes],
    hardlinks: dict[tuple[int, int], bytes],
    common: dict[str, Any],
) -> None:
    st = entry.st
    mode = st.st_mode
    if stat.S_ISDIR(mode):
        sink.write(tarheader.build_header(Header(entry.tar_name, tarheader.DIRECTORY, mode, xattrs=kept, **common)))
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


def _describe_tail(rel: bytes) -> str:
    return os.fsdecode(rel).encode("utf-8", "backslashreplace").decode("utf-8")


def encode_record(record: LayerRecord) -> bytes:
    doc = {"diff_id": record.diff_id, "size": record.size, "fingerprint": record.fingerprint}
    return json.dumps(doc, sort_keys=True).encode()


def read_record(path: Path) -> LayerRecord:
    """A record written by encode_record; a damaged one raises LayerError naming the file."""
    try:
        doc = jsoncheck.loads(path.read_bytes())
        if not isinstance(doc, dict):
            raise jsoncheck.FieldError("the record", "a JSON object", doc)
        diff_id, size = jsoncheck.string(doc.get("diff_id"), "diff_id"), doc.get("size")
        # Both name a cache blob (blobs/sha256/<hex>) and its size: anything else is damage.
        if not _DIFF_ID.fullmatch(diff_id):
            raise jsoncheck.FieldError("diff_id", "sha256:<64 hex digits>", diff_id)
        record = LayerRecord(diff_id, jsoncheck.whole_number(size, "size", 0), doc.get("fingerprint", ""))
        jsoncheck.string(record.fingerprint, "fingerprint")
        return record
    except (OSError, ValueError) as e:
        raise LayerError(f"{path}: damaged layer record ({e}); delete it and re-run") from e

"""Walks a layer_dir in tar-name order at any depth: each directory listed, stat'ed and converted once (by
pipeline.layer.whiteout.convert), opened relative to its parent with a bounded number of fds.

The tar writer (pipeline.layer.writer), the delta writer (pipeline.layer.delta) and the metadata fingerprint
(scan_layer) share these walks, so they see the same entries in the same order.
"""

import errno
import hashlib
import os
import re
import stat
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from pipeline.errors import LayerError, SourceChanged
from pipeline.layer import whiteout

# O_NOATIME keeps packing from touching the source's atimes; only the owner or root may ask for it.
_O_NOATIME = getattr(os, "O_NOATIME", 0)
_SURROGATE_ESCAPE = re.compile("[\udc80-\udcff]")  # os.fsdecode's stand-ins for bytes that are not UTF-8
# A walk holds at most this many directory fds besides the layer's root, however deep the tree: going deeper closes
# the shallowest, which is re-opened as ".." of its child when the walk climbs back (OpenDirs).
MAX_DIR_FDS = 16
# Go's archive/tar, which docker, podman, containerd, skopeo and umoci load layers with, refuses a PAX header over
# 1 MiB (reader.go, maxSpecialFileSize) and so the whole archive: a longer path is refused here, naming it. A
# hardlink's header holds two paths, which leaves room for them and the other records.
MAX_TAR_NAME = 256 << 10


@dataclass(frozen=True, slots=True)
class Entry:
    """One entry of a layer_dir as listed: what the tar holds for it is decided here, once (conversion)."""

    tar_name: bytes  # its tar name: relative to its directory in a listing, the whole path once walked; the sort key
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
    utime since the last scan changes it, so an equal fingerprint means an unchanged layer. A whiteout device
    counts without its ctime, which a remount changes (whiteout.is_whiteout_device), but with what its tar
    entry holds (owner, mtime).
    """
    digest = hashlib.sha256()
    entries = file_bytes = 0
    base = os.path.join(os.fsencode(layer_dir), b"")  # the bytes os.walk's paths began with
    for rel, st in walk_metadata(layer_dir):
        if whiteout.is_whiteout_device(st):  # without ctime, which a remount changes (is_whiteout_device)
            digest.update(
                b"%s%s\0w %d %d %d %d %d\n" % (base, rel, st.st_mtime_ns, st.st_ino, st.st_mode, st.st_uid, st.st_gid)
            )
            continue
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
    no recursion, no path strings (PATH_MAX), at most MAX_DIR_FDS directory fds (OpenDirs). As with os.walk, an
    entry gone or a directory unreadable meanwhile is left out; an ancestor moved meanwhile is SourceChanged."""
    try:
        root_fd = os.open(layer_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return
    dirs = OpenDirs(root_fd, layer_dir)
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


def walk_entries(
    root_fd: int,
    layer_dir: Path,
    overlay_xattrs: str | None,
    *,
    listed: Callable[[Sequence[Entry]], None] | None = None,
) -> Iterator[tuple[int, bytes, Entry]]:
    """Yield (parent fd, tar prefix, entry) in tar-name order; directories are opened relative to their parent.

    listed, if given, receives each directory's listing (list_dir) as it is read: the root's first, then each
    subdirectory's when the walk enters it, so in the order the walk yields the directories themselves.

    Any depth the kernel allows: an explicit stack rather than recursion (a container can nest directories far
    deeper than Python's recursion limit), no path strings (PATH_MAX), at most MAX_DIR_FDS directory fds
    (OpenDirs), and per level only the entries still to come, named relative to their directory, so memory grows
    with the depth, not with its square. A path longer than loaders read (MAX_TAR_NAME) is refused naming it.
    """
    dirs = OpenDirs(root_fd, layer_dir)
    prefix = b""
    prefix_ends: list[int] = []  # where each ancestor's tar path ends in prefix
    pending = [_listing(root_fd, layer_dir, b"", overlay_xattrs, listed)]  # per level, the entries to come, last first
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
            check_tar_name(layer_dir, tar_name)
            yield dirs.fd, prefix, replace(entry, tar_name=tar_name)
            if stat.S_ISDIR(entry.st.st_mode):
                dirs.enter(entry.name, entry.st, prefix)
                prefix_ends.append(len(prefix))
                prefix += entry.name + b"/"
                pending.append(_listing(dirs.fd, layer_dir, prefix, overlay_xattrs, listed))
    finally:
        dirs.close()


def _listing(
    fd: int,
    layer_dir: Path,
    prefix: bytes,
    overlay_xattrs: str | None,
    listed: Callable[[Sequence[Entry]], None] | None,
) -> list[Entry]:
    """list_dir's entries, handed to listed, and then last first for the walk to pop."""
    entries = list_dir(fd, layer_dir, prefix, overlay_xattrs)
    if listed is not None:
        listed(entries)
    return entries[::-1]


def check_tar_name(layer_dir: Path, tar_name: bytes) -> None:
    """Refuse, naming it, a tar path longer than image loaders read (MAX_TAR_NAME)."""
    if len(tar_name) > MAX_TAR_NAME:
        raise LayerError(
            f"{describe(layer_dir, tar_name[:128])}...{_describe_tail(tar_name[-128:])}: a path of"
            f" {len(tar_name)} bytes, longer than image loaders read ({MAX_TAR_NAME}; Go's archive/tar"
            " refuses a tar header over 1 MiB); shorten the directory chain in the container"
        )


class OpenDirs:
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
        fd = open_at(self.fd, name, os.O_DIRECTORY, self._layer_dir, prefix)
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
                parent = open_at(fd, b"..", os.O_DIRECTORY, self._layer_dir, prefix)
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
        raise SourceChanged(f"{describe(layer_dir, rel)}: replaced or moved while the layer was packed")


def list_dir(
    fd: int,
    layer_dir: Path,
    prefix: bytes,
    overlay_xattrs: str | None,
    *,
    known: Callable[[bytes, os.stat_result], whiteout.Conversion | None] | None = None,
) -> list[Entry]:
    """The entries of the directory open as fd (whose tar path is prefix), each converted, sorted by tar name
    (relative to the directory). known, if given, answers for an entry (name, lstat) the conversion an earlier
    walk made of it when its lstat says it has not changed since (the ctime moves with any change, xattrs
    included): its xattrs are not read again."""
    entries = []
    try:
        text_names = os.listdir(fd)
    except OSError as e:
        raise LayerError(f"{describe(layer_dir, prefix)}: cannot list ({e.strerror}); {_remedy(e)}") from e
    where = _describe_bytes(layer_dir, prefix)  # the path of this directory, for errors naming an entry
    for text_name in text_names:
        name = os.fsencode(text_name)
        try:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError as e:
            raise SourceChanged(describe(layer_dir, prefix + name) + ": vanished while the layer was packed") from e
        conversion = known(name, st) if known is not None else None
        if conversion is None:
            xattrs = _read_xattrs(fd, name, layer_dir, prefix)
            # Converted here rather than when written: a whiteout's tar name, not its own, decides where it sorts.
            conversion = whiteout.convert(where + name, st, xattrs, overlay_xattrs)
        # Directories sort as "name/" so that a walk in this order is also ordered by full tar path.
        tar_name = conversion.name + (b"/" if stat.S_ISDIR(st.st_mode) else b"")
        entries.append(Entry(tar_name, name, st, conversion))
    entries.sort(key=lambda e: e.tar_name)
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
        raise LayerError(f"{describe(layer_dir, prefix + name)}: cannot read xattrs ({e.strerror})") from e
    # The kernel allows any bytes but NUL in a name; a SCHILY.xattr.<name> pax record needs UTF-8 (POSIX: pax
    # keywords are UTF-8) and no "=" (every reader splits the record at the first one, so the image would get
    # another xattr than the file has). listxattr gives bytes that are not UTF-8 as surrogate escapes.
    for kept in whiteout.kept_xattrs(xattrs):
        if "=" in kept or _SURROGATE_ESCAPE.search(kept):
            raise LayerError(
                f"{describe(layer_dir, prefix + name)}: has the xattr {os.fsencode(kept)!r}, whose name a layer tar"
                " cannot carry (not UTF-8, or holding '='); remove it in the container"
                " (setfattr -x) before committing"
            )
    return xattrs


def open_at(dir_fd: int, name: bytes, flags: int, layer_dir: Path, prefix: bytes) -> int:
    """Open name in the directory dir_fd (whose tar path is prefix) without following a symlink, O_NOATIME where
    allowed; an entry gone or replaced meanwhile is SourceChanged."""
    base = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | flags
    try:
        try:
            return os.open(name, base | _O_NOATIME, dir_fd=dir_fd)
        except PermissionError:
            return os.open(name, base, dir_fd=dir_fd)
    except OSError as e:
        what = describe(layer_dir, prefix + name)
        if e.errno in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR):
            raise SourceChanged(f"{what}: replaced or removed while the layer was packed") from e
        raise LayerError(f"{what}: cannot open ({e.strerror}); {_remedy(e)}") from e


def _remedy(e: OSError) -> str:
    if e.errno in (errno.EMFILE, errno.ENFILE):
        # The walk itself needs MAX_DIR_FDS + 3 at any depth: this is a limit set far too low, or a leak.
        return "raise the open files limit (ulimit -n, systemd LimitNOFILE=) and re-run"
    return "check its permissions"


def _describe_bytes(layer_dir: Path, rel: bytes) -> bytes:
    return os.fsencode(layer_dir) + b"/" + rel


def describe(layer_dir: Path, rel: bytes) -> str:
    """layer_dir/rel for a message: bytes that are not UTF-8 shown as escapes."""
    return os.fsdecode(_describe_bytes(layer_dir, rel)).encode("utf-8", "backslashreplace").decode("utf-8")


def _describe_tail(rel: bytes) -> str:
    return os.fsdecode(rel).encode("utf-8", "backslashreplace").decode("utf-8")

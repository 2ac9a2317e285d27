"""Writes the image archive: a tar of blobs, manifest.json and repositories in a fixed order.

Layout: Docker Engine 25's `docker save` (blobs/sha256/<hex> referenced from manifest.json).
"""

import errno
import os
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipeline.host import failpoint, reflink
from pipeline.layer import tarheader
from pipeline.layer.tarheader import Header

_COPY_CHUNK = 1 << 20


@dataclass(frozen=True)
class Member:
    """One archive member: either a file copied in (path) or small bytes (data)."""

    name: str
    path: Path | None = None
    data: bytes = b""


def archive_size(members: list[Member]) -> int:
    """The archive's size before it is written (headers, data, padding), to check free space first."""
    names = {m.name for m in members}
    directories = {"/".join(n.split("/")[:i]) for n in names for i in range(1, n.count("/") + 1)}
    sizes = {m.name: m.path.stat().st_size if m.path else len(m.data) for m in members}
    # A pax header (1024 bytes) at most per member beyond its own block: names here are short and ASCII; a blob
    # whose data is aligned (tarheader.ALIGN_DATA_FROM) up to ALIGNMENT more.
    aligned = sum(tarheader.ALIGNMENT for m in members if m.path and sizes[m.name] >= tarheader.ALIGN_DATA_FROM)
    blocks = sum(-(-s // 512) * 512 for s in sizes.values())
    return (len(directories) + len(names)) * 1536 + blocks + aligned + 1024


def write_image_archive(
    dest: Path, members: list[Member], *, mtime: int, progress: Callable[[int], None] | None = None
) -> int:
    """Write members to dest in the given order, each name once; return the archive's size. progress, if given,
    is called with the bytes written so far after each member."""
    seen: set[str] = set()
    directories: list[str] = []
    for member in members:
        parts = member.name.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            directory = "/".join(parts[:i]) + "/"
            if directory not in directories:
                directories.append(directory)
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        for directory in directories:
            header = Header(directory.encode(), tarheader.DIRECTORY, mode=0o755, mtime=mtime)
            _write_all(fd, tarheader.build_header(header))
        for member in members:
            if member.name in seen:  # two layers with equal content share one blob
                continue
            seen.add(member.name)
            size = member.path.stat().st_size if member.path else len(member.data)
            header = Header(member.name.encode(), tarheader.REGULAR, size=size, mtime=mtime)
            aligned = member.path is not None and size >= tarheader.ALIGN_DATA_FROM
            _write_all(fd, tarheader.build_header(header, align_at=os.lseek(fd, 0, os.SEEK_CUR) if aligned else None))
            if member.path:
                _copy_file(member.path, fd, size, clone=aligned)
                failpoint.reached("archive:blob-copied")
            else:
                _write_all(fd, member.data)
            _write_all(fd, tarheader.padding(size))
            if progress is not None:
                progress(os.lseek(fd, 0, os.SEEK_CUR))
        _write_all(fd, tarheader.END_OF_ARCHIVE)
        return os.lseek(fd, 0, os.SEEK_CUR)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _copy_file(path: Path, out_fd: int, size: int, *, clone: bool = False) -> None:
    # Shared where the filesystem can (clone: the member's data starts on an ALIGNMENT boundary); else a plain
    # 1 MiB readinto/write loop: measured (benchmarks/levers.py, lever 5) 24% faster than os.copy_file_range and
    # sendfile on ext4 for the cached blobs (0.17 s vs 0.22 s for 512 MB).
    buf = memoryview(bytearray(_COPY_CHUNK))
    with open(path, "rb", buffering=0) as f:
        if clone:
            offset = os.lseek(out_fd, 0, os.SEEK_CUR)
            if os.fstat(f.fileno()).st_size == size and reflink.clone_range(f.fileno(), 0, size, out_fd, offset):
                os.lseek(out_fd, offset + size, os.SEEK_SET)
                return
        remaining = size
        while remaining:
            n = f.readinto(buf[: min(remaining, _COPY_CHUNK)])
            if not n:
                raise OSError(errno.EIO, f"{path} shrank while it was copied into the archive")
            _write_all(out_fd, buf[:n])
            remaining -= n


def read_member(archive: Path, name: str, *, limit: int = 16 << 20) -> bytes | None:
    """The bytes of one small member of an image archive (a tar, or an OCI layout directory), or None when the
    archive is missing, unreadable, not an archive, or has no such member of at most limit bytes.

    Only headers are read on the way (tarfile seeks over layer data), so this is cheap even for large archives.
    """
    try:
        if archive.is_dir():
            path = archive / name
            if path.is_symlink() or not path.is_file() or path.stat().st_size > limit:
                return None
            return path.read_bytes()
        with tarfile.open(archive, "r:") as tar:
            for info in tar:
                if info.name == name and info.isreg() and info.size <= limit:
                    member = tar.extractfile(info)
                    return member.read() if member is not None else None
    except (OSError, tarfile.TarError, ValueError, EOFError):
        return None
    return None

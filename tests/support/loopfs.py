"""Filesystems that share extents, for real: an XFS (reflink=1) or btrfs image on a loop device, mounted for one
test, and FIEMAP to see which physical blocks a file's data occupies."""

from __future__ import annotations

import fcntl
import shutil
import struct
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

MKFS = {"xfs": ["mkfs.xfs", "-q", "-f", "-m", "reflink=1"], "btrfs": ["mkfs.btrfs", "-q", "-f"]}
BLOCK = 4096

# linux/fs.h FS_IOC_FIEMAP = _IOWR('f', 11, struct fiemap); struct fiemap is 32 bytes, each fiemap_extent 56.
_FS_IOC_FIEMAP = 0xC020660B
_FIEMAP = struct.Struct("=QQIIII")
_EXTENT = struct.Struct("=QQQQQI12x")
FIEMAP_EXTENT_LAST = 0x1
FIEMAP_EXTENT_SHARED = 0x2000
_FIEMAP_FLAG_SYNC = 0x1


def missing_tools(kind: str) -> str | None:
    """Why a `kind` filesystem cannot be made here, or None."""
    tool = MKFS[kind][0]
    if shutil.which(tool) is None:
        return f"needs {tool} (./dev setup installs xfsprogs and btrfs-progs as root)"
    return None


@contextmanager
def loop_filesystem(kind: str, image: Path, mountpoint: Path, *, size: int = 512 << 20) -> Iterator[Path]:
    """A fresh `kind` filesystem of size bytes in the sparse file image, mounted (loop) at mountpoint."""
    with open(image, "wb") as f:
        f.truncate(size)
    subprocess.run([*MKFS[kind], str(image)], check=True, capture_output=True)
    mountpoint.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mountpoint)], check=True, capture_output=True)
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", str(mountpoint)], check=False, capture_output=True)
        image.unlink(missing_ok=True)


def extents(path: Path) -> list[tuple[int, int, int, int]]:
    """(logical, physical, length, flags) of every extent of path's data, after syncing it."""
    found: list[tuple[int, int, int, int]] = []
    start = 0
    with open(path, "rb") as f:
        while True:
            count = 64
            request = bytearray(_FIEMAP.pack(start, 2**64 - 1 - start, _FIEMAP_FLAG_SYNC, 0, count, 0))
            request += bytes(_EXTENT.size * count)
            fcntl.ioctl(f.fileno(), _FS_IOC_FIEMAP, request)
            mapped = _FIEMAP.unpack_from(request)[3]
            if not mapped:
                return found
            last = False
            for i in range(mapped):
                logical, physical, length, _, _, flags = _EXTENT.unpack_from(request, _FIEMAP.size + i * _EXTENT.size)
                found.append((logical, physical, length, flags))
                start = logical + length
                last = bool(flags & FIEMAP_EXTENT_LAST)
            if last:
                return found


def physical_blocks(path: Path, offset: int, length: int) -> list[int]:
    """The physical block (BLOCK bytes) behind each whole block of path's bytes [offset, offset + length), in
    order; -1 for a block no extent maps (a hole)."""
    blocks = []
    mapped = extents(path)
    for logical in range(offset, offset + length - length % BLOCK, BLOCK):
        physical = -1
        for start, at, size, _ in mapped:
            if start <= logical < start + size:
                physical = (at + logical - start) // BLOCK
                break
        blocks.append(physical)
    return blocks


def shared(path: Path) -> bool:
    """Whether any extent of path is marked shared with another file."""
    return any(flags & FIEMAP_EXTENT_SHARED for _, _, _, flags in extents(path))

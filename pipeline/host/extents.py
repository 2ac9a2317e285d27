"""A file's extent map edited in place (fallocate(2)): a range removed with everything after it moved down
(FALLOC_FL_COLLAPSE_RANGE), or turned into a hole (FALLOC_FL_PUNCH_HOLE), without copying a byte of data.

ext4 and XFS do both for block-aligned ranges; btrfs, tmpfs, overlayfs and NFS refuse collapsing (collapse_range
returns False, nothing changed) and the caller assembles its file another way.
"""

import ctypes
import ctypes.util
import errno
import os
from collections.abc import Callable
from pathlib import Path

# include/uapi/linux/falloc.h
_KEEP_SIZE = 0x01
_PUNCH_HOLE = 0x02
_COLLAPSE_RANGE = 0x08
_REFUSED = {errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENODEV, errno.EPERM}

_fallocate: Callable[[int, int, int, int], int] | None = None


def _call(fd: int, mode: int, offset: int, length: int) -> int:
    """fallocate(fd, mode, offset, length): 0, or the errno."""
    global _fallocate
    if _fallocate is None:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        func = libc.fallocate
        func.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
        func.restype = ctypes.c_int
        _fallocate = func
    if _fallocate(fd, mode, offset, length) == 0:
        return 0
    return ctypes.get_errno()


def collapse_range(fd: int, offset: int, length: int) -> bool:
    """Remove length bytes at offset, moving the rest of the file down by length; False where the filesystem
    refuses (nothing changed). Both must be multiples of the filesystem's block size and the range must end
    before the end of the file. Other errors are raised."""
    if length == 0:
        return True
    err = _call(fd, _COLLAPSE_RANGE, offset, length)
    if err in _REFUSED:
        return False
    if err:
        raise OSError(err, f"collapsing {length} bytes at {offset}: {os.strerror(err)}")
    return True


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Make length bytes at offset read as zeros and free their blocks (the file's size stays); where the
    filesystem cannot, the range is overwritten with zeros instead."""
    if length <= 0:
        return
    err = _call(fd, _PUNCH_HOLE | _KEEP_SIZE, offset, length)
    if not err:
        return
    if err not in _REFUSED:
        raise OSError(err, f"punching {length} bytes at {offset}: {os.strerror(err)}")
    end = min(offset + length, os.fstat(fd).st_size)
    zeros = bytes(1 << 20)
    while offset < end:
        offset += os.pwrite(fd, zeros[: end - offset], offset)


def can_collapse(directory: Path, block: int) -> bool:
    """Whether files in directory can have ranges of block bytes (and multiples) collapsed: a probe file is made
    and removed."""
    probe = directory / f".collapse-probe-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError:
        return False
    try:
        os.pwrite(fd, b"\1", 3 * block - 1)
        return collapse_range(fd, block, block) and os.fstat(fd).st_size == 2 * block
    except OSError:
        return False
    finally:
        os.close(fd)
        probe.unlink(missing_ok=True)

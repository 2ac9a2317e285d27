"""Early writeback: a file written to be fsync'd at the end has its pages sent to the disk while it is still being
written, so the closing fsync waits for the last few MiB instead of the whole file.

Linux's sync_file_range(SYNC_FILE_RANGE_WRITE) starts writeback of a range and returns without waiting (the
technique RocksDB's bytes_per_sync and git's core.fsyncMethod=batch use). It makes nothing durable by itself:
the fsync after the last write still does, and still is what a reader may rely on. Where the call is missing
(another OS, a filesystem that refuses it) writes go on as plain writes.
"""

import ctypes
import ctypes.util
import errno
from collections.abc import Callable
from typing import Any, BinaryIO

WINDOW = 8 << 20  # bytes written between two writeback requests
_SYNC_FILE_RANGE_WRITE = 2  # include/uapi/linux/fs.h

_libc: ctypes.CDLL | None = None
_available = True


def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    global _libc, _available
    if not _available:
        return None
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
            func = _libc.sync_file_range
        except (OSError, AttributeError):
            _available = False
            return None
        func.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
        func.restype = ctypes.c_int
    found: Callable[[int, int, int, int], int] = _libc.sync_file_range
    return found


class WritebackFile:
    """Writes to out (a buffered binary file) and, every WINDOW bytes, flushes it and starts the writeback of
    what was written since the last request."""

    def __init__(self, out: BinaryIO, window: int = WINDOW) -> None:
        self._out = out
        self._window = window
        self._written = 0
        self._requested = 0  # the offset up to which writeback was requested
        self._start = out.tell()

    def write(self, data: bytes | memoryview) -> int:
        n = self._out.write(data)
        self._written += len(data)
        if self._written - self._requested >= self._window:
            self._request()
        return n

    def flush(self) -> None:
        self._out.flush()

    def fileno(self) -> int:
        return self._out.fileno()

    def tell(self) -> int:
        return self._out.tell()

    def seek(self, offset: int, whence: int = 0) -> int:
        """Move as the file does (after a clone appended data not written here); what lies behind is not
        requested again."""
        position = self._out.seek(offset, whence)
        self._written = self._requested = position - self._start
        return position

    def __getattr__(self, name: str) -> Any:  # anything else a writer asks of its file
        return getattr(self._out, name)

    def _request(self) -> None:
        global _available
        func = _sync_file_range()
        if func is None:
            self._requested = self._written
            return
        self._out.flush()
        offset, length = self._start + self._requested, self._written - self._requested
        if func(self._out.fileno(), offset, length, _SYNC_FILE_RANGE_WRITE) != 0:
            if ctypes.get_errno() in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                _available = False
        self._requested = self._written

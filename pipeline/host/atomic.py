"""Atomic, durable file writes: a temporary sibling, flushed and fsync'd, then renamed over the target."""

import ctypes
import errno
import logging
import os
import re
import secrets
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.errors import OutputError
from pipeline.host import failpoint
from pipeline.host.process import is_alive

log = logging.getLogger(__name__)

# Temporary names carry the writer's host and pid, so a later run can tell abandoned ones from live ones.
_HOST = re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname())[:64] or "host"
_PARTIAL = re.compile(r"^\..*\.partial-(?P<host>[A-Za-z0-9_.-]+)-(?P<pid>\d+)-[0-9a-f]{8}$")
# A partial file from another host is only presumed abandoned after this long.
_FOREIGN_PARTIAL_AGE = 24 * 3600
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def partial_path(final: Path) -> Path:
    """A fresh temporary path in final's directory (same filesystem, so the rename is atomic)."""
    return final.with_name(f".{final.name}.partial-{_HOST}-{os.getpid()}-{secrets.token_hex(4)}")


def is_partial(path: Path) -> bool:
    return _PARTIAL.match(path.name) is not None


@contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path to write (a file, or a directory the caller creates); on success it becomes final
    durably, on any error it is removed."""
    make_dirs(final.parent)
    remove_abandoned_partials(final.parent)
    temp = partial_path(final)
    try:
        yield temp
        fsync_file(temp)
        failpoint.reached("atomic:before-rename")
        if temp.is_dir() and final.is_dir() and not final.is_symlink():
            _replace_dir(temp, final)
        else:
            os.replace(temp, final)
    except OSError as e:
        _remove(temp)
        if e.errno in _NO_SPACE:
            raise no_space_error(final, e) from e
        raise
    except BaseException:
        _remove(temp)
        raise
    failpoint.reached("atomic:after-rename")
    fsync_dir(final.parent)


def _replace_dir(temp: Path, final: Path) -> None:
    """Put the directory temp in place of the existing directory final in one step (renameat2's
    RENAME_EXCHANGE, Linux 3.15+), then remove the old one, which temp now names; rename(2) cannot replace a
    non-empty directory. Where the filesystem cannot exchange, the old directory is moved aside first."""
    libc = ctypes.CDLL(None, use_errno=True)
    at_fdcwd, rename_exchange = -100, 2
    if libc.renameat2(at_fdcwd, os.fsencode(temp), at_fdcwd, os.fsencode(final), rename_exchange) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(err, os.strerror(err), str(final))
        aside = partial_path(final)
        os.rename(final, aside)
        os.rename(temp, final)
        temp = aside
    shutil.rmtree(temp, ignore_errors=True)


def write_bytes_atomic(final: Path, data: bytes) -> None:
    """Write a small file atomically."""
    with atomic_path(final) as temp:
        with open(temp, "wb") as f:
            f.write(data)


def remove_abandoned_partials(directory: Path) -> list[Path]:
    """Delete temporary files whose writer is gone (killed runs), so they never pile up."""
    removed: list[Path] = []
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return removed
    for name in names:
        match = _PARTIAL.match(name)
        if not match:
            continue
        path = directory / name
        if match["host"] == _HOST:
            abandoned = not is_alive(int(match["pid"]))
        else:
            try:
                abandoned = time.time() - path.stat().st_mtime > _FOREIGN_PARTIAL_AGE
            except FileNotFoundError:
                continue
        if abandoned:
            _remove(path)
            removed.append(path)
    if removed:
        log.info("removed %d temporary file(s) left by killed runs in %s", len(removed), directory)
    return removed


def _remove(path: Path) -> None:
    """Remove a temporary file or directory (an OCI layout being written), whichever it is."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def no_space_error(path: Path, error: OSError, needed: int | None = None) -> OutputError:
    """The error for a full filesystem: where, how much was needed (when known) and how much is free."""
    try:
        st = os.statvfs(path.parent)
        free = f"{st.f_bavail * st.f_frsize} bytes free"
    except OSError:
        free = "free space unknown"
    need = f"needs about {needed} bytes, " if needed is not None else ""
    return OutputError(f"{path}: no space left on device ({need}{free}); free space or choose another location")


def make_dirs(path: Path) -> None:
    """Create a directory and its parents, naming the path when that is impossible."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{path}: cannot create directory ({e.strerror}); choose a writable location") from e


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    # The rename is durable only once the directory entry itself reaches the disk.
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno != errno.EINVAL:  # some filesystems (tmpfs on old kernels) refuse fsync on directories
            raise
    finally:
        os.close(fd)

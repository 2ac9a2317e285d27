"""Atomic, durable file writes: a temporary sibling, flushed and fsync'd, then renamed over the target."""

import errno
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.errors import OutputError

# Temporary files carry this marker and the writer's pid, so a later run can tell abandoned ones from live ones.
PARTIAL_MARKER = ".partial-"


def partial_path(final: Path) -> Path:
    """A fresh temporary path in final's directory (same filesystem, so the rename is atomic)."""
    return final.with_name(f".{final.name}{PARTIAL_MARKER}{os.getpid()}-{secrets.token_hex(4)}")


@contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it becomes final durably, on any error it is removed."""
    make_dirs(final.parent)
    temp = partial_path(final)
    try:
        yield temp
        fsync_file(temp)
        os.replace(temp, final)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_dir(final.parent)


def write_bytes_atomic(final: Path, data: bytes) -> None:
    """Write a small file atomically."""
    with atomic_path(final) as temp:
        with open(temp, "wb") as f:
            f.write(data)


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

"""Rebuilds a layer's original tar, byte for byte, from the tar-split records its engine kept and its layer_dir.

Format: https://github.com/vbatts/tar-split — tar/storage/entry.go (one JSON entry per line, gzip'd),
tar/asm/assemble.go (how entries are joined) and tar/storage/getter.go (CRC-64 with Go's crc64.ISO table). Kept by
containers-storage as overlay-layers/<id>.tar-split.gz (https://github.com/containers/storage, layers.go) and by
docker as image/overlay2/layerdb/sha256/<chain-id>/tar-split.json.gz.
"""

import binascii
import errno
import gzip
import json
import os
import stat
import zlib
from collections.abc import Generator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from fastcrc import crc64

from pipeline.errors import LayerError
from pipeline.layer.walk import MAX_DIR_FDS
from pipeline.layer.writer import HashingSink, LayerRecord

# entry.go: a File entry's content is read from layer_dir; a Segment carries raw tar bytes (headers, padding, end).
_FILE = 1
_SEGMENT = 2
_CHUNK = 1 << 20
# disassemble.go stores trailing padding in 1 MiB segments and a header's raw bytes are far smaller (xattr values
# stop at 64 KiB), so a longer line is damage; the cap keeps a damaged file from filling memory.
_MAX_LINE = 16 << 20
_CRC_SIZE = 8  # Go's hash.Hash64 Sum: the CRC-64 as 8 big-endian bytes
_O_NOATIME = getattr(os, "O_NOATIME", 0)


class TarSplitMismatch(LayerError):
    """Tar-split records are missing, damaged or disagree with the layer_dir, so the original tar cannot be rebuilt."""


@dataclass(frozen=True)
class _Entry:
    kind: int
    name: bytes  # File entries only: the tar member's name, relative to layer_dir
    size: int
    payload: bytes  # Segment: raw tar bytes; File: its content's CRC-64


class _Refused(Exception):
    """One entry cannot be used; the caller adds which layer, record and name."""


def write_layer_from_tarsplit(layer_dir: Path, tar_split: Path, out: BinaryIO) -> LayerRecord:
    """Write the original layer tar described by tar_split, with file contents from layer_dir, to out.

    Each file's size and CRC-64 are checked against its record while it is copied; the first difference, a missing
    file, a path leaving layer_dir or a damaged record raises TarSplitMismatch, and out then holds a partial tar to
    discard. Records cannot reveal files added to layer_dir: compare the diff_id with the engine's recorded digest.
    """
    buf = memoryview(bytearray(_CHUNK))
    sink = HashingSink(out)
    with _LayerFiles(layer_dir) as files, closing(_read_lines(layer_dir, tar_split)) as lines:
        for number, line in lines:
            entry: _Entry | None = None
            try:
                entry = _parse_entry(line)
                if entry.kind == _SEGMENT:
                    sink.write(entry.payload)
                # Size 0 covers directories, links, devices and whiteouts: assemble.go reads nothing for them, which
                # is why overlay's on-disk form of a whiteout (a 0/0 char device) never matters here.
                elif entry.size > 0:
                    _copy_file(sink, files, entry, buf)
            except _Refused as e:
                where = f"record {number} of {tar_split}"
                if entry is not None and entry.kind == _FILE:
                    where = f"{os.fsdecode(entry.name)!r} ({where})"
                raise TarSplitMismatch(f"{layer_dir}: {where} {e}; pack the directory instead") from e
    if sink.size == 0:
        raise TarSplitMismatch(f"{layer_dir}: {tar_split} holds no records; pack the directory instead")
    return sink.record()


def _read_lines(layer_dir: Path, tar_split: Path) -> Generator[tuple[int, bytes], None, None]:
    """(1-based number, line) of each record; only reading tar_split itself is guarded here, not the caller's work."""

    def damaged(reason: str) -> TarSplitMismatch:
        return TarSplitMismatch(f"{layer_dir}: tar-split {tar_split} {reason}; pack the directory instead")

    try:
        records = gzip.open(tar_split, "rb")
    except FileNotFoundError:
        raise damaged("is missing") from None
    except OSError as e:
        raise damaged(f"cannot be opened ({e.strerror})") from e
    with records:
        number = 0
        while True:
            try:
                line = records.readline(_MAX_LINE + 1)
            except (OSError, EOFError, zlib.error) as e:
                raise damaged(f"is damaged after record {number} ({e})") from e
            if not line:
                return
            number += 1
            if len(line) > _MAX_LINE:
                raise damaged(f"record {number} is longer than {_MAX_LINE} bytes")
            yield number, line


def _parse_entry(line: bytes) -> _Entry:
    try:
        doc = json.loads(line)
    except (ValueError, RecursionError):  # RecursionError: arrays nested deeper than the parser's stack
        raise _Refused("is not JSON") from None
    if not isinstance(doc, dict):
        raise _Refused("is not a JSON object")
    kind = doc.get("type")
    # type() rather than isinstance: JSON true would pass as the int 1.
    if type(kind) is not int or kind not in (_FILE, _SEGMENT):
        raise _Refused(f"has unknown type {kind!r}")
    payload = _decode_bytes(doc.get("payload"), "payload")
    if kind == _SEGMENT:
        return _Entry(kind, b"", 0, payload)
    size = doc.get("size", 0)
    if type(size) is not int or size < 0:
        raise _Refused(f"has invalid size {size!r}")
    # entry.go: names that are not valid UTF-8 go base64-encoded in name_raw, which then wins over name.
    name = _decode_bytes(doc.get("name_raw"), "name_raw")
    if not name:
        text = doc.get("name", "")
        if not isinstance(text, str):
            raise _Refused("has a name that is not a string")
        try:
            name = text.encode()
        except UnicodeEncodeError:
            raise _Refused("has a name that is not valid UTF-8") from None
    if size > 0 and len(payload) != _CRC_SIZE:
        raise _Refused(f"has a {len(payload)}-byte checksum, not a CRC-64")
    return _Entry(kind, name, size, payload)


def _decode_bytes(value: object, field: str) -> bytes:
    """A Go []byte field: base64 text, or null for none."""
    if value is None:
        return b""
    if not isinstance(value, str):
        raise _Refused(f"has a {field} that is not base64 text")
    try:
        return binascii.a2b_base64(value.encode("ascii"), strict_mode=True)
    except (binascii.Error, UnicodeEncodeError):
        raise _Refused(f"has a {field} that is not valid base64") from None


def _copy_file(sink: HashingSink, files: "_LayerFiles", entry: _Entry, buf: memoryview) -> None:
    fd = files.open_regular(entry.name)
    try:
        on_disk = os.fstat(fd).st_size
        if on_disk != entry.size:
            raise _Refused(f"is {on_disk} bytes on disk, the record says {entry.size}")
        crc = 0  # the CRC-64 of no bytes, from which go_iso continues
        remaining = entry.size
        while remaining:
            try:
                n = os.readv(fd, [buf[: min(remaining, len(buf))]])
            except OSError as e:
                raise _Refused(f"cannot be read ({e.strerror})") from e
            if not n:
                raise _Refused("shrank while it was read")
            crc = crc64.go_iso(buf[:n], initial=crc)
            sink.write(buf[:n])
            remaining -= n
        if os.read(fd, 1):
            raise _Refused("grew while it was read")
    finally:
        os.close(fd)
    if crc.to_bytes(_CRC_SIZE, "big") != entry.payload:
        raise _Refused("differs from the content recorded (CRC-64 mismatch)")


class _LayerFiles:
    """Opens regular files below layer_dir by relative tar name, never following a symlink or leaving layer_dir.

    Each path is walked one component at a time with O_NOFOLLOW from directory fds, as openat2's RESOLVE_BENEATH
    would; the fds of the last file's parent directories are kept because tar members come grouped by directory,
    but only the deepest MAX_DIR_FDS of them: a path however deep needs no more fds, and one that goes on from a
    closed ancestor is walked again from the root, as the first time (at most one open per component of its name).
    """

    def __init__(self, layer_dir: Path) -> None:
        try:
            self._root = os.open(layer_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as e:
            raise LayerError(f"{layer_dir}: cannot open layer directory ({e.strerror})") from e
        # The last file's parent directories, root first; only the deepest MAX_DIR_FDS hold an fd (None: closed).
        self._open_dirs: list[tuple[bytes, int | None]] = []

    def __enter__(self) -> "_LayerFiles":
        return self

    def __exit__(self, *exc: object) -> None:
        self._close_dirs(0)
        os.close(self._root)

    def open_regular(self, name: bytes) -> int:
        parts = _split_name(name)
        self._enter_dirs(parts[:-1])
        parent = self._parent()
        try:
            st = os.stat(parts[-1], dir_fd=parent, follow_symlinks=False)
        except OSError as e:
            raise _refusal(e) from e
        # Checked before opening: opening a device or FIFO can block or act on hardware.
        if not stat.S_ISREG(st.st_mode):
            raise _Refused("is a symlink on disk" if stat.S_ISLNK(st.st_mode) else "is not a regular file on disk")
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            try:
                fd = os.open(parts[-1], flags | _O_NOATIME, dir_fd=parent)
            except PermissionError:  # O_NOATIME is for the file's owner or root only
                fd = os.open(parts[-1], flags, dir_fd=parent)
        except OSError as e:
            raise _refusal(e) from e
        opened = os.fstat(fd)
        if (opened.st_dev, opened.st_ino) != (st.st_dev, st.st_ino):
            os.close(fd)
            raise _Refused("was replaced while it was opened")
        return fd

    def _enter_dirs(self, dirs: list[bytes]) -> None:
        keep = 0
        while keep < min(len(dirs), len(self._open_dirs)) and self._open_dirs[keep][0] == dirs[keep]:
            keep += 1
        self._close_dirs(keep)
        if self._open_dirs and self._open_dirs[-1][1] is None:  # closed to bound the fds: walk from the root again
            self._close_dirs(0)
            keep = 0
        for part in dirs[keep:]:
            parent = self._parent()
            try:
                fd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
            except OSError as e:
                # O_DIRECTORY | O_NOFOLLOW fails on a symlink with ENOTDIR as on a file: lstat tells them apart.
                if e.errno in (errno.ENOTDIR, errno.ELOOP) and _is_symlink(part, parent):
                    raise _Refused("has a symlink in its path") from e
                raise _refusal(e) from e
            self._open_dirs.append((part, fd))
            if len(self._open_dirs) > MAX_DIR_FDS:  # the open ones are the deepest: close the shallowest of them
                name, shallowest = self._open_dirs[-MAX_DIR_FDS - 1]
                if shallowest is not None:
                    os.close(shallowest)
                    self._open_dirs[-MAX_DIR_FDS - 1] = (name, None)

    def _parent(self) -> int:
        """The fd of the deepest directory entered (the root's when none)."""
        fd = self._open_dirs[-1][1] if self._open_dirs else self._root
        assert fd is not None
        return fd

    def _close_dirs(self, keep: int) -> None:
        for _, fd in self._open_dirs[keep:]:
            if fd is not None:
                os.close(fd)
        del self._open_dirs[keep:]


def _split_name(name: bytes) -> list[bytes]:
    """A tar name's path components below layer_dir; "./" and repeated slashes are dropped as filepath.Join would."""
    if name.startswith(b"/"):
        raise _Refused("is an absolute path")
    if b"\0" in name:
        raise _Refused("has a NUL byte in its name")
    parts = [part for part in name.split(b"/") if part not in (b"", b".")]
    if b".." in parts:
        raise _Refused("leaves the layer directory (..)")
    if not parts:
        raise _Refused("names the layer directory itself")
    return parts


def _is_symlink(name: bytes, dir_fd: int) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _refusal(e: OSError) -> _Refused:
    if e.errno == errno.ENOENT:
        return _Refused("is missing from the layer directory")
    if e.errno == errno.ELOOP:
        return _Refused("has a symlink in its path")
    if e.errno == errno.ENOTDIR:
        return _Refused("has a non-directory in its path")
    return _Refused(f"cannot be opened ({e.strerror})")

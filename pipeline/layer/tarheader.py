"""POSIX pax tar headers, built directly so every field is deterministic and cheap to produce.

Spec: https://pubs.opengroup.org/onlinepubs/9699919799/utilities/pax.html (ustar header and pax extended
headers); Go's archive/tar and GNU tar read these as written.
"""

from dataclasses import dataclass, field

BLOCK_SIZE = 512
# Where a member's data may start so that a filesystem can share its extents with another file's: the 4 KiB of
# a page and of XFS's and btrfs's default block (FICLONERANGE needs block-aligned offsets on both sides).
ALIGNMENT = 4096
# Regular files of at least this many bytes have their data start on an ALIGNMENT boundary, in layer tars and in
# image archives alike (a rule of the format, the same on every filesystem). Padding costs 0-3.5 KiB per such file
# (measured: see README "Zero-copy"); below this size a clone would save less than the padding costs.
ALIGN_DATA_FROM = 1 << 20
END_OF_ARCHIVE = bytes(2 * BLOCK_SIZE)

REGULAR = b"0"
HARDLINK = b"1"
SYMLINK = b"2"
CHAR_DEVICE = b"3"
BLOCK_DEVICE = b"4"
DIRECTORY = b"5"
FIFO = b"6"
_PAX = b"x"

# ustar numeric fields hold octal digits plus a terminator: widths 8 (7 digits) and 12 (11 digits).
_MAX_ID = 8**7 - 1  # 2097151
_MAX_SIZE = 8**11 - 1  # 8 GiB - 1
_PAX_NAME = b"././@PaxHeader"


@dataclass(frozen=True)
class Header:
    """One tar entry's metadata; name is relative with a trailing "/" for directories."""

    name: bytes
    typeflag: bytes
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    size: int = 0
    mtime: int = 0
    linkname: bytes = b""
    devmajor: int = 0
    devminor: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)


def padding(size: int) -> bytes:
    """The zero bytes that round a member's data up to a whole block."""
    return bytes(-size % BLOCK_SIZE)


def build_header(h: Header, *, align_at: int | None = None) -> bytes:
    """The header block(s) for one entry, with a pax extended header first when ustar cannot hold a field.

    align_at: the offset in the tar where the header goes; the header is then padded (a pax "comment" record, or
    an empty pax header, which every reader skips) so that the entry's data starts on an ALIGNMENT boundary,
    where a filesystem can share its extents with another file's (reflink). The padding depends only on the
    offset and the header, so a tar is byte-identical on every filesystem.
    """
    plain = _build_header(h, b"")
    if align_at is None:
        return plain
    need = -(align_at + len(plain)) % ALIGNMENT  # a multiple of BLOCK_SIZE: offsets and headers are whole blocks
    if not need:
        return plain
    base = _pax_data(h)
    if base:
        # Grow the pax header's data by need bytes: a comment record filling the blocks added.
        target = len(base) + len(padding(len(base))) + need
        return _build_header(h, _pax_record_of_length(b"comment", target - len(base)))
    # No pax header yet: one of need bytes (its header block and need - 512 bytes of data).
    data = _pax_record_of_length(b"comment", need - BLOCK_SIZE) if need > BLOCK_SIZE else b""
    return _ustar(_PAX_NAME, _PAX, 0o644, 0, 0, len(data), 0, b"", 0, 0) + data + padding(len(data)) + plain


def _build_header(h: Header, extra: bytes) -> bytes:
    data = _pax_data(h) + extra
    out = b""
    if data:
        out = _ustar(_PAX_NAME, _PAX, 0o644, 0, 0, len(data), 0, b"", 0, 0) + data + padding(len(data))
    return out + _ustar(
        h.name[:100],
        h.typeflag,
        h.mode,
        min(h.uid, _MAX_ID),
        min(h.gid, _MAX_ID),
        h.size if h.size <= _MAX_SIZE else 0,
        min(max(h.mtime, 0), _MAX_SIZE),
        h.linkname[:100],
        h.devmajor,
        h.devminor,
    )


def _pax_data(h: Header) -> bytes:
    """The pax extended header's records for what ustar cannot hold (b"" when it can hold everything)."""
    records: list[tuple[bytes, bytes]] = []
    if len(h.name) > 100 or not h.name.isascii():
        records.append((b"path", h.name))
    if len(h.linkname) > 100 or not h.linkname.isascii():
        records.append((b"linkpath", h.linkname))
    for key, value, limit in ((b"uid", h.uid, _MAX_ID), (b"gid", h.gid, _MAX_ID), (b"size", h.size, _MAX_SIZE)):
        if value > limit:
            records.append((key, str(value).encode()))
    if not 0 <= h.mtime <= _MAX_SIZE:
        records.append((b"mtime", str(h.mtime).encode()))
    for name in sorted(h.xattrs):
        records.append((b"SCHILY.xattr." + name.encode(), h.xattrs[name]))
    if not records:
        return b""
    if not all(_is_utf8(v) for k, v in records if k in (b"path", b"linkpath")):
        # POSIX: path values that are not UTF-8 are legal only after hdrcharset=BINARY.
        records.insert(0, (b"hdrcharset", b"BINARY"))
    return b"".join(_pax_record(k, v) for k, v in records)


def _is_utf8(value: bytes) -> bool:
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _pax_record(key: bytes, value: bytes) -> bytes:
    # "<len> <key>=<value>\n" where len counts its own digits too.
    body = b" " + key + b"=" + value + b"\n"
    length = len(body) + 1
    while len(str(length)) + len(body) != length:
        length = len(str(length)) + len(body)
    return str(length).encode() + body


def _pax_record_of_length(key: bytes, length: int) -> bytes:
    """A pax record of exactly length bytes (at least BLOCK_SIZE here): key = that many "x" as its value."""
    digits = len(str(length))
    record = b"%d %s=%s\n" % (length, key, b"x" * (length - digits - len(key) - 3))
    assert len(record) == length
    return record


def _octal(value: int, width: int) -> bytes:
    return b"%0*o\0" % (width - 1, value)


def _ustar(
    name: bytes,
    typeflag: bytes,
    mode: int,
    uid: int,
    gid: int,
    size: int,
    mtime: int,
    linkname: bytes,
    devmajor: int,
    devminor: int,
) -> bytes:
    block = bytearray(BLOCK_SIZE)
    block[0:100] = name.ljust(100, b"\0")
    block[100:108] = _octal(mode & 0o7777, 8)
    block[108:116] = _octal(uid, 8)
    block[116:124] = _octal(gid, 8)
    block[124:136] = _octal(size, 12)
    block[136:148] = _octal(mtime, 12)
    block[148:156] = b" " * 8
    block[156:157] = typeflag
    block[157:257] = linkname.ljust(100, b"\0")
    block[257:265] = b"ustar\x0000"
    if typeflag in (CHAR_DEVICE, BLOCK_DEVICE):
        block[329:337] = _octal(devmajor, 8)
        block[337:345] = _octal(devminor, 8)
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)

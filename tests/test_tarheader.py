import io
import tarfile

from pipeline.layer import tarheader
from pipeline.layer.tarheader import Header


def _read(*headers: Header, data: bytes = b"") -> list[tarfile.TarInfo]:
    raw = b"".join(tarheader.build_header(h) for h in headers) + data + tarheader.END_OF_ARCHIVE
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        return tar.getmembers()


def test_short_ascii_entry_needs_no_pax_header() -> None:
    raw = tarheader.build_header(Header(b"etc/passwd", tarheader.REGULAR, 0o644, uid=1, gid=2, mtime=5))
    assert len(raw) == tarheader.BLOCK_SIZE
    [info] = _read(Header(b"etc/passwd", tarheader.REGULAR, 0o644, uid=1, gid=2, mtime=5))
    assert (info.name, info.mode, info.uid, info.gid, info.mtime, info.uname) == ("etc/passwd", 0o644, 1, 2, 5, "")


def test_setuid_sticky_and_setgid_bits_survive() -> None:
    [info] = _read(Header(b"bin/su", tarheader.REGULAR, 0o104755 & 0o7777 | 0o2000))
    assert info.mode == 0o6755


def test_long_name_goes_into_pax_path() -> None:
    name = b"d/" + b"x" * 300
    [info] = _read(Header(name, tarheader.REGULAR))
    assert info.name == name.decode()
    assert info.pax_headers["path"] == name.decode()


def test_non_utf8_name_is_marked_binary_and_round_trips() -> None:
    name = b"bad-\xff-name"
    raw = tarheader.build_header(Header(name, tarheader.REGULAR))
    assert b"hdrcharset=BINARY" in raw
    [info] = _read(Header(name, tarheader.REGULAR))
    assert info.name.encode("utf-8", "surrogateescape") == name


def test_unicode_link_target_goes_into_pax_linkpath() -> None:
    [info] = _read(Header(b"l", tarheader.SYMLINK, 0o777, linkname="café/日本".encode()))
    assert info.issym() and info.linkname == "café/日本"


def test_ids_over_ustar_limit_use_pax() -> None:
    [info] = _read(Header(b"f", tarheader.REGULAR, uid=3_000_000, gid=2_097_152))
    assert (info.uid, info.gid) == (3_000_000, 2_097_152)


def test_size_over_8_gib_uses_pax_size() -> None:
    size = 9 * 1024**3
    raw = tarheader.build_header(Header(b"big", tarheader.REGULAR, size=size))
    assert f"size={size}".encode() in raw
    # The ustar size field must not claim a wrong size.
    assert raw[-512 + 124 : -512 + 136] == b"00000000000\0"


def test_binary_xattr_values_are_carried_as_schily_records() -> None:
    cap = bytes.fromhex("0100000200200000000000000000000000000000")
    [info] = _read(Header(b"ping", tarheader.REGULAR, xattrs={"security.capability": cap, "user.k": b"v"}))
    assert info.pax_headers["SCHILY.xattr.security.capability"].encode("utf-8", "surrogateescape") == cap
    assert info.pax_headers["SCHILY.xattr.user.k"] == "v"


def test_device_numbers_are_written() -> None:
    [info] = _read(Header(b"dev/null", tarheader.CHAR_DEVICE, 0o666, devmajor=1, devminor=3))
    assert info.ischr() and (info.devmajor, info.devminor) == (1, 3)


def test_pax_record_length_counts_its_own_digits() -> None:
    # 9-digit boundary: a record whose length crosses from 2 to 3 digits.
    for n in range(80, 110):
        record = tarheader._pax_record(b"path", b"a" * n)
        length, _, _ = record.partition(b" ")
        assert int(length) == len(record)

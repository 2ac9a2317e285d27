"""Layer tars written from real directories, read back with Python's tarfile."""

import hashlib
import io
import logging
import os
import socket
import stat
import tarfile
from pathlib import Path

import pytest

from pipeline.errors import LayerError
from pipeline.layer.writer import write_layer


def _pack(layer_dir: Path, **kwargs: int) -> tuple[bytes, list[tarfile.TarInfo], str]:
    out = io.BytesIO()
    record = write_layer(layer_dir, out, **kwargs)
    data = out.getvalue()
    assert record.diff_id == "sha256:" + hashlib.sha256(data).hexdigest()
    assert record.size == len(data)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return data, tar.getmembers(), record.diff_id


def _names(members: list[tarfile.TarInfo]) -> list[bytes]:
    # tarfile strips the trailing "/" the writer gives directories; put it back to see the written names.
    return [(m.name + ("/" if m.isdir() else "")).encode("utf-8", "surrogateescape") for m in members]


def test_entries_are_sorted_by_tar_path_bytes(tmp_path: Path) -> None:
    for rel in ("a/b", "a.b", "a-c/x", "B", "z/y/x"):
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(rel)
    _, members, _ = _pack(tmp_path)
    names = _names(members)
    assert names == sorted(names)
    assert names == [b"B", b"a-c/", b"a-c/x", b"a.b", b"a/", b"a/b", b"z/", b"z/y/", b"z/y/x"]


def test_file_content_mode_and_mtime_are_kept(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"payload" * 1000)
    f.chmod(0o4751)
    os.utime(f, (1, 1_600_000_000))
    data, [member], _ = _pack(tmp_path)
    assert member.mode == 0o4751 and member.mtime == 1_600_000_000 and member.size == 7000
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        assert tar.extractfile(member).read() == b"payload" * 1000  # type: ignore[union-attr]


def test_mtime_is_clamped_to_source_date_epoch(tmp_path: Path) -> None:
    (tmp_path / "new").write_text("x")
    os.utime(tmp_path / "new", (2_000_000_000, 2_000_000_000))
    (tmp_path / "old").write_text("x")
    os.utime(tmp_path / "old", (5, 5))
    _, members, _ = _pack(tmp_path, clamp_mtime=1000)
    assert {m.name: m.mtime for m in members} == {"new": 1000, "old": 5}


def test_same_tree_gives_same_diff_id(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_text("same")
    assert _pack(tmp_path)[2] == _pack(tmp_path)[2]


def test_hardlinks_become_link_entries_to_the_first_path(tmp_path: Path) -> None:
    (tmp_path / "a").write_text("shared")
    os.link(tmp_path / "a", tmp_path / "b")
    os.link(tmp_path / "a", tmp_path / "c")
    _, members, _ = _pack(tmp_path)
    by_name = {m.name: m for m in members}
    assert by_name["a"].isreg() and by_name["a"].size == 6
    assert by_name["b"].islnk() and by_name["b"].linkname == "a"
    assert by_name["c"].islnk() and by_name["c"].linkname == "a"


def test_symlinks_fifos_and_empty_dirs_are_kept(tmp_path: Path) -> None:
    os.symlink("../etc/passwd", tmp_path / "rel")
    os.symlink("/nowhere/at/all", tmp_path / "dangling")
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "empty").mkdir()
    _, members, _ = _pack(tmp_path)
    by_name = {m.name: m for m in members}
    assert by_name["rel"].issym() and by_name["rel"].linkname == "../etc/passwd"
    assert by_name["dangling"].linkname == "/nowhere/at/all"
    assert by_name["pipe"].isfifo()
    assert by_name["empty"].isdir()


def test_long_unicode_and_non_utf8_names_round_trip(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 120) / ("e" * 120)
    deep.mkdir(parents=True)
    (deep / ("f" * 100)).write_text("long")
    (tmp_path / "café").mkdir()
    (tmp_path / "café" / "日本.txt").write_text("uni")
    with open(os.fsencode(tmp_path) + b"/bad-\xff-name", "w") as f:
        f.write("bin")
    _, members, _ = _pack(tmp_path)
    names = _names(members)
    assert ("d" * 120 + "/" + "e" * 120 + "/" + "f" * 100).encode() in names
    assert "café/日本.txt".encode() in names
    assert b"bad-\xff-name" in names


def test_sparse_file_is_packed_with_its_holes_as_zeros(tmp_path: Path) -> None:
    path = tmp_path / "sparse"
    with open(path, "wb") as f:
        f.truncate(8 << 20)
        f.seek(3 << 20)
        f.write(b"middle")
        f.seek((8 << 20) - 3)
        f.write(b"end")
    data, [member], _ = _pack(tmp_path)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        content = tar.extractfile(member).read()  # type: ignore[union-attr]
    assert content == path.read_bytes()


def test_user_xattrs_are_carried(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    try:
        os.setxattr(tmp_path / "f", "user.origin", b"test")
    except OSError as e:
        pytest.skip(f"this filesystem refuses user xattrs: {e}")
    _, [member], _ = _pack(tmp_path)
    assert member.pax_headers["SCHILY.xattr.user.origin"] == "test"


def test_socket_is_skipped_with_a_warning_naming_it(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "keep").write_text("x")
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(tmp_path / "app.sock"))
        with caplog.at_level(logging.WARNING, logger="pipeline.layer.writer"):
            _, members, _ = _pack(tmp_path)
    finally:
        sock.close()
    assert [m.name for m in members] == ["keep"]
    assert "app.sock" in caplog.text


def test_real_file_named_like_a_whiteout_is_refused(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / ".wh.passwd").write_text("x")
    with pytest.raises(LayerError, match=r"etc/\.wh\.passwd"):
        _pack(tmp_path)


def test_layer_dir_that_is_a_symlink_is_refused(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "link")
    with pytest.raises(LayerError, match="link"):
        _pack(tmp_path / "link")


@pytest.mark.root
def test_char_device_0_0_becomes_a_whiteout_file(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    os.mknod(tmp_path / "etc" / "gone", stat.S_IFCHR, os.makedev(0, 0))
    _, members, _ = _pack(tmp_path)
    by_name = {m.name: m for m in members}
    assert "etc/gone" not in by_name
    marker = by_name["etc/.wh.gone"]
    assert marker.isreg() and marker.size == 0


@pytest.mark.root
def test_opaque_directory_is_followed_by_its_marker(tmp_path: Path) -> None:
    (tmp_path / "var").mkdir()
    (tmp_path / "var" / "!first").write_text("sorts before the marker")
    os.setxattr(tmp_path / "var", "trusted.overlay.opaque", b"y")
    _, members, _ = _pack(tmp_path)
    names = [m.name for m in members]
    assert names == ["var", "var/.wh..wh..opq", "var/!first"]
    assert not any("trusted.overlay" in k for m in members for k in m.pax_headers)


@pytest.mark.root
def test_redirected_directory_is_refused_naming_it(tmp_path: Path) -> None:
    (tmp_path / "moved").mkdir()
    os.setxattr(tmp_path / "moved", "trusted.overlay.redirect", b"/orig")
    with pytest.raises(LayerError, match="moved.*redirect"):
        _pack(tmp_path)


@pytest.mark.root
def test_devices_keep_numbers_and_high_ids_survive(tmp_path: Path) -> None:
    os.mknod(tmp_path / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(tmp_path / "disk", stat.S_IFBLK | 0o660, os.makedev(8, 1))
    os.chmod(tmp_path / "disk", 0o660)
    (tmp_path / "owned").write_text("x")
    os.chown(tmp_path / "owned", 3_000_000, 2_500_000)
    _, members, _ = _pack(tmp_path)
    by_name = {m.name: m for m in members}
    assert by_name["null"].ischr() and (by_name["null"].devmajor, by_name["null"].devminor) == (1, 3)
    assert by_name["disk"].isblk() and by_name["disk"].mode == 0o660
    assert (by_name["owned"].uid, by_name["owned"].gid) == (3_000_000, 2_500_000)


@pytest.mark.root
def test_security_capability_is_carried(tmp_path: Path) -> None:
    cap = bytes.fromhex("0100000200200000000000000000000000000000")
    (tmp_path / "ping").write_text("x")
    os.setxattr(tmp_path / "ping", "security.capability", cap)
    _, [member], _ = _pack(tmp_path)
    assert member.pax_headers["SCHILY.xattr.security.capability"].encode("utf-8", "surrogateescape") == cap


# --- overlay markers are read from the layer's own namespace only (issue 11) ---------------------------------------


def _pack_with_markers(layer_dir: Path, overlay_xattrs: str | None) -> dict[str, tarfile.TarInfo]:
    out = io.BytesIO()
    write_layer(layer_dir, out, overlay_xattrs=overlay_xattrs)
    with tarfile.open(fileobj=io.BytesIO(out.getvalue())) as tar:
        return {m.name: m for m in tar.getmembers()}


def _set_user_xattrs(path: Path, xattrs: dict[str, bytes]) -> None:
    for name, value in xattrs.items():
        try:
            os.setxattr(path, name, value)
        except OSError as e:
            pytest.skip(f"this filesystem refuses user xattrs: {e}")


def _forged_layer(layer_dir: Path, *, redirect: bool = True) -> None:
    """What a process in a container can do through the merged view of a mount with trusted.overlay.* markers."""
    (layer_dir / "etc").mkdir()
    (layer_dir / "etc" / "app.conf").write_text("setting=1\n")
    _set_user_xattrs(layer_dir / "etc", {"user.overlay.opaque": b"y"})
    (layer_dir / "keep.txt").write_text("")
    _set_user_xattrs(layer_dir / "keep.txt", {"user.overlay.whiteout": b""})
    (layer_dir / "moved").write_text("x")
    if redirect:
        _set_user_xattrs(layer_dir / "moved", {"user.overlay.redirect": b"/elsewhere", "user.overlay.metacopy": b""})


def test_forged_user_overlay_opaque_and_whiteout_are_not_markers_in_a_trusted_layer(tmp_path: Path) -> None:
    _forged_layer(tmp_path, redirect=False)
    by_name = _pack_with_markers(tmp_path, "trusted")
    assert sorted(by_name) == ["etc", "etc/app.conf", "keep.txt", "moved"]
    assert by_name["keep.txt"].isreg()
    # Not carried either: a rootless engine unpacking the image would make them markers (whiteout.kept_xattrs).
    assert not any("overlay" in key for m in by_name.values() for key in m.pax_headers)


def test_forged_user_overlay_redirect_does_not_refuse_a_trusted_layer(tmp_path: Path) -> None:
    _forged_layer(tmp_path)
    by_name = _pack_with_markers(tmp_path, "trusted")
    assert by_name["moved"].isreg() and by_name["moved"].size == 1
    assert not any("overlay" in key for m in by_name.values() for key in m.pax_headers)


def test_user_overlay_markers_are_honoured_in_a_userxattr_layer(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "app.conf").write_text("setting=1\n")
    _set_user_xattrs(tmp_path / "etc", {"user.overlay.opaque": b"y"})
    (tmp_path / "gone").write_text("")
    _set_user_xattrs(tmp_path / "gone", {"user.overlay.whiteout": b""})
    by_name = _pack_with_markers(tmp_path, "user")
    assert sorted(by_name) == [".wh.gone", "etc", "etc/.wh..wh..opq", "etc/app.conf"]
    assert not any("overlay" in key for m in by_name.values() for key in m.pax_headers)


def test_user_overlay_redirect_is_refused_in_a_userxattr_layer(tmp_path: Path) -> None:
    (tmp_path / "moved").mkdir()
    _set_user_xattrs(tmp_path / "moved", {"user.overlay.redirect": b"/orig"})
    with pytest.raises(LayerError, match=r"moved.*user\.overlay\.redirect"):
        _pack_with_markers(tmp_path, "user")


def test_a_merged_view_is_packed_without_reading_markers(tmp_path: Path) -> None:
    _forged_layer(tmp_path)
    by_name = _pack_with_markers(tmp_path, None)
    assert sorted(by_name) == ["etc", "etc/app.conf", "keep.txt", "moved"]


@pytest.mark.root
def test_trusted_overlay_markers_are_not_markers_in_a_userxattr_layer(tmp_path: Path) -> None:
    # A mount with "userxattr" ignores trusted.overlay.*: it is no marker there, and never carried.
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "app.conf").write_text("setting=1\n")
    os.setxattr(tmp_path / "etc", "trusted.overlay.opaque", b"y")
    (tmp_path / "keep.txt").write_text("")
    os.setxattr(tmp_path / "keep.txt", "trusted.overlay.whiteout", b"")
    os.setxattr(tmp_path / "keep.txt", "trusted.overlay.redirect", b"/x")
    by_name = _pack_with_markers(tmp_path, "user")
    assert sorted(by_name) == ["etc", "etc/app.conf", "keep.txt"]
    assert not any("overlay" in key for m in by_name.values() for key in m.pax_headers)

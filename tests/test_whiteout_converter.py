"""whiteout.convert, the one place an entry's overlay markers are read: pure, so no root and no overlay mount."""

import os
import re
import stat

import pytest

from pipeline.errors import LayerError
from pipeline.layer import whiteout
from pipeline.layer.whiteout import OpaqueDirectory, Plain, Whiteout

NAMESPACES = ("trusted", "user")
OTHER = {"trusted": "user", "user": "trusted"}
CAP = bytes.fromhex("0100000200200000000000000000000000000000")


def _st(mode: int, rdev: int = 0, size: int = 0) -> os.stat_result:
    return os.stat_result((mode, 1, 1, 1, 0, 0, size, 0, 0, 0), {"st_rdev": rdev})


DIR = _st(stat.S_IFDIR | 0o755)
FILE = _st(stat.S_IFREG | 0o644, size=3)
EMPTY_FILE = _st(stat.S_IFREG | 0o644)
KERNEL_WHITEOUT = _st(stat.S_IFCHR, rdev=os.makedev(0, 0))


@pytest.mark.parametrize("namespace", [*NAMESPACES, None])
def test_char_device_0_0_becomes_whiteout_entry(namespace: str | None) -> None:
    assert whiteout.convert(b"/layer/etc/passwd", KERNEL_WHITEOUT, {}, namespace) == Whiteout(b".wh.passwd")


def test_whiteout_entry_keeps_a_name_that_is_not_utf8() -> None:
    assert whiteout.convert(b"/layer/caf\xe9", KERNEL_WHITEOUT, {}, "trusted") == Whiteout(b".wh.caf\xe9")


def test_other_char_device_stays_plain_entry() -> None:
    null = _st(stat.S_IFCHR | 0o666, rdev=os.makedev(1, 3))
    assert whiteout.convert(b"/layer/dev/null", null, {}, "trusted") == Plain(b"null", {})


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_empty_file_with_whiteout_xattr_becomes_whiteout_entry(namespace: str) -> None:
    xattrs = {f"{namespace}.overlay.whiteout": b""}
    assert whiteout.convert(b"/layer/gone", EMPTY_FILE, xattrs, namespace) == Whiteout(b".wh.gone")


def test_whiteout_entry_carries_no_xattrs() -> None:
    xattrs = {"trusted.overlay.whiteout": b"", "user.mime": b"text/plain", "security.capability": CAP}
    conversion = whiteout.convert(b"/layer/gone", EMPTY_FILE, xattrs, "trusted")
    assert conversion == Whiteout(b".wh.gone")
    assert not hasattr(conversion, "xattrs")


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_opaque_dir_gets_marker_entry(namespace: str) -> None:
    xattrs = {f"{namespace}.overlay.opaque": b"y"}
    assert whiteout.convert(b"/layer/var", DIR, xattrs, namespace) == OpaqueDirectory(b"var", {})


def test_opaque_dir_keeps_its_image_xattrs() -> None:
    xattrs = {"trusted.overlay.opaque": b"y", "user.mime": b"dir", "security.selinux": b"ctx"}
    assert whiteout.convert(b"/layer/var", DIR, xattrs, "trusted") == OpaqueDirectory(b"var", {"user.mime": b"dir"})


def test_opaque_x_dir_stays_plain_dir() -> None:
    # "x" (kernel 6.7+) only announces xattr whiteouts inside the directory; it hides nothing.
    assert whiteout.convert(b"/layer/var", DIR, {"trusted.overlay.opaque": b"x"}, "trusted") == Plain(b"var", {})


def test_opaque_xattr_on_a_file_is_no_marker() -> None:
    conversion = whiteout.convert(b"/layer/f", FILE, {"trusted.overlay.opaque": b"y"}, "trusted")
    assert conversion == Plain(b"f", {})


def test_file_with_whiteout_xattr_that_is_no_regular_file_stays_plain() -> None:
    xattrs = {"trusted.overlay.whiteout": b""}
    assert whiteout.convert(b"/layer/d", DIR, xattrs, "trusted") == Plain(b"d", {})


def test_plain_entry_keeps_only_capability_and_user_xattrs() -> None:
    xattrs = {
        "security.capability": CAP,
        "security.selinux": b"ctx",
        "user.mime": b"text/plain",
        "trusted.overlay.origin": b"o",
        "user.overlay.origin": b"o",
        "trusted.other": b"t",
    }
    conversion = whiteout.convert(b"/layer/bin/ping", FILE, xattrs, "trusted")
    assert conversion == Plain(b"ping", {"security.capability": CAP, "user.mime": b"text/plain"})


def test_user_namespace_markers_ignored_when_storage_is_rootful() -> None:
    # Any process owning a file can set user.overlay.* through a rootful mount's merged view; the kernel ignores them.
    opaque = {"user.overlay.opaque": b"y"}
    assert whiteout.convert(b"/layer/etc", DIR, opaque, "trusted") == Plain(b"etc", {})
    forged_whiteout = {"user.overlay.whiteout": b""}
    assert whiteout.convert(b"/layer/keep", EMPTY_FILE, forged_whiteout, "trusted") == Plain(b"keep", {})


def test_trusted_markers_ignored_when_storage_is_rootless() -> None:
    opaque = {"trusted.overlay.opaque": b"y"}
    assert whiteout.convert(b"/layer/etc", DIR, opaque, "user") == Plain(b"etc", {})
    stale_whiteout = {"trusted.overlay.whiteout": b""}
    assert whiteout.convert(b"/layer/keep", EMPTY_FILE, stale_whiteout, "user") == Plain(b"keep", {})


def test_merged_view_reads_no_xattr_markers() -> None:
    xattrs = {f"{ns}.overlay.{name}": b"y" for ns in NAMESPACES for name in ("opaque", "whiteout", "redirect")}
    assert whiteout.convert(b"/merged/etc", DIR, xattrs, None) == Plain(b"etc", {})
    assert whiteout.convert(b"/merged/keep", EMPTY_FILE, xattrs, None) == Plain(b"keep", {})


def test_escaped_markers_are_no_markers() -> None:
    # Kernel 6.7+ stores a marker set through the merged view escaped, as <namespace>.overlay.overlay.*.
    xattrs = {"trusted.overlay.overlay.opaque": b"y"}
    assert whiteout.convert(b"/layer/etc", DIR, xattrs, "trusted") == Plain(b"etc", {})


@pytest.mark.parametrize("name", [b".wh.passwd", b".wh..wh..opq"])
@pytest.mark.parametrize("namespace", [*NAMESPACES, None])
def test_container_made_file_named_like_a_marker_is_refused_naming_its_path(name: bytes, namespace: str | None) -> None:
    with pytest.raises(LayerError, match=r"/layer/etc/\.wh\..*rename or remove it in the container"):
        whiteout.convert(b"/layer/etc/" + name, FILE, {}, namespace)


def test_marker_name_is_reported_before_redirect() -> None:
    with pytest.raises(LayerError, match=r"would be read as a whiteout"):
        whiteout.convert(b"/layer/.wh.x", FILE, {"trusted.overlay.redirect": b"/o"}, "trusted")


@pytest.mark.parametrize("marker", ["redirect", "metacopy"])
@pytest.mark.parametrize("namespace", NAMESPACES)
def test_redirect_or_metacopy_is_refused_naming_path_and_xattr(marker: str, namespace: str) -> None:
    xattr = f"{namespace}.overlay.{marker}"
    with pytest.raises(LayerError, match=rf"/layer/moved: has {re.escape(xattr)}; .*redirect_dir"):
        whiteout.convert(b"/layer/moved", DIR, {xattr: b"/orig"}, namespace)


def test_redirect_on_a_whiteout_is_refused_too() -> None:
    with pytest.raises(LayerError, match=r"/layer/w: has trusted\.overlay\.redirect"):
        whiteout.convert(b"/layer/w", KERNEL_WHITEOUT, {"trusted.overlay.redirect": b"/o"}, "trusted")


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_redirect_and_metacopy_of_the_other_namespace_are_plain(namespace: str) -> None:
    xattrs = {f"{OTHER[namespace]}.overlay.redirect": b"/x", f"{OTHER[namespace]}.overlay.metacopy": b""}
    assert whiteout.convert(b"/layer/moved", DIR, xattrs, namespace) == Plain(b"moved", {})


def test_unknown_namespace_is_refused_rather_than_reading_no_markers() -> None:
    with pytest.raises(ValueError, match="trused"):
        whiteout.convert(b"/layer/etc", DIR, {"trusted.overlay.opaque": b"y"}, "trused")

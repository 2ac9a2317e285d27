import os
import stat
from pathlib import Path

import pytest

from pipeline.errors import LayerError
from pipeline.layer import whiteout

NAMESPACES = ("trusted", "user")
OTHER = {"trusted": "user", "user": "trusted"}


@pytest.mark.parametrize("namespace", [*NAMESPACES, None])
def test_char_device_0_0_is_a_whiteout(namespace: str | None) -> None:
    assert whiteout.is_whiteout(stat.S_IFCHR, 0, {}, namespace)


def test_other_char_devices_are_not_whiteouts() -> None:
    assert not whiteout.is_whiteout(stat.S_IFCHR, 0x103, {}, "trusted")


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_kernel_xattr_whiteout_file_is_a_whiteout(namespace: str) -> None:
    assert whiteout.is_whiteout(stat.S_IFREG, 0, {f"{namespace}.overlay.whiteout": b""}, namespace)


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_opaque_y_marks_an_opaque_directory(namespace: str) -> None:
    assert whiteout.is_opaque({f"{namespace}.overlay.opaque": b"y"}, namespace)


def test_opaque_x_only_announces_xattr_whiteouts() -> None:
    assert not whiteout.is_opaque({"trusted.overlay.opaque": b"x"}, "trusted")


@pytest.mark.parametrize("name", ["trusted.overlay.redirect", "trusted.overlay.metacopy"])
def test_redirect_and_metacopy_are_refused_naming_the_path(name: str) -> None:
    with pytest.raises(LayerError, match="layer/dir/file.*" + name.replace(".", r"\.")):
        whiteout.check_supported(b"layer/dir/file", {name: b"x"}, "trusted")


@pytest.mark.parametrize("name", ["user.overlay.redirect", "user.overlay.metacopy"])
def test_redirect_and_metacopy_of_a_userxattr_layer_are_refused(name: str) -> None:
    with pytest.raises(LayerError, match=name.replace(".", r"\.")):
        whiteout.check_supported(b"layer/dir/file", {name: b"x"}, "user")


# A mount reads markers from one namespace only; in the other, any process owning a file can set overlay-looking
# xattrs through the merged view (issue 11), and the kernel ignores them: so must the commit.


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_opaque_xattr_of_the_other_namespace_is_no_marker(namespace: str) -> None:
    assert not whiteout.is_opaque({f"{OTHER[namespace]}.overlay.opaque": b"y"}, namespace)


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_whiteout_xattr_of_the_other_namespace_is_no_marker(namespace: str) -> None:
    assert not whiteout.is_whiteout(stat.S_IFREG, 0, {f"{OTHER[namespace]}.overlay.whiteout": b""}, namespace)


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_redirect_and_metacopy_of_the_other_namespace_are_not_refused(namespace: str) -> None:
    xattrs = {f"{OTHER[namespace]}.overlay.redirect": b"/x", f"{OTHER[namespace]}.overlay.metacopy": b""}
    whiteout.check_supported(b"layer/dir/file", xattrs, namespace)


def test_a_merged_view_has_no_xattr_markers() -> None:
    # The kernel shows a nested overlay's escaped trusted.overlay.overlay.* as trusted.overlay.* in a merged view.
    xattrs = {f"{ns}.overlay.{name}": b"y" for ns in NAMESPACES for name in ("opaque", "whiteout", "redirect")}
    assert not whiteout.is_opaque(xattrs, None)
    assert not whiteout.is_whiteout(stat.S_IFREG, 0, xattrs, None)
    whiteout.check_supported(b"merged/file", xattrs, None)


def test_escaped_markers_are_no_markers() -> None:
    # Kernel 6.7+ stores a marker set through the merged view in its own namespace escaped, as X.overlay.overlay.*.
    assert not whiteout.is_opaque({"trusted.overlay.overlay.opaque": b"y"}, "trusted")
    assert not whiteout.is_opaque({"user.overlay.overlay.opaque": b"y"}, "user")


def test_an_unknown_namespace_is_refused_rather_than_reading_no_markers() -> None:
    with pytest.raises(ValueError, match="trused"):
        whiteout.is_opaque({"trusted.overlay.opaque": b"y"}, "trused")


def test_real_file_named_like_a_whiteout_is_refused() -> None:
    with pytest.raises(LayerError, match=r"diff/etc/\.wh\.passwd.*rename or remove"):
        whiteout.check_not_marker(b"diff/etc/.wh.passwd", b".wh.passwd")


def test_overlay_xattrs_never_reach_the_image() -> None:
    kept = whiteout.kept_xattrs(
        {
            "trusted.overlay.opaque": b"y",
            "user.overlay.origin": b"o",
            # Not a marker in a layer with trusted.overlay.* markers, yet a rootless engine unpacking the image would
            # make it one: left out as containers/storage's own tar writer does.
            "user.overlay.opaque": b"y",
            "security.capability": b"cap",
            "user.mime": b"text/plain",
            "security.selinux": b"ctx",
        }
    )
    assert kept == {"security.capability": b"cap", "user.mime": b"text/plain"}


def test_without_cap_sys_admin_only_trusted_markers_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(whiteout, "_has_capability", lambda bit: False)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    whiteout.check_markers_visible(tmp_path, "user")  # user.overlay.* is visible to everyone
    whiteout.check_markers_visible(tmp_path, None)  # a merged view has no markers
    with pytest.raises(LayerError, match="lacks CAP_SYS_ADMIN"):
        whiteout.check_markers_visible(tmp_path, "trusted")

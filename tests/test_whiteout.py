import stat

import pytest

from pipeline import whiteout
from pipeline.errors import LayerError


def test_char_device_0_0_is_a_whiteout() -> None:
    assert whiteout.is_whiteout(stat.S_IFCHR, 0, {})


def test_other_char_devices_are_not_whiteouts() -> None:
    assert not whiteout.is_whiteout(stat.S_IFCHR, 0x103, {})


def test_kernel_xattr_whiteout_file_is_a_whiteout() -> None:
    assert whiteout.is_whiteout(stat.S_IFREG, 0, {"trusted.overlay.whiteout": b""})
    assert whiteout.is_whiteout(stat.S_IFREG, 0, {"user.overlay.whiteout": b""})


@pytest.mark.parametrize("name", ["trusted.overlay.opaque", "user.overlay.opaque"])
def test_opaque_y_marks_an_opaque_directory(name: str) -> None:
    assert whiteout.is_opaque({name: b"y"})


def test_opaque_x_only_announces_xattr_whiteouts() -> None:
    assert not whiteout.is_opaque({"trusted.overlay.opaque": b"x"})


@pytest.mark.parametrize("name", ["trusted.overlay.redirect", "trusted.overlay.metacopy", "user.overlay.metacopy"])
def test_redirect_and_metacopy_are_refused_naming_the_path(name: str) -> None:
    with pytest.raises(LayerError, match="layer/dir/file.*" + name.replace(".", r"\.")):
        whiteout.check_supported(b"layer/dir/file", {name: b"x"})


def test_real_file_named_like_a_whiteout_is_refused() -> None:
    with pytest.raises(LayerError, match=r"diff/etc/\.wh\.passwd.*rename or remove"):
        whiteout.check_not_marker(b"diff/etc/.wh.passwd", b".wh.passwd")


def test_overlay_xattrs_never_reach_the_image() -> None:
    kept = whiteout.kept_xattrs(
        {
            "trusted.overlay.opaque": b"y",
            "user.overlay.origin": b"o",
            "security.capability": b"cap",
            "user.mime": b"text/plain",
            "security.selinux": b"ctx",
        }
    )
    assert kept == {"security.capability": b"cap", "user.mime": b"text/plain"}

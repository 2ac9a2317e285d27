"""The overlayfs whiteout rules: one converter says what an OCI layer tar holds for each entry of a layer_dir.

Spec: https://github.com/opencontainers/image-spec/blob/main/layer.md#whiteouts and the kernel's
Documentation/filesystems/overlayfs.rst ("whiteouts and opaque directories", "redirect_dir", "metacopy").
"""

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TypeAlias

from pipeline.errors import LayerError

# The names an OCI layer tar gives overlay's markers:
WHITEOUT_PREFIX = b".wh."  # an empty file named .wh.<name> deletes the lower entry <name>
OPAQUE_MARKER = b".wh..wh..opq"  # an empty file of this name hides all a directory's lower layers hold below it

# The xattrs that are overlay's markers in a layer_dir (each after "<namespace>.overlay.", OVERLAY_XATTRS); the
# kernel's own whiteout, a character device 0/0, needs none:
_OPAQUE = "opaque"  # "y" on a directory: its lower content is hidden ("x", kernel 6.7+: it holds xattr whiteouts)
_WHITEOUT = "whiteout"  # on a zero-size regular file (kernel 6.7+): a whiteout, as a 0/0 character device is
_REDIRECT = "redirect"  # on a directory renamed with redirect_dir on: its lower content sits under another path
_METACOPY = "metacopy"  # on a file copied up with metacopy on: its data still lives in a lower layer

# overlayfs keeps its markers in trusted.overlay.*, or in user.overlay.* when mounted with "userxattr" (kernel
# Documentation/filesystems/overlayfs.rst, "userxattr"), as rootless engines mount it. A mount reads only its own
# namespace: in the other, any process owning a file may set overlay-looking xattrs through the merged view and the
# kernel ignores them. So markers are read from the one namespace a layer was written with (its overlay_xattrs:
# container.Layer), never from both; None means a merged view, whose markers the kernel has applied and hidden.
OVERLAY_XATTRS = ("trusted", "user")
OVERLAY_XATTR_PREFIXES = tuple(f"{namespace}.overlay." for namespace in OVERLAY_XATTRS)


@dataclass(frozen=True, slots=True)
class Plain:
    """An entry written as what it is, carrying only the xattrs an image keeps (kept_xattrs)."""

    name: bytes
    xattrs: dict[str, bytes]


@dataclass(frozen=True, slots=True)
class Whiteout:
    """A deleted lower entry, written as an empty regular file named WHITEOUT_PREFIX + its name, without xattrs."""

    name: bytes  # already prefixed


@dataclass(frozen=True, slots=True)
class OpaqueDirectory:
    """A directory hiding its lower content, written as a directory with the kept xattrs and then its child
    OPAQUE_MARKER, an empty regular file."""

    name: bytes
    xattrs: dict[str, bytes]


Conversion: TypeAlias = Plain | Whiteout | OpaqueDirectory


def convert(path: bytes, st: os.stat_result, xattrs: dict[str, bytes], overlay_xattrs: str | None) -> Conversion:
    """What to write for the layer_dir entry at path (its lstat st, all its xattrs), whose markers are overlay_xattrs'.

    The one place an entry's markers are read. Refuses, naming path, what a layer tar cannot express: a real file
    named like a marker, or an entry written with redirect_dir or metacopy on (check_not_marker, check_supported).
    """
    name = path.rpartition(b"/")[2]
    if is_whiteout(st.st_mode, st.st_rdev, xattrs, overlay_xattrs):
        check_supported(path, xattrs, overlay_xattrs)
        return Whiteout(WHITEOUT_PREFIX + name)
    check_not_marker(path, name)
    check_supported(path, xattrs, overlay_xattrs)
    if stat.S_ISDIR(st.st_mode) and is_opaque(xattrs, overlay_xattrs):
        return OpaqueDirectory(name, kept_xattrs(xattrs))
    return Plain(name, kept_xattrs(xattrs))


def _marker(overlay_xattrs: str | None, name: str) -> str | None:
    """The xattr that is the overlay marker `name` in a layer whose markers live in overlay_xattrs."""
    if overlay_xattrs is None:
        return None
    if overlay_xattrs not in OVERLAY_XATTRS:
        raise ValueError(f"overlay_xattrs {overlay_xattrs!r} is not one of {OVERLAY_XATTRS}")
    return f"{overlay_xattrs}.overlay.{name}"


def is_whiteout_device(st: os.stat_result) -> bool:
    """A 0/0 character device: the kernel's whiteout. The kernel links whiteouts to one shared inode in the work
    dir and unlinks that on every mount, so their link count and ctime change when nothing in the container did."""
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def is_whiteout(mode: int, rdev: int, xattrs: dict[str, bytes], overlay_xattrs: str | None) -> bool:
    """Whether an entry of a layer_dir records the deletion of a lower entry."""
    if stat.S_ISCHR(mode) and rdev == 0:
        return True
    marker = _marker(overlay_xattrs, _WHITEOUT)
    return stat.S_ISREG(mode) and marker is not None and marker in xattrs


def is_opaque(xattrs: dict[str, bytes], overlay_xattrs: str | None) -> bool:
    """Whether a directory hides everything its lower layers hold under the same path."""
    marker = _marker(overlay_xattrs, _OPAQUE)
    return marker is not None and xattrs.get(marker) == b"y"


def check_supported(path: bytes, xattrs: dict[str, bytes], overlay_xattrs: str | None) -> None:
    """Refuse entries whose content is defined by overlay features a plain walk of diff/ cannot reproduce."""
    for name in (_marker(overlay_xattrs, _REDIRECT), _marker(overlay_xattrs, _METACOPY)):
        if name is not None and name in xattrs:
            raise LayerError(
                f"{path.decode(errors='replace')}: has {name}; the layer was written with overlay redirect_dir or"
                " metacopy on, so diff/ alone does not hold its content. Remount without redirect_dir/metacopy"
                " and copy the data up before committing"
            )


def check_not_marker(path: bytes, name: bytes) -> None:
    """Refuse real files whose names every image loader would read as whiteouts."""
    if name.startswith(WHITEOUT_PREFIX):
        raise LayerError(
            f"{path.decode(errors='replace')}: a file named '{WHITEOUT_PREFIX.decode()}*' would be read as a whiteout"
            " by every image loader; rename or remove it in the container before committing"
        )


def kept_xattrs(xattrs: dict[str, bytes]) -> dict[str, bytes]:
    """The xattrs an image carries: file capabilities and user.* (overlay's own metadata never leaves the host).

    user.overlay.* is left out even where it is no marker (a layer with trusted.overlay.* markers): a rootless
    engine that unpacks the image sets every xattr of a layer tar on its layer_dirs, mounted with "userxattr", where
    they would become markers and hide lower files again (containers/storage pkg/archive/archive.go applies all but
    security.selinux, and its own tar writer, readUserXattrToTarHeader, skips user.overlay.* for that reason).
    """
    return {
        name: value
        for name, value in xattrs.items()
        if not name.startswith(OVERLAY_XATTR_PREFIXES) and (name == "security.capability" or name.startswith("user."))
    }


_CAP_SYS_ADMIN = 21  # include/uapi/linux/capability.h


def check_markers_visible(layer_dir: Path, overlay_xattrs: str | None) -> None:
    """Refuse to pack when trusted.overlay.* xattrs would be invisible, since opaque directories would be lost.

    The kernel hides the trusted.* namespace from processes without CAP_SYS_ADMIN: listxattr simply omits it,
    so without this check a commit would succeed and deleted lower files would come back. A layer whose markers
    are user.overlay.* (rootless storage), or that the unprivileged user packing it owns, needs no privilege; a
    merged view (None) has no markers.
    """
    if overlay_xattrs != "trusted" or _has_capability(_CAP_SYS_ADMIN):
        return
    euid = os.geteuid()
    if euid != 0 and layer_dir.stat().st_uid == euid:
        return
    raise LayerError(
        f"{layer_dir}: this process lacks CAP_SYS_ADMIN, so the layer's trusted.overlay.* markers (opaque"
        " directories) are invisible and the image would resurrect deleted files; run as root with CAP_SYS_ADMIN"
    )


def _has_capability(bit: int) -> bool:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> bit & 1)
    except OSError:
        pass
    return os.geteuid() == 0

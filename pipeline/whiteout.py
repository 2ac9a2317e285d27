"""Overlayfs markers in a layer_dir translated to OCI whiteouts.

Spec: https://github.com/opencontainers/image-spec/blob/main/layer.md#whiteouts and the kernel's
Documentation/filesystems/overlayfs.rst ("whiteouts and opaque directories", "redirect_dir", "metacopy").
"""

import os
import stat
from pathlib import Path

from pipeline.errors import LayerError

# A file deleted from a lower layer is packed as an empty file named WHITEOUT_PREFIX + its name.
WHITEOUT_PREFIX = b".wh."
# A directory whose lower content is hidden gets a child entry with this name.
OPAQUE_MARKER = b".wh..wh..opq"

# overlayfs keeps its metadata in the trusted.* namespace, or user.* when mounted with "userxattr" (user namespaces).
OVERLAY_XATTR_PREFIXES = ("trusted.overlay.", "user.overlay.")
_OPAQUE = tuple(p + "opaque" for p in OVERLAY_XATTR_PREFIXES)
# Kernel 6.7+ may write a whiteout as a zero-size file carrying this xattr instead of a 0/0 device.
_XATTR_WHITEOUT = tuple(p + "whiteout" for p in OVERLAY_XATTR_PREFIXES)
# With redirect_dir/metacopy the upper entry's data lives elsewhere: diff/ alone does not hold the truth.
_UNSUPPORTED = tuple(p + n for p in OVERLAY_XATTR_PREFIXES for n in ("redirect", "metacopy"))


def is_whiteout(mode: int, rdev: int, xattrs: dict[str, bytes]) -> bool:
    """Whether an entry of a layer_dir records the deletion of a lower entry."""
    if stat.S_ISCHR(mode) and rdev == 0:
        return True
    return stat.S_ISREG(mode) and any(name in xattrs for name in _XATTR_WHITEOUT)


def is_opaque(xattrs: dict[str, bytes]) -> bool:
    """Whether a directory hides everything its lower layers hold under the same path.

    The value "x" (kernel 6.7+) only says the directory may contain xattr whiteouts; it is not opaque.
    """
    return any(xattrs.get(name) == b"y" for name in _OPAQUE)


def check_supported(path: bytes, xattrs: dict[str, bytes]) -> None:
    """Refuse entries whose content is defined by overlay features a plain walk of diff/ cannot reproduce."""
    for name in _UNSUPPORTED:
        if name in xattrs:
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


def whiteout_name(name: bytes) -> bytes:
    """The tar name that deletes the lower entry called name."""
    return WHITEOUT_PREFIX + name


def kept_xattrs(xattrs: dict[str, bytes]) -> dict[str, bytes]:
    """The xattrs an image carries: file capabilities and user.* (overlay's own metadata never leaves the host)."""
    return {
        name: value
        for name, value in xattrs.items()
        if not name.startswith(OVERLAY_XATTR_PREFIXES) and (name == "security.capability" or name.startswith("user."))
    }


_CAP_SYS_ADMIN = 21  # include/uapi/linux/capability.h


def check_markers_visible(layer_dir: Path) -> None:
    """Refuse to pack when trusted.overlay.* xattrs would be invisible, since opaque directories would be lost.

    The kernel hides the trusted.* namespace from processes without CAP_SYS_ADMIN: listxattr simply omits it,
    so without this check a commit would succeed and deleted lower files would come back. A layer an
    unprivileged user owns is rootless storage, whose markers are user.overlay.* and always visible.
    """
    euid = os.geteuid()
    if _has_capability(_CAP_SYS_ADMIN) or (euid != 0 and layer_dir.stat().st_uid == euid):
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

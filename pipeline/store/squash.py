"""Squashes a container's layers into one: the kernel merges them in a read-only overlay mount, and the merged
view is packed as a single layer, so whiteouts and opaque directories are resolved by overlayfs itself.

The mount lives in a private mount namespace of a child process (`unshare --mount`), so it can never outlive
the commit, even one that is killed; with lowerdirs only, overlayfs is read-only and the source is not written.
It reads the layers' markers from the namespace they were written with ("userxattr" for user.overlay.*), as the
engine's own mount does, and the merged view has none left: overlay-looking xattrs in it are the container's own
(set in the other namespace, or escaped by the kernel), so it is packed with no markers read at all.
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from pipeline.errors import LayerError
from pipeline.layer import whiteout
from pipeline.layer.writer import LayerRecord, encode_record, read_record
from pipeline.store.cache import LayerCache

# overlayfs limits the lowerdir option to one page of text; past this, mount fails with a clear error anyway.
_MOUNT_OPTIONS_LIMIT = 4000


def pack_squashed(
    layer_dirs: list[Path], cache_root: Path, *, clamp_mtime: int | None, overlay_xattrs: str = "trusted"
) -> LayerRecord:
    """Pack the merged view of layer_dirs (oldest first), whose markers live in overlay_xattrs ("trusted" or
    "user", container.Layer), into the cache as one layer."""
    if overlay_xattrs not in whiteout.OVERLAY_XATTRS:
        raise ValueError(f"overlay_xattrs {overlay_xattrs!r} is not one of {whiteout.OVERLAY_XATTRS}")
    lowers = ":".join(_escape(d) for d in reversed(layer_dirs))  # the kernel wants the top layer first
    if len(lowers) > _MOUNT_OPTIONS_LIMIT:
        raise LayerError(f"{layer_dirs[-1]}: too many layers to squash in one overlay mount; commit without --squash")
    command = ["unshare", "--mount", "--propagation", "private", sys.executable, "-c", _CHILD]
    userxattr = overlay_xattrs == "user"
    request = json.dumps({"lowers": lowers, "cache": str(cache_root), "clamp": clamp_mtime, "userxattr": userxattr})
    result = subprocess.run(command, input=request, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        reason = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise LayerError(f"{layer_dirs[-1]}: squashing failed ({reason}); commit without --squash")
    with tempfile.NamedTemporaryFile() as f:
        f.write(result.stdout.encode())
        f.flush()
        return read_record(Path(f.name))


def _escape(path: Path) -> str:
    # ':' and ',' separate overlay options; a backslash escapes them.
    return str(path).replace("\\", "\\\\").replace(":", "\\:").replace(",", "\\,")


_CHILD = "from pipeline.store.squash import pack_in_namespace; pack_in_namespace()"


def pack_in_namespace() -> None:
    """In the new mount namespace: mount the merged view read-only, pack it, print its record."""
    request = json.loads(sys.stdin.read())
    with tempfile.TemporaryDirectory(prefix="pipeline-squash-") as merged:
        options = f"lowerdir={request['lowers']}" + (",userxattr" if request["userxattr"] else "")
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, merged], check=True)
        try:
            cache = LayerCache(Path(request["cache"]))
            record = cache.pack_layer(Path(merged), clamp_mtime=request["clamp"], overlay_xattrs=None)
        finally:
            subprocess.run(["umount", merged], check=False)
    os.write(1, encode_record(record))

"""More rocker containers on build_rocker_storage's two-layer image, each changed through a real overlay mount."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tests.support.overlay_storage import (
    BASE_LAYER_ID,
    CONTAINER_CMD,
    CONTAINER_ENV,
    CREATED,
    FIXED_MTIME,
    IMAGE_REPOSITORY,
    IMAGE_TAG,
    MID_LAYER_ID,
    TreeView,
    container_id_for,
    overlay_mount,
    read_tree,
)


def add_container(root: Path, name: str, files: dict[str, bytes], *, delete: tuple[str, ...] = ()) -> TreeView:
    """Add container `name` on the image under `root`: write `files` and delete `delete` through its merged mount.

    Returns the merged view recorded while mounted. build_rocker_storage(root) must have built the image first.
    """
    container_id = container_id_for(name)
    layer = root / "overlay2" / container_id
    for sub in ("diff", "work", "merged"):
        (layer / sub).mkdir(parents=True)
        os.chmod(layer / sub, 0o755)
    (layer / "lower").write_text(f"{BASE_LAYER_ID}/diff:{MID_LAYER_ID}/diff")  # rocker's order: bottom first
    lowers = [root / "overlay2" / MID_LAYER_ID / "diff", root / "overlay2" / BASE_LAYER_ID / "diff"]
    with overlay_mount(lowers, layer / "diff", layer / "work", layer / "merged") as merged:
        for rel in delete:
            (merged / rel).unlink()  # the kernel writes a whiteout into diff/
        for rel, data in files.items():
            path = merged / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            os.chmod(path, 0o644)
        view = read_tree(merged)
    set_fixed_mtimes(layer / "diff")
    config = {
        "ID": container_id,
        "Name": name,
        "Created": CREATED,
        "State": {"Running": False, "Pid": 0},
        "Config": {"Cmd": CONTAINER_CMD, "Image": f"{IMAGE_REPOSITORY}:{IMAGE_TAG}", "Env": CONTAINER_ENV},
    }
    (root / "containers" / container_id).mkdir(parents=True)
    (root / "containers" / container_id / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return view


def set_fixed_mtimes(diff: Path) -> None:
    """Give every entry of an unmounted layer the builder's fixed mtime, so its layer tar is reproducible."""
    for dirpath, dirnames, filenames in os.walk(os.fsencode(diff)):
        for name in dirnames + filenames:
            os.utime(os.path.join(dirpath, name), (FIXED_MTIME, FIXED_MTIME), follow_symlinks=False)
    os.utime(diff, (FIXED_MTIME, FIXED_MTIME))

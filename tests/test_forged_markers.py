"""Overlay markers forged by a container (issue 11): on a mount with trusted.overlay.* markers, a process in the
container can set user.overlay.* xattrs through the merged view; the kernel ignores them, and so must a commit.
Where the engine mounts with "userxattr" (rootless), user.overlay.* are the markers and are honoured, and
trusted.overlay.* is ignored instead.

Every scenario is a real kernel overlay mount; xattrs are set through the merged view as a container process
would, and the committed image (unpacked by tests/support/imagecheck's Python unpacker) must be the merged view.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.engines import open_storage
from pipeline.engines.container import overlay_xattrs_of
from tests.support.cli import commit_args, run_luigi
from tests.support.imagecheck import compare_trees, read_archive_manifest, unpack_layers_with_python
from tests.support.overlay_storage import (
    BASE_LAYER_ID,
    TreeView,
    _write_metadata,
    container_id_for,
    overlay_mount,
    read_tree,
)

ROOTLESS_UID = 1000  # the owner of a rootless engine's storage root
SQUASH = pytest.mark.parametrize("squash", [False, True], ids=["layers", "squash"])


def _write(path: Path, data: bytes = b"x\n") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _write_base(diff: Path) -> None:
    """An image layer whose files the container's markers, real or forged, could hide."""
    _write(diff / "opt/app/lib.py", b"def lib(): pass\n")  # forged opaque directory
    _write(diff / "opt/app/data/table.csv", b"a,b\n")
    _write(diff / "etc/keep.conf", b"kept\n")  # forged xattr whiteout
    _write(diff / "etc/moved.conf", b"not moved\n")  # forged redirect and metacopy
    _write(diff / "etc/gone.conf", b"deleted by the container\n")  # a real whiteout
    _write(diff / "srv/old/stale.txt", b"hidden by a real opaque dir\n")  # a real opaque directory
    _write(diff / "var/nested/inner.txt", b"under forgeries in the mount's own namespace\n")


def _change_container(merged: Path, namespace: str) -> None:
    """Real changes, which the kernel marks in the upper dir, then forgeries, all through the merged view of a mount
    whose markers live in namespace (also run inside a user namespace: standard library only)."""
    import contextlib
    import os

    (merged / "etc/gone.conf").unlink()
    (merged / "srv/old/stale.txt").unlink()
    (merged / "srv/old").rmdir()
    (merged / "srv/old").mkdir()
    (merged / "srv/old/new.txt").write_bytes(b"re-created\n")
    if namespace == "trusted":  # user.* is anyone's; trusted.* only the host root's, never a rootless container's
        os.setxattr(merged / "opt/app", "user.overlay.opaque", b"y")
        os.setxattr(merged / "etc/keep.conf", "user.overlay.whiteout", b"")
        os.setxattr(merged / "etc/moved.conf", "user.overlay.redirect", b"/etc/keep.conf")
        os.setxattr(merged / "etc/moved.conf", "user.overlay.metacopy", b"")
    # In the mount's own namespace the kernel (6.7+) stores what the merged view sets escaped, as
    # <namespace>.overlay.overlay.*, and shows it unescaped in merged views; older kernels refuse it.
    with contextlib.suppress(OSError):
        os.setxattr(merged / "var/nested", f"{namespace}.overlay.opaque", b"y")
        os.setxattr(merged / "var/nested/inner.txt", f"{namespace}.overlay.redirect", b"/elsewhere")


@contextlib.contextmanager
def _read_only_mount(lowers_top_first: list[Path], merged: Path, *, userxattr: bool) -> Iterator[Path]:
    options = "lowerdir=" + ":".join(str(p) for p in lowers_top_first) + (",userxattr" if userxattr else "")
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, str(merged)], check=True, capture_output=True)
    try:
        yield merged
    finally:
        subprocess.run(["umount", str(merged)], check=True, capture_output=True)


def _commit(root: Path, work: Path, cid: str, *extra: str) -> Path:
    archive = work / "image.tar"
    result = run_luigi(*commit_args(root, work, "--id", cid, "--output", str(archive), "--format", "docker", *extra))
    assert result.returncode == 0, result.stderr[-3000:]
    return archive


def _check_image(archive: Path, expected: TreeView, work: Path) -> None:
    """The image unpacks to exactly the merged view, and no layer carries an overlay xattr."""
    unpacked = work / "rootfs"
    unpack_layers_with_python(archive, unpacked)
    compare_trees(expected, read_tree(unpacked), label="python")
    with tarfile.open(archive) as outer:
        for name in read_archive_manifest(archive)["Layers"]:
            blob = outer.extractfile(name)
            assert blob is not None
            with tarfile.open(fileobj=blob) as layer:
                for member in layer.getmembers():
                    assert not any(".overlay." in key for key in member.pax_headers), (name, member.name)


# --- rootful storage (rocker): trusted.overlay.* markers, user.overlay.* forged ---------------------------------------


@pytest.fixture(scope="module")
def rocker(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, TreeView]:
    root = tmp_path_factory.mktemp("rocker")
    cid = container_id_for("forger")
    base, top = root / "overlay2" / BASE_LAYER_ID, root / "overlay2" / cid
    _write_base(base / "diff")
    for sub in ("diff", "work", "merged"):
        (top / sub).mkdir(parents=True)
    (top / "lower").write_text(f"{BASE_LAYER_ID}/diff")
    with overlay_mount([base / "diff"], top / "diff", top / "work", top / "merged") as merged:
        _change_container(merged, "trusted")
        view = read_tree(merged)
    assert os.getxattr(top / "diff/opt/app", "user.overlay.opaque") == b"y"  # stored as set: a plain user xattr
    _write_metadata(root, cid, "forger", running=False)
    return root, cid, view


@pytest.mark.overlay
def test_the_kernel_ignores_forged_markers(rocker: tuple[Path, str, TreeView]) -> None:
    _, _, view = rocker
    for kept in (b"opt/app/lib.py", b"opt/app/data/table.csv", b"etc/keep.conf", b"etc/moved.conf"):
        assert kept in view.entries
    assert view.entries[b"etc/moved.conf"].size == len(b"not moved\n")
    assert b"var/nested/inner.txt" in view.entries
    assert b"etc/gone.conf" not in view.entries and b"srv/old/stale.txt" not in view.entries


@pytest.mark.overlay
@SQUASH
def test_forged_user_overlay_markers_lose_no_lower_file(
    rocker: tuple[Path, str, TreeView], tmp_path: Path, squash: bool
) -> None:
    root, cid, view = rocker
    _check_image(_commit(root, tmp_path, cid, *(["--squash"] if squash else [])), view, tmp_path)


@pytest.mark.overlay
def test_rootful_storage_has_trusted_markers(rocker: tuple[Path, str, TreeView]) -> None:
    root, cid, _ = rocker
    container = open_storage("rocker", root).read_container(cid)
    assert {layer.overlay_xattrs for layer in (*container.lower_layers, container.upper_layer)} == {"trusted"}


# --- rootless storage (podman): an overlay mounted with "userxattr" in a user namespace -------------------------------

PODMAN_BASE, PODMAN_TOP, PODMAN_CID = (hashlib.sha256(n.encode()).hexdigest() for n in ("f-base", "f-top", "f-ctr"))


def _write_json(path: Path, doc: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))


def _write_containers_storage(root: Path, owner: int) -> None:
    """containers-storage's records of one container on one image layer (made from a root file system, no image)."""
    _write_json(root / "overlay-layers/layers.json", [{"id": PODMAN_BASE}, {"id": PODMAN_TOP, "parent": PODMAN_BASE}])
    record = {"id": PODMAN_CID, "names": ["forger"], "image": "", "layer": PODMAN_TOP}
    _write_json(root / "overlay-containers/containers.json", [record])
    os.chown(root, owner, owner)


@pytest.fixture(scope="module")
def rootless(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TreeView]:
    """containers-storage as rootless podman leaves it: the graphroot owned by the user, the container's layer written
    through an overlay that a user namespace mounted with "userxattr" (containers/storage drivers/overlay)."""
    root = tmp_path_factory.mktemp("podman") / "storage"
    base, top = root / "overlay" / PODMAN_BASE, root / "overlay" / PODMAN_TOP
    _write_base(base / "diff")
    for sub in ("diff", "work", "merged"):
        (top / sub).mkdir(parents=True)
    options = f"lowerdir={base / 'diff'},upperdir={top / 'diff'},workdir={top / 'work'},userxattr"
    script = "import sys\nfrom pathlib import Path\n" + inspect.getsource(_change_container)
    script += "\n_change_container(Path(sys.argv[1]), 'user')\n"
    done = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
         'mount -t overlay overlay -o "$1" "$2" && exec "$3" -c "$4" "$2"',
         "sh", options, str(top / "merged"), sys.executable, script],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"no overlay mount with userxattr in a user namespace here: {done.stderr.strip()[-500:]}")
    assert os.getxattr(top / "diff/srv/old", "user.overlay.opaque") == b"y"  # the kernel's own marker
    # What only the host's root could set: trusted.overlay.* markers, which a "userxattr" mount ignores.
    os.setxattr(top / "diff/var/nested", "trusted.overlay.opaque", b"y")
    os.setxattr(top / "diff/var/nested/inner.txt", "trusted.overlay.whiteout", b"")
    # The container's view: the same layers, mounted the same way.
    with _read_only_mount([top / "diff", base / "diff"], top / "merged", userxattr=True) as merged:
        view = read_tree(merged)
    _write_containers_storage(root, ROOTLESS_UID)
    return root, view


@pytest.mark.overlay
def test_userxattr_markers_are_the_kernels_in_a_rootless_layer(rootless: tuple[Path, TreeView]) -> None:
    _, view = rootless
    assert b"etc/gone.conf" not in view.entries and b"srv/old/stale.txt" not in view.entries
    assert b"srv/old/new.txt" in view.entries and b"var/nested/inner.txt" in view.entries


@pytest.mark.overlay
@SQUASH
def test_userxattr_markers_are_honoured_for_rootless_storage(
    rootless: tuple[Path, TreeView], tmp_path: Path, squash: bool
) -> None:
    root, view = rootless
    archive = _commit(root, tmp_path, PODMAN_CID, "--storage-engine", "podman", *(["--squash"] if squash else []))
    _check_image(archive, view, tmp_path)


# --- which namespace an engine's storage uses ------------------------------------------------------------------------


@pytest.mark.root
@pytest.mark.parametrize(("owner", "expected"), [(0, "trusted"), (ROOTLESS_UID, "user")])
def test_podman_layers_take_the_namespace_of_the_graphroot_owner(tmp_path: Path, owner: int, expected: str) -> None:
    root = tmp_path / "storage"
    for layer in (PODMAN_BASE, PODMAN_TOP):
        (root / "overlay" / layer / "diff").mkdir(parents=True)
    _write_containers_storage(root, owner)
    container = open_storage("podman", root).read_container(PODMAN_CID)
    assert [layer.overlay_xattrs for layer in (*container.lower_layers, container.upper_layer)] == [expected, expected]


@pytest.mark.root
def test_a_container_chowning_its_upper_dir_does_not_change_the_namespace(tmp_path: Path) -> None:
    root = tmp_path / "storage"
    for layer in (PODMAN_BASE, PODMAN_TOP):
        (root / "overlay" / layer / "diff").mkdir(parents=True)
    _write_containers_storage(root, 0)
    os.chown(root / "overlay" / PODMAN_TOP / "diff", ROOTLESS_UID, ROOTLESS_UID)  # `chown 1000 /` in the container
    assert open_storage("podman", root).read_container(PODMAN_CID).upper_layer.overlay_xattrs == "trusted"


@pytest.mark.root
@pytest.mark.parametrize(("owner", "expected"), [(0, "trusted"), (ROOTLESS_UID, "user")])
def test_docker_layers_take_the_namespace_of_the_data_root_owner(tmp_path: Path, owner: int, expected: str) -> None:
    root = tmp_path / "docker"
    cid, mount_id = hashlib.sha256(b"c").hexdigest(), hashlib.sha256(b"m").hexdigest()
    (root / "overlay2" / mount_id / "diff").mkdir(parents=True)
    _write(root / "image/overlay2/layerdb/mounts" / cid / "mount-id", mount_id.encode())
    config = {"ID": cid, "Name": "/forger", "Driver": "overlay2", "State": {}, "Config": {"Cmd": ["sh"]}}
    _write_json(root / "containers" / cid / "config.v2.json", config)
    os.chown(root, owner, owner)
    assert open_storage("docker", root).read_container(cid).upper_layer.overlay_xattrs == expected
    assert overlay_xattrs_of(root) == expected

"""The snapshot store as image tools read it: skopeo, umoci and podman take snapshots straight out of the store,
and an exported snapshot loads everywhere; each unpacked root filesystem is compared file by file with the
container's merged view, recorded through its real overlay mount."""

import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest

from pipeline import assembly
from pipeline.engines.rocker import RockerStorage as RockerEngine
from pipeline.layer.writer import LayerRecord
from pipeline.snapshots.store import SnapshotStore
from pipeline.store import compression
from pipeline.store.cache import LayerCache
from tests.support.cli import REPO
from tests.support.fleet import add_container
from tests.support.imagecheck import (
    check_image_archive,
    check_oci_image,
    compare_trees,
    podman_command,
    read_archive_manifest,
)
from tests.support.overlay_storage import (
    BASE_LAYER_ID,
    MID_LAYER_ID,
    TreeView,
    build_rocker_storage,
    container_id_for,
    overlay_mount,
    read_tree,
)

pytestmark = [pytest.mark.overlay, pytest.mark.tools]

T1, T2, T3 = "2026-11-30T1100", "2026-11-30T1200", "2026-11-30T1300"
EPOCH = int(datetime(2026, 11, 30, 11, tzinfo=UTC).timestamp())


@dataclass(frozen=True)
class Snapshots:
    """A store holding web-1 at T1, T2 (changed) and T3 (unchanged: a reference), and db-1 at T1, all on one image;
    the merged view of each snapshot's container, by reference; and the layer cache it was filled from."""

    store: SnapshotStore
    views: dict[str, TreeView]
    cache: LayerCache


def _take_snapshot(
    engine: RockerEngine,
    cache: LayerCache,
    store: SnapshotStore,
    name: str,
    stamp: str,
    packed: dict[Path, LayerRecord],
) -> None:
    """What a snapshot run does for one changed container: pack its layers (each once: packed holds those that
    are), build its config, add it."""
    container_id = container_id_for(name)
    container = engine.read_container(container_id)
    records = []
    for layer in (*container.lower_layers, container.upper_layer):
        if layer.layer_dir not in packed:
            packed[layer.layer_dir] = cache.pack_layer(layer.layer_dir, overlay_xattrs=layer.overlay_xattrs)
        records.append(packed[layer.layer_dir])
    blobs = [compression.compress_blob(cache.root, record, "none", 0) for record in records]
    config = assembly.build_config_bytes(engine, container_id, records, EPOCH)
    paths = [cache.blob_path(blob.digest) for blob in blobs]
    created = datetime.fromtimestamp(EPOCH, UTC)
    store.add_image(f"{name}:{stamp}", config, blobs, paths, container_id=container_id, stamp=stamp, created=created)


def _change_container(root: Path, name: str) -> TreeView:
    """Write and delete files through the container's overlay mount, as a running container would; its view."""
    layer = root / "overlay2" / container_id_for(name)
    lowers = [root / "overlay2" / MID_LAYER_ID / "diff", root / "overlay2" / BASE_LAYER_ID / "diff"]
    with overlay_mount(lowers, layer / "diff", layer / "work", layer / "merged") as merged:
        (merged / "srv/www/index.html").write_bytes(b"<h1>changed</h1>\n")
        (merged / "etc/passwd").unlink()  # a whiteout of an image file
        (merged / "srv/second.txt").write_bytes(b"second snapshot\n")
        return read_tree(merged)


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory: pytest.TempPathFactory) -> Snapshots:
    work = tmp_path_factory.mktemp("store")
    root = work / "rocker"
    web = build_rocker_storage(root, name="web-1")
    db_view = add_container(root, "db-1", {"srv/db/data.sql": b"create table t (x int);\n"}, delete=("bin/sh",))
    engine, cache, store = RockerEngine(root), LayerCache(work / "cache"), SnapshotStore(work / "store")
    packed: dict[Path, LayerRecord] = {}
    _take_snapshot(engine, cache, store, "web-1", T1, packed)
    _take_snapshot(engine, cache, store, "db-1", T1, packed)
    changed = _change_container(root, "web-1")
    del packed[root / "overlay2" / web.container_id / "diff"]
    _take_snapshot(engine, cache, store, "web-1", T2, packed)
    created = datetime.fromtimestamp(EPOCH, UTC)
    store.add_reference(f"web-1:{T2}", f"web-1:{T3}", container_id=web.container_id, stamp=T3, created=created)
    views = {f"web-1:{T1}": web.merged, f"db-1:{T1}": db_view, f"web-1:{T2}": changed, f"web-1:{T3}": changed}
    return Snapshots(store, views, cache)


def _run(*argv: str, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, env=env, check=False, timeout=120)
    assert done.returncode == 0, f"{' '.join(argv)} failed: {done.stderr.strip()}"
    return done.stdout


def test_two_containers_and_three_snapshots_share_every_layer_blob_they_can(snapshots: Snapshots) -> None:
    store = snapshots.store
    manifests = {e.reference: store.read_manifest(e) for e in store.entries()}
    layers = {ref: [d["digest"] for d in m["layers"]] for ref, m in manifests.items()}
    assert layers[f"web-1:{T1}"][:2] == layers[f"db-1:{T1}"][:2] == layers[f"web-1:{T2}"][:2]  # base and mid
    assert len({layers[f"web-1:{T1}"][2], layers[f"db-1:{T1}"][2], layers[f"web-1:{T2}"][2]}) == 3
    assert store.find(f"web-1:{T3}").digest == store.find(f"web-1:{T2}").digest  # type: ignore[union-attr]
    needed = {e.digest for e in store.entries()}
    needed |= {d["digest"] for m in manifests.values() for d in [m["config"], *m["layers"]]}
    assert sorted(p.name for p in store.blob_dir.iterdir()) == sorted(d[7:] for d in needed)
    for digest in layers[f"web-1:{T1}"][:2]:  # one inode for the cache and the store, whatever uses it
        assert os.path.samefile(store.blob_path(digest), snapshots.cache.blob_path(digest))


def test_umoci_unpacks_every_snapshot_straight_from_the_store(snapshots: Snapshots, tmp_path: Path) -> None:
    listed = _run("umoci", "ls", "--layout", str(snapshots.store.root)).split()
    assert sorted(listed) == sorted(snapshots.views)
    for number, (ref, view) in enumerate(snapshots.views.items()):
        bundle = tmp_path / f"bundle-{number}"
        _run("umoci", "unpack", "--image", f"{snapshots.store.root}:{ref}", str(bundle))
        compare_trees(view, read_tree(bundle / "rootfs"), label=f"umoci unpack --image store:{ref}")


def test_skopeo_copies_a_snapshot_out_of_the_store_into_an_archive_every_tool_loads(
    snapshots: Snapshots, tmp_path: Path
) -> None:
    ref = f"web-1:{T2}"
    archive = tmp_path / "web.tar"
    inspected = json.loads(_run("skopeo", "inspect", f"oci:{snapshots.store.root}:{ref}"))
    assert len(inspected["Layers"]) == 3
    _run(
        "skopeo",
        "--insecure-policy",
        "copy",
        "--quiet",
        f"oci:{snapshots.store.root}:{ref}",
        f"docker-archive:{archive}:{ref}",
    )
    check_image_archive(archive, snapshots.views[ref], tmp_path / "check", ref=ref)


def test_podman_pulls_a_snapshot_straight_from_the_store(snapshots: Snapshots, tmp_path: Path) -> None:
    ref = f"db-1:{T1}"
    podman, env, runroot = podman_command(tmp_path.resolve())
    try:
        image_id = _run(*podman, "pull", "--quiet", f"oci:{snapshots.store.root}:{ref}", env=env).strip()
        mounted = Path(_run(*podman, "image", "mount", image_id, env=env).strip())
        compare_trees(snapshots.views[ref], read_tree(mounted), label=f"podman pull oci:store:{ref}")
        _run(*podman, "image", "unmount", image_id, env=env)
        # podman load wants a layout with one image; a store holds many, hence export_image.
        refused = subprocess.run([*podman, "load", "-i", str(snapshots.store.root)], capture_output=True, env=env)
        assert refused.returncode != 0 and b"more than one image in oci" in refused.stderr
    finally:
        subprocess.run([*podman, "rmi", "--all", "--force"], capture_output=True, env=env, check=False)
        shutil.rmtree(runroot, ignore_errors=True)


def test_an_exported_snapshot_loads_as_a_docker_archive_and_an_oci_archive(
    snapshots: Snapshots, tmp_path: Path
) -> None:
    ref = f"web-1:{T3}"  # the unchanged container's snapshot: an index entry naming T2's image
    archive = tmp_path / "web.tar"
    command = [
        sys.executable,
        "-m",
        "pipeline",
        "export",
        ref,
        "-o",
        str(archive),
        "--store",
        str(snapshots.store.root),
    ]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    check_image_archive(archive, snapshots.views[ref], tmp_path / "as-docker", ref=ref)
    check_oci_image(archive, snapshots.views[ref], tmp_path / "as-oci", tag=T3, ref=f"docker.io/library/{ref}")
    docker = tmp_path / "docker.tar"
    snapshots.store.export_image(ref, docker, "docker")
    assert read_archive_manifest(docker)["RepoTags"] == [ref]
    assert len(json.loads(_run("skopeo", "inspect", f"docker-archive:{docker}"))["Layers"]) == 3


_KILLED = """
import sys
from datetime import datetime
from pathlib import Path
from pipeline.snapshots.store import SnapshotStore

SnapshotStore(Path(sys.argv[1])).add_reference(sys.argv[2], "web-1:killed", container_id="", stamp="killed",
                                               created=datetime.now())
"""


def test_a_kill_while_the_index_is_replaced_leaves_a_store_the_tools_read(snapshots: Snapshots, tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path / "store")
    shutil.copytree(snapshots.store.root, store.root)
    env = {**os.environ, "PIPELINE_FAILPOINTS": "atomic:before-rename@1"}
    done = subprocess.run(
        [sys.executable, "-c", _KILLED, str(store.root), f"db-1:{T1}"], cwd=REPO, env=env, capture_output=True
    )
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert sorted(_run("umoci", "ls", "--layout", str(store.root)).split()) == sorted(snapshots.views)
    _run("skopeo", "inspect", f"oci:{store.root}:db-1:{T1}")

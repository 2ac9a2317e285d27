"""The podman reader: real podman storage committed through the command line, compared with podman's own commit,
and the reader's answers on hand-made containers-storage, libpod SQLite and BoltDB files, malformed ones included."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import shutil
import sqlite3
import stat
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.engines import open_storage
from pipeline.engines.podman import PodmanStorage
from pipeline.errors import ContainerNotFound, StorageError
from tests.support.boltdb_file import PAGE_HEADER, build_bolt_file, meta_offset
from tests.support.cli import commit_args, error_lines, run_luigi, tree_fingerprint
from tests.support.imagecheck import (
    check_image_archive,
    compare_trees,
    read_archive_config,
    read_archive_manifest,
    unpack_layers_with_python,
)
from tests.support.overlay_storage import read_tree
from tests.support.podman_storage import CONTAINER_CMD, build_podman_storage
from tests.support.podman_storage import PodmanStorage as RealPodmanStorage

# --- real podman ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealPodmanStorage]:
    storage = build_podman_storage(tmp_path_factory.mktemp("podman"))
    try:
        yield storage
    finally:
        shutil.rmtree(storage.runroot, ignore_errors=True)


def _commit(podman: RealPodmanStorage, work: Path, id_text: str, *extra: str) -> Path:
    archive = work / "web.tar"
    args = commit_args(podman.root, work, "--id", id_text, "--storage-engine", "podman", "--output", str(archive))
    result = run_luigi(*args, *extra)
    assert result.returncode == 0, result.stderr
    return archive


@pytest.mark.overlay
@pytest.mark.tools("podman")
@pytest.mark.tools
def test_commit_by_name_equals_the_merged_view_in_every_consumer(podman: RealPodmanStorage, tmp_path: Path) -> None:
    archive = _commit(podman, tmp_path, "web", "--image", "web:snap")
    check_image_archive(archive, podman.merged, tmp_path / "check", ref="web:snap")


@pytest.mark.overlay
@pytest.mark.tools("podman")
def test_root_filesystem_and_layer_count_equal_podman_commit_and_save(
    podman: RealPodmanStorage, tmp_path: Path
) -> None:
    archive = _commit(podman, tmp_path, podman.container_id[:10])
    unpack_layers_with_python(archive, tmp_path / "ours")
    unpack_layers_with_python(podman.podman_archive, tmp_path / "podman")
    compare_trees(read_tree(tmp_path / "podman"), read_tree(tmp_path / "ours"), label="podman commit + save")
    assert len(read_archive_manifest(archive)["Layers"]) == len(read_archive_manifest(podman.podman_archive)["Layers"])


@pytest.mark.overlay
@pytest.mark.tools("podman")
def test_config_equals_what_podman_commit_writes(podman: RealPodmanStorage, tmp_path: Path) -> None:
    ours = read_archive_config(_commit(podman, tmp_path, "web"))["config"]
    theirs = read_archive_config(podman.podman_archive)["config"]
    for key in ("Cmd", "Entrypoint", "Env", "WorkingDir", "User", "Labels", "ExposedPorts"):
        assert ours.get(key) == theirs.get(key), key
    assert ours["Cmd"] == CONTAINER_CMD and ours["WorkingDir"] == "/srv"
    assert {"8080/tcp", "9090/udp", "80/tcp"} == set(ours["ExposedPorts"])  # image's, --expose'd, --publish'ed


@pytest.mark.overlay
@pytest.mark.tools("podman")
def test_base_layer_diff_id_equals_podmans(podman: RealPodmanStorage, tmp_path: Path) -> None:
    ours = read_archive_config(_commit(podman, tmp_path, "web"))["rootfs"]["diff_ids"]
    theirs = read_archive_config(podman.podman_archive)["rootfs"]["diff_ids"]
    assert ours[0] == theirs[0]


@pytest.mark.overlay
@pytest.mark.tools("podman")
def test_layers_are_the_ones_podman_mounts_oldest_first(podman: RealPodmanStorage) -> None:
    container = PodmanStorage(podman.root).read_container(podman.container_id)
    mounted = json.loads(podman.run("container", "inspect", "--format", "{{json .GraphDriver.Data}}", "web"))
    lower_top_first = [Path(p) for p in mounted["LowerDir"].split(":")]
    assert [layer.layer_dir for layer in container.lower_layers] == lower_top_first[::-1]
    assert container.upper_layer.layer_dir == Path(mounted["UpperDir"])
    assert len(container.lower_layers) == 2  # the imported layer and the one podman commit added
    assert (container.name, container.image, container.running) == ("web", "localhost/mid:1", False)


@pytest.mark.overlay
@pytest.mark.tools("podman")
def test_container_layer_holds_the_kernels_whiteouts_and_opaque_directory(podman: RealPodmanStorage) -> None:
    # What the end-to-end tests above rely on: podman's overlay mount left real overlay markers in the diff.
    diff = PodmanStorage(podman.root).read_container(podman.container_id).upper_layer.layer_dir
    for deleted in ("etc/hostname", "gone"):
        st = os.lstat(diff / deleted)
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0, deleted
    assert os.getxattr(diff / "opt/app", "trusted.overlay.opaque") == b"y"
    assert stat.S_ISFIFO(os.lstat(diff / "run/app.fifo").st_mode)


@pytest.mark.overlay
@pytest.mark.tools("podman")
def test_base_config_is_the_image_config_podman_stored(podman: RealPodmanStorage) -> None:
    storage = PodmanStorage(podman.root)
    base = storage.read_base_config(storage.read_container(podman.container_id))
    assert base is not None
    expected = json.loads(podman.run("image", "inspect", "--format", "{{json .Config}}", "localhost/mid:1"))
    assert base["config"]["Entrypoint"] == expected["Entrypoint"] == ["/bin/busybox"]
    assert base["config"]["Labels"] == expected["Labels"]


@pytest.mark.overlay
@pytest.mark.tools("podman")
def test_reading_leaves_the_storage_untouched(podman: RealPodmanStorage) -> None:
    before = tree_fingerprint(podman.root)
    storage = PodmanStorage(podman.root)
    for container_id in storage.list_containers():
        storage.read_base_config(storage.read_container(container_id))
    assert tree_fingerprint(podman.root) == before


# --- hand-made storage: no root, no podman -----------------------------------------------------------------------

BASE_LAYER, TOP_LAYER, IMAGE_ID, CID = (hashlib.sha256(n.encode()).hexdigest() for n in ("base", "top", "img", "ctr"))
IMAGE_CONFIG = json.dumps({"architecture": "amd64", "os": "linux", "config": {"Cmd": ["sh"], "Env": ["A=1"]}}).encode()
LIBPOD_CONFIG = {
    "id": CID,
    "name": "app",
    "rootfsImageName": "localhost/base:1",
    "entrypoint": ["/bin/tini"],
    "command": ["serve", "--port", "80"],
    "user": "1000:1000",
    "labels": {"role": "api"},
    "exposedPorts": {"8080": ["tcp", "udp"]},
    "newPortMappings": [{"container_port": 80, "host_port": 8000, "protocol": "tcp,sctp"}],
    "spec": {"process": {"args": ["/bin/tini", "serve"], "env": ["PATH=/bin", "A=1"], "cwd": "/app"}},
}


def _write_json(path: Path, doc: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))


def _big_data_name(key: str) -> str:
    return "=" + base64.b64encode(key.encode()).decode()


def _make_storage(root: Path) -> Path:
    """containers-storage as podman writes it: one image of one layer, one container on it; no database yet."""
    for layer in (BASE_LAYER, TOP_LAYER):
        (root / "overlay" / layer / "diff").mkdir(parents=True)
    (root / "overlay" / TOP_LAYER / "diff" / "hello.txt").write_text("hi\n")
    _write_json(
        root / "overlay-layers/layers.json",
        [{"id": BASE_LAYER, "diff-digest": "sha256:" + "0" * 64}, {"id": TOP_LAYER, "parent": BASE_LAYER}],
    )
    config_digest = "sha256:" + hashlib.sha256(IMAGE_CONFIG).hexdigest()
    images = root / "overlay-images"
    _write_json(images / "images.json", [{"id": IMAGE_ID, "names": ["localhost/base:1"], "layer": BASE_LAYER}])
    (images / IMAGE_ID).mkdir()
    (images / IMAGE_ID / _big_data_name(config_digest)).write_bytes(IMAGE_CONFIG)
    _write_json(images / IMAGE_ID / "manifest", {"schemaVersion": 2, "config": {"digest": config_digest}})
    metadata = json.dumps({"image-name": "localhost/base:1", "name": "app"})
    _write_json(
        root / "overlay-containers/containers.json",
        [{"id": CID, "names": ["app"], "image": IMAGE_ID, "layer": TOP_LAYER, "metadata": metadata}],
    )
    return root


def _write_sqlite(root: Path, config: dict[str, Any], state: dict[str, Any]) -> None:
    """db.sql with the two tables the reader queries, as libpod/sqlite_state_internal.go creates them (WAL mode)."""
    connection = sqlite3.connect(root / "db.sql")
    connection.execute("PRAGMA journal_mode = WAL")
    connection.execute("CREATE TABLE ContainerConfig(ID TEXT PRIMARY KEY NOT NULL, Name TEXT UNIQUE NOT NULL,"
                       " PodID TEXT, JSON TEXT NOT NULL)")  # fmt: skip
    connection.execute("CREATE TABLE ContainerState(ID TEXT PRIMARY KEY NOT NULL, State INTEGER NOT NULL,"
                       " ExitCode INTEGER, JSON TEXT NOT NULL)")  # fmt: skip
    connection.execute("INSERT INTO ContainerConfig VALUES (?, ?, NULL, ?)", (CID, "app", json.dumps(config)))
    connection.execute("INSERT INTO ContainerState VALUES (?, ?, 0, ?)", (CID, state["state"], json.dumps(state)))
    connection.commit()
    connection.close()


def _bolt_tree(config: dict[str, Any], state: dict[str, Any], *, others: int = 0) -> dict[bytes, Any]:
    """libpod's buckets (boltdb_state_internal.go): ctr/<id>/{config,state}, plus `others` unrelated containers."""
    containers: dict[bytes, Any] = {
        CID.encode(): {
            b"config": json.dumps(config).encode(),
            b"state": json.dumps(state).encode(),
            b"dependencies": {},
        }
    }
    for i in range(others):
        other = hashlib.sha256(f"other {i}".encode()).hexdigest().encode()
        containers[other] = {b"config": b'{"name": "x"}', b"state": b'{"state": 1}'}
    return {b"ctr": containers, b"all-ctrs": {CID.encode(): b"app"}, b"runtime-config": {b"os": b"linux"}}


def _write_bolt(root: Path, data: bytes) -> Path:
    path = root / "libpod" / "bolt_state.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.fixture
def storage(tmp_path: Path) -> Path:
    return _make_storage(tmp_path / "storage")


def test_engine_name_podman_opens_the_podman_reader(storage: Path) -> None:
    assert isinstance(open_storage("podman", storage), PodmanStorage)


def test_sqlite_database_gives_settings_running_state_and_pid(storage: Path) -> None:
    _write_sqlite(storage, LIBPOD_CONFIG, {"state": 3, "pid": 4321})
    container = PodmanStorage(storage).read_container(CID)
    assert (container.running, container.pid, container.name) == (True, 4321, "app")
    assert container.config == {
        "Entrypoint": ["/bin/tini"],
        "Cmd": ["serve", "--port", "80"],
        "Env": ["PATH=/bin", "A=1"],
        "WorkingDir": "/app",
        "User": "1000:1000",
        "Labels": {"role": "api"},
        "ExposedPorts": {"8080/tcp": {}, "8080/udp": {}, "80/tcp": {}, "80/sctp": {}},
    }
    assert [layer.layer_id for layer in container.lower_layers] == [BASE_LAYER]
    upper = container.upper_layer
    assert upper.layer_id == TOP_LAYER and upper.layer_dir == storage / "overlay" / TOP_LAYER / "diff"


def test_sqlite_database_is_read_without_writing_next_to_it(storage: Path) -> None:
    _write_sqlite(storage, LIBPOD_CONFIG, {"state": 1})
    before = tree_fingerprint(storage)
    PodmanStorage(storage).read_container(CID)
    assert tree_fingerprint(storage) == before


def test_sqlite_changes_still_in_the_write_ahead_log_are_read(storage: Path) -> None:
    _write_sqlite(storage, LIBPOD_CONFIG, {"state": 1})
    # A live podman keeps its connection open, so committed changes can sit in db.sql-wal, not yet in db.sql.
    live = sqlite3.connect(storage / "db.sql")
    try:
        live.execute("PRAGMA wal_autocheckpoint = 0")
        live.execute("UPDATE ContainerState SET JSON = ? WHERE ID = ?", (json.dumps({"state": 3, "pid": 99}), CID))
        live.commit()
        assert (storage / "db.sql-wal").stat().st_size > 0
        container = PodmanStorage(storage).read_container(CID)
    finally:
        live.close()
    assert (container.running, container.pid) == (True, 99)


def test_paused_container_is_not_treated_as_running(storage: Path) -> None:
    _write_sqlite(storage, LIBPOD_CONFIG, {"state": 5, "pid": 4321})
    assert not PodmanStorage(storage).read_container(CID).running


def test_missing_entrypoint_and_command_clear_the_base_images(storage: Path) -> None:
    config = {k: v for k, v in LIBPOD_CONFIG.items() if k not in ("entrypoint", "command")}
    _write_sqlite(storage, config, {"state": 1})
    settings = PodmanStorage(storage).read_container(CID).config
    assert settings["Entrypoint"] is None and settings["Cmd"] is None


def test_bolt_database_with_branch_pages_and_inline_buckets_is_read(storage: Path) -> None:
    _write_bolt(
        storage, build_bolt_file(_bolt_tree(LIBPOD_CONFIG, {"state": 3, "pid": 7}, others=9), leaf_items=2, inline=True)
    )
    container = PodmanStorage(storage).read_container(CID)
    assert (container.running, container.pid, container.config["Cmd"]) == (True, 7, ["serve", "--port", "80"])


def test_big_endian_bolt_database_is_read(storage: Path) -> None:
    _write_bolt(storage, build_bolt_file(_bolt_tree(LIBPOD_CONFIG, {"state": 1}), order=">"))
    assert PodmanStorage(storage).read_container(CID).config["User"] == "1000:1000"


def test_bolt_value_larger_than_a_page_is_read_from_overflow_pages(storage: Path) -> None:
    config = {**LIBPOD_CONFIG, "labels": {f"label-{i}": "x" * 100 for i in range(100)}}
    _write_bolt(storage, build_bolt_file(_bolt_tree(config, {"state": 1})))
    assert len(PodmanStorage(storage).read_container(CID).config["Labels"]) == 100


def test_bolt_meta_page_with_a_bad_checksum_falls_back_to_the_other(storage: Path) -> None:
    data = bytearray(build_bolt_file(_bolt_tree(LIBPOD_CONFIG, {"state": 1}), txids=(1, 2)))
    data[meta_offset(1) + PAGE_HEADER + 60] ^= 0xFF  # the newer meta page's checksum
    _write_bolt(storage, bytes(data))
    assert PodmanStorage(storage).read_container(CID).config["User"] == "1000:1000"


def test_bolt_file_without_a_valid_meta_page_is_refused(storage: Path) -> None:
    data = bytearray(build_bolt_file(_bolt_tree(LIBPOD_CONFIG, {"state": 1})))
    for index in (0, 1):
        data[meta_offset(index) + PAGE_HEADER + 60] ^= 0xFF
    path = _write_bolt(storage, bytes(data))
    with pytest.raises(StorageError, match=f"{path}: podman's BoltDB database is corrupt .no valid meta page"):
        PodmanStorage(storage).read_container(CID)


def test_truncated_bolt_file_is_refused(storage: Path) -> None:
    path = _write_bolt(storage, build_bolt_file(_bolt_tree(LIBPOD_CONFIG, {"state": 1}))[: 3 * 4096 + 100])
    with pytest.raises(StorageError, match=f"{path}: podman's BoltDB database is corrupt"):
        PodmanStorage(storage).read_container(CID)


def test_bolt_branch_page_pointing_at_itself_is_refused(storage: Path) -> None:
    data = bytearray(build_bolt_file(_bolt_tree(LIBPOD_CONFIG, {"state": 1}, others=4), leaf_items=2))
    root = struct.unpack_from("<Q", data, PAGE_HEADER + 16)[0]
    # Point every child of the root branch page back at the root itself.
    _, flags, count, _ = struct.unpack_from("<QHHI", data, root * 4096)
    assert flags == 0x01
    for i in range(count):
        struct.pack_into("<Q", data, root * 4096 + PAGE_HEADER + i * 16 + 8, root)
    _write_bolt(storage, bytes(data))
    with pytest.raises(StorageError, match="deeper than any real database"):
        PodmanStorage(storage).read_container(CID)


def test_container_missing_from_the_database_gets_the_base_settings_only(
    storage: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _write_bolt(storage, build_bolt_file({b"ctr": {}}))
    with caplog.at_level(logging.WARNING, logger="pipeline.engines.podman"):
        container = PodmanStorage(storage).read_container(CID)
    assert container.config == {} and not container.running
    assert "not in podman's database" in caplog.text


def test_base_config_is_found_through_the_manifest_and_checked_against_its_digest(storage: Path) -> None:
    reader = PodmanStorage(storage)
    assert reader.read_base_config(reader.read_container(CID)) == json.loads(IMAGE_CONFIG)
    [config_file] = (storage / "overlay-images" / IMAGE_ID).glob("=*")
    config_file.write_bytes(IMAGE_CONFIG.replace(b"sh", b"zsh"))
    with pytest.raises(StorageError, match=f"{config_file}: config of image {IMAGE_ID} does not match its digest"):
        reader.read_base_config(reader.read_container(CID))


def test_base_config_of_an_image_without_manifest_is_keyed_by_the_image_id(storage: Path) -> None:
    images = storage / "overlay-images"
    image_id = hashlib.sha256(IMAGE_CONFIG).hexdigest()
    (images / IMAGE_ID).rename(images / image_id)
    (images / image_id / "manifest").unlink()
    _write_json(images / "images.json", [{"id": image_id, "layer": BASE_LAYER}])
    records = json.loads((storage / "overlay-containers/containers.json").read_text())
    records[0]["image"] = image_id
    _write_json(storage / "overlay-containers/containers.json", records)
    reader = PodmanStorage(storage)
    assert reader.read_base_config(reader.read_container(CID)) == json.loads(IMAGE_CONFIG)


def _edit(path: Path, edit: Any) -> None:
    doc = json.loads(path.read_text())
    edit(doc)
    _write_json(path, doc)


LAYERS, CONTAINERS = "overlay-layers/layers.json", "overlay-containers/containers.json"


@pytest.mark.parametrize(
    ("file", "edit", "message"),
    [
        (CONTAINERS, lambda d: d[0].update(layer="../../etc"), "has layer '../../etc', not a 64-hex id"),
        (CONTAINERS, lambda d: d.append({"id": "../x"}), "has id '../x', not a 64-hex id"),
        (CONTAINERS, lambda d: d.append([]), "must be a JSON array of objects"),
        (LAYERS, lambda d: d[1].update(parent="/etc"), "has parent '/etc', not a 64-hex id"),
        (LAYERS, lambda d: d.pop(0), f"layer {BASE_LAYER} of container {CID} is not listed"),
        (LAYERS, lambda d: d[0].update(parent=TOP_LAYER), "is its own ancestor"),
        (LAYERS, lambda d: d[0].update(flags={"incomplete": True}), f"layer {BASE_LAYER} .* is incomplete"),
    ],
)
def test_malformed_storage_metadata_is_refused_naming_the_file(
    storage: Path, file: str, edit: Any, message: str
) -> None:
    _edit(storage / file, edit)
    with pytest.raises(StorageError, match=f"{storage / file}: .*{message}"):
        reader = PodmanStorage(storage)
        reader.read_container(reader.list_containers()[0] if file == LAYERS else CID)


def test_malformed_json_is_refused_naming_the_file(storage: Path) -> None:
    (storage / LAYERS).write_text("[{")
    with pytest.raises(StorageError, match=f"{storage / LAYERS}: layers list is malformed JSON"):
        PodmanStorage(storage).read_container(CID)


def test_layer_dir_symlinked_outside_the_root_is_refused(storage: Path, tmp_path: Path) -> None:
    shutil.rmtree(storage / "overlay" / BASE_LAYER)
    (tmp_path / "elsewhere/diff").mkdir(parents=True)
    (storage / "overlay" / BASE_LAYER).symlink_to(tmp_path / "elsewhere")
    with pytest.raises(StorageError, match="outside the storage root"):
        PodmanStorage(storage).read_container(CID)


def test_malformed_libpod_settings_are_refused(storage: Path) -> None:
    _write_sqlite(storage, {**LIBPOD_CONFIG, "command": "serve"}, {"state": 1})
    with pytest.raises(StorageError, match="'command' must be a list of strings; the database is corrupt"):
        PodmanStorage(storage).read_container(CID)


def test_unknown_container_is_not_found(storage: Path) -> None:
    with pytest.raises(ContainerNotFound, match="no container " + "f" * 64):
        PodmanStorage(storage).read_container("f" * 64)


def test_root_that_is_not_containers_storage_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="no overlay-containers/ directory; not a containers-storage root"):
        PodmanStorage(tmp_path).list_containers()


def test_command_line_commits_hand_made_storage_with_libpod_settings(storage: Path, tmp_path: Path) -> None:
    _write_sqlite(storage, LIBPOD_CONFIG, {"state": 1})
    archive = tmp_path / "app.tar"
    args = commit_args(storage, tmp_path, "--id", "app", "--storage-engine", "podman", "--output", str(archive))
    result = run_luigi(*args)
    assert result.returncode == 0, result.stderr
    config = read_archive_config(archive)
    assert config["config"]["Cmd"] == ["serve", "--port", "80"] and config["architecture"] == "amd64"
    assert read_archive_manifest(archive)["RepoTags"] == ["app:latest"]


def test_command_line_refuses_malformed_storage_with_one_line(storage: Path, tmp_path: Path) -> None:
    _edit(storage / LAYERS, lambda d: d[1].update(parent="../../../etc"))
    result = run_luigi(*commit_args(storage, tmp_path, "--id", "app", "--storage-engine", "podman"))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    [line] = error_lines(result)
    assert str(storage / LAYERS) in line and "not a 64-hex id" in line
    assert not (tmp_path / "out").exists()

"""The docker reader: dockerd's overlay2 layout rebuilt faithfully (tests.support.docker_storage, after moby's
layer/filestore.go, layer/layer_store.go, daemon/graphdriver/overlay2/overlay.go, container/container.go) and
committed through the command line, and its answers on malformed layer stores and container metadata."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pipeline.engines import open_storage
from pipeline.engines.docker import DockerStorage
from pipeline.errors import ContainerNotFound, StorageError
from tests.support.cli import commit_args, error_lines, run_luigi
from tests.support.docker_storage import DockerStorage as BuiltDockerStorage
from tests.support.docker_storage import build_docker_storage
from tests.support.imagecheck import check_image_archive, read_archive_config, read_archive_manifest

# --- dockerd's layout with real overlay mounts ------------------------------------------------------------------


@pytest.fixture(scope="module")
def docker(tmp_path_factory: pytest.TempPathFactory) -> BuiltDockerStorage:
    return build_docker_storage(tmp_path_factory.mktemp("docker") / "docker")


@pytest.mark.overlay
@pytest.mark.tools
def test_committed_image_equals_the_container_without_its_init_layer(
    docker: BuiltDockerStorage, tmp_path: Path
) -> None:
    archive = tmp_path / "web.tar"
    args = commit_args(docker.root, tmp_path, "--id", "web-1", "--storage-engine", "docker", "--image", "web:snap")
    result = run_luigi(*args, "--output", str(archive))
    assert result.returncode == 0, result.stderr
    check_image_archive(archive, docker.merged, tmp_path / "check", ref="web:snap")
    # The init layer's files were in the running container's view, and docker commit leaves them out too.
    for name in (".dockerenv", "etc/hosts", "dev/pts", "etc/mtab"):
        assert name.encode() in docker.running_view.entries and name.encode() not in docker.merged.entries


@pytest.mark.overlay
def test_config_carries_the_containers_settings_and_the_base_images_platform(
    docker: BuiltDockerStorage, tmp_path: Path
) -> None:
    archive = tmp_path / "web.tar"
    args = commit_args(docker.root, tmp_path, "--id", docker.container_id[:8], "--storage-engine", "docker")
    assert run_luigi(*args, "--output", str(archive)).returncode == 0
    config = read_archive_config(archive)
    container = json.loads((docker.root / "containers" / docker.container_id / "config.v2.json").read_bytes())
    for key in ("Cmd", "Env", "Entrypoint", "WorkingDir", "User", "Labels", "ExposedPorts", "StopSignal"):
        assert config["config"][key] == container["Config"][key], key
    assert config["config"]["ExposedPorts"] == {"8080/tcp": {}, "9090/udp": {}}
    assert (config["architecture"], config["os"]) == ("amd64", "linux")
    assert len(config["rootfs"]["diff_ids"]) == len(read_archive_manifest(archive)["Layers"]) == 3
    assert read_archive_manifest(archive)["RepoTags"] == ["web-1:latest"]


@pytest.mark.overlay
def test_image_layers_are_read_oldest_first_and_the_init_layer_is_left_out(docker: BuiltDockerStorage) -> None:
    container = DockerStorage(docker.root).read_container(docker.container_id)
    assert [layer.layer_id for layer in container.lower_layers] == list(docker.cache_ids)
    assert container.upper_layer.layer_id == docker.mount_id
    layer_dirs = [layer.layer_dir for layer in (*container.lower_layers, container.upper_layer)]
    assert layer_dirs == [docker.root / "overlay2" / i / "diff" for i in (*docker.cache_ids, docker.mount_id)]
    assert not any(layer.layer_id.endswith("-init") for layer in container.lower_layers)
    assert (container.name, container.image, container.running) == ("/web-1", "base:1.0", False)


@pytest.mark.overlay
def test_container_layer_holds_the_kernels_whiteouts_and_opaque_directory(docker: BuiltDockerStorage) -> None:
    # What the end-to-end tests above rely on: the overlay mount left real overlay markers in the diff.
    diff = docker.root / "overlay2" / docker.mount_id / "diff"
    st = os.lstat(diff / "etc/hostname")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    assert os.getxattr(diff / "opt/app", "trusted.overlay.opaque") == b"y"
    assert not (diff / ".dockerenv").exists()  # the init layer's files stay in <mount-id>-init
    assert (docker.root / "overlay2" / f"{docker.mount_id}-init" / "diff" / ".dockerenv").is_file()


@pytest.mark.overlay
def test_base_config_is_the_image_config_in_imagedb(docker: BuiltDockerStorage) -> None:
    storage = DockerStorage(docker.root)
    base = storage.read_base_config(storage.read_container(docker.container_id))
    assert base is not None
    content = docker.root / "image/overlay2/imagedb/content/sha256" / docker.image_id.removeprefix("sha256:")
    assert base == json.loads(content.read_bytes())
    assert len(base["rootfs"]["diff_ids"]) == len(docker.chain_ids)


# --- a hand-made layout: no root needed ---------------------------------------------------------------------------

CID = hashlib.sha256(b"docker container").hexdigest()
MOUNT_ID, BASE_CACHE, MID_CACHE = (hashlib.sha256(n).hexdigest() for n in (b"mount", b"base", b"mid"))
BASE_CHAIN = "sha256:" + hashlib.sha256(b"base diff").hexdigest()
MID_CHAIN = "sha256:" + hashlib.sha256(b"mid chain").hexdigest()
IMAGE_CONFIG = json.dumps({"architecture": "arm64", "os": "linux", "config": {"Cmd": ["sh"]}}).encode()
IMAGE_ID = "sha256:" + hashlib.sha256(IMAGE_CONFIG).hexdigest()


def _write(path: Path, text: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode() if isinstance(text, str) else text)


def _make_storage(root: Path) -> Path:
    """docker's files for one container on a two-layer image, without mounts: enough for every reader decision."""
    for cache_id in (BASE_CACHE, MID_CACHE, MOUNT_ID, f"{MOUNT_ID}-init"):
        (root / "overlay2" / cache_id / "diff").mkdir(parents=True)
    _write(root / "overlay2" / MOUNT_ID / "diff" / "hello.txt", "hi\n")
    _write(root / "overlay2" / f"{MOUNT_ID}-init" / "diff" / ".dockerenv", "")
    layerdb = root / "image/overlay2/layerdb"
    _write(layerdb / "sha256" / BASE_CHAIN.removeprefix("sha256:") / "cache-id", BASE_CACHE)
    _write(layerdb / "sha256" / MID_CHAIN.removeprefix("sha256:") / "cache-id", MID_CACHE)
    _write(layerdb / "sha256" / MID_CHAIN.removeprefix("sha256:") / "parent", BASE_CHAIN)
    _write(layerdb / "mounts" / CID / "mount-id", MOUNT_ID)
    _write(layerdb / "mounts" / CID / "init-id", f"{MOUNT_ID}-init")
    _write(layerdb / "mounts" / CID / "parent", MID_CHAIN + "\n")  # filestore.go trims whitespace
    _write(root / "image/overlay2/imagedb/content/sha256" / IMAGE_ID.removeprefix("sha256:"), IMAGE_CONFIG)
    config = {
        "ID": CID,
        "Name": "/api",
        "Created": "2024-01-02T03:04:05Z",
        "Driver": "overlay2",
        "Image": IMAGE_ID,
        "State": {"Running": False, "Paused": False, "Pid": 0},
        "Config": {"Image": "base:1", "Cmd": ["serve"], "Env": ["A=1"], "Entrypoint": None, "Volumes": {"/data": {}}},
    }
    _write(root / "containers" / CID / "config.v2.json", json.dumps(config))
    return root


@pytest.fixture
def storage(tmp_path: Path) -> Path:
    return _make_storage(tmp_path / "docker")


def _edit_config(storage: Path, edit: Callable[[dict[str, Any]], object]) -> None:
    path = storage / "containers" / CID / "config.v2.json"
    doc = json.loads(path.read_bytes())
    edit(doc)
    path.write_text(json.dumps(doc))


def test_engine_name_docker_opens_the_docker_reader(storage: Path) -> None:
    assert isinstance(open_storage("docker", storage), DockerStorage)


def test_hand_made_layout_reads_layers_settings_and_base_config(storage: Path) -> None:
    reader = DockerStorage(storage)
    assert reader.list_containers() == [CID]
    container = reader.read_container(CID)
    assert [layer.layer_id for layer in container.lower_layers] == [BASE_CACHE, MID_CACHE]
    assert container.upper_layer.layer_id == MOUNT_ID
    # Null Config values mean "not set": the base image's stay.
    assert container.config == {"Cmd": ["serve"], "Env": ["A=1"], "Volumes": {"/data": {}}}
    assert reader.read_base_config(container) == json.loads(IMAGE_CONFIG)


@pytest.mark.parametrize(
    ("state", "running", "pid"),
    [
        ({"Running": True, "Paused": False, "Pid": 4242}, True, 4242),
        ({"Running": True, "Paused": True, "Pid": 4242}, False, 4242),  # paused: already frozen, leave it so
        ({"Running": False, "Paused": False, "Pid": 0}, False, 0),
    ],
)
def test_running_state_and_pid_come_from_config_v2(
    storage: Path, state: dict[str, Any], running: bool, pid: int
) -> None:
    _edit_config(storage, lambda doc: doc.update(State=state))
    container = DockerStorage(storage).read_container(CID)
    assert (container.running, container.pid) == (running, pid)


def test_container_without_mount_id_is_refused(storage: Path) -> None:
    path = storage / "image/overlay2/layerdb/mounts" / CID / "mount-id"
    path.unlink()
    with pytest.raises(StorageError, match=f"{path}: missing; the layer store is incomplete"):
        DockerStorage(storage).read_container(CID)


@pytest.mark.parametrize(
    ("file", "content"),
    [
        (f"mounts/{CID}/mount-id", "../../../etc"),
        (f"mounts/{CID}/parent", "sha256:../../../../etc"),
        (f"mounts/{CID}/parent", BASE_CACHE),  # a bare hex is not a digest
        (f"sha256/{MID_CHAIN.removeprefix('sha256:')}/cache-id", "../" + BASE_CACHE),
        (f"sha256/{MID_CHAIN.removeprefix('sha256:')}/parent", "sha256:" + "A" * 64),
    ],
)
def test_layer_store_ids_that_could_escape_the_root_are_refused(storage: Path, file: str, content: str) -> None:
    path = storage / "image/overlay2/layerdb" / file
    path.write_text(content)
    with pytest.raises(StorageError, match=f"{path}: holds .*, not a valid id; the layer store is corrupt"):
        DockerStorage(storage).read_container(CID)


def test_layer_dir_symlinked_outside_the_root_is_refused(storage: Path, tmp_path: Path) -> None:
    shutil.rmtree(storage / "overlay2" / MID_CACHE)
    (tmp_path / "elsewhere/diff").mkdir(parents=True)
    (storage / "overlay2" / MID_CACHE).symlink_to(tmp_path / "elsewhere")
    with pytest.raises(StorageError, match=f"layer of container {CID} .*resolves to .*outside the storage root"):
        DockerStorage(storage).read_container(CID)


def test_chain_that_loops_is_refused_at_dockers_depth_limit(storage: Path) -> None:
    _write(storage / "image/overlay2/layerdb/sha256" / BASE_CHAIN.removeprefix("sha256:") / "parent", MID_CHAIN)
    with pytest.raises(StorageError, match="go deeper than docker allows .125."):
        DockerStorage(storage).read_container(CID)


def test_chain_naming_a_missing_layer_is_refused(storage: Path) -> None:
    shutil.rmtree(storage / "image/overlay2/layerdb/sha256" / BASE_CHAIN.removeprefix("sha256:"))
    with pytest.raises(StorageError, match=f"layer {BASE_CHAIN} of container {CID} is missing"):
        DockerStorage(storage).read_container(CID)


def test_layer_without_diff_dir_is_refused(storage: Path) -> None:
    shutil.rmtree(storage / "overlay2" / BASE_CACHE / "diff")
    with pytest.raises(StorageError, match=f"layer {BASE_CACHE} of container {CID} .*has no diff/ directory"):
        DockerStorage(storage).read_container(CID)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda doc: doc.update(Driver="overlayfs"), "uses the storage driver 'overlayfs'; only overlay2"),
        (lambda doc: doc["Config"].update(Cmd="serve"), "Config.Cmd must be a JSON list"),
        (lambda doc: doc.update(State=[]), "'State' and 'Config' must be objects"),
    ],
)
def test_malformed_container_metadata_is_refused_naming_the_file(
    storage: Path, edit: Callable[[dict[str, Any]], object], message: str
) -> None:
    _edit_config(storage, edit)
    with pytest.raises(StorageError, match=f"config.v2.json: .*{message}"):
        DockerStorage(storage).read_container(CID)


def test_malformed_config_v2_json_is_refused(storage: Path) -> None:
    path = storage / "containers" / CID / "config.v2.json"
    path.write_text('{"ID": ')
    with pytest.raises(StorageError, match=f"{path}: container {CID} has malformed JSON"):
        DockerStorage(storage).read_container(CID)


def test_image_config_that_does_not_hash_to_its_id_is_refused(storage: Path) -> None:
    content = storage / "image/overlay2/imagedb/content/sha256" / IMAGE_ID.removeprefix("sha256:")
    content.write_bytes(IMAGE_CONFIG + b" ")
    reader = DockerStorage(storage)
    with pytest.raises(StorageError, match=f"{content}: does not hash to its image id"):
        reader.read_base_config(reader.read_container(CID))


def test_unknown_container_is_not_found(storage: Path) -> None:
    with pytest.raises(ContainerNotFound, match="no such container"):
        DockerStorage(storage).read_container("a" * 64)


def test_root_without_containers_dir_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="cannot list containers .*check --storage-root"):
        DockerStorage(tmp_path).list_containers()


def test_command_line_commits_the_hand_made_layout_without_the_init_layer(storage: Path, tmp_path: Path) -> None:
    archive = tmp_path / "api.tar"
    result = run_luigi(
        *commit_args(storage, tmp_path, "--id", "api", "--storage-engine", "docker", "--output", str(archive))
    )
    assert result.returncode == 0, result.stderr
    config = read_archive_config(archive)
    assert config["architecture"] == "arm64" and config["config"]["Cmd"] == ["serve"]
    assert read_archive_manifest(archive)["RepoTags"] == ["api:latest"]
    with tarfile.open(archive) as outer:
        names = []
        for layer in read_archive_manifest(archive)["Layers"]:
            member = outer.extractfile(layer)
            assert member is not None
            with tarfile.open(fileobj=member) as inner:
                names += inner.getnames()
    assert "hello.txt" in names and not any(name.endswith(".dockerenv") for name in names)


@pytest.mark.parametrize(
    ("damage", "needle"),
    [
        (lambda root: (root / "image/overlay2/layerdb/mounts" / CID / "mount-id").unlink(), "mount-id: missing"),
        (
            lambda root: (root / "image/overlay2/layerdb/mounts" / CID / "parent").write_text("sha256:../../x"),
            "not a valid id",
        ),
    ],
)
def test_command_line_refuses_a_broken_layer_store_with_one_line(
    storage: Path, tmp_path: Path, damage: Callable[[Path], object], needle: str
) -> None:
    damage(storage)
    result = run_luigi(*commit_args(storage, tmp_path, "--id", CID[:12], "--storage-engine", "docker"))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    [line] = error_lines(result)
    assert needle in line, line
    assert not (tmp_path / "out").exists()

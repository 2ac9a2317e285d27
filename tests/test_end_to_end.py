"""A real overlay container committed through the command line and checked by skopeo, umoci and podman."""

import json
import tarfile
from pathlib import Path

import pytest

from tests.support.cli import commit_args, run_luigi, tree_fingerprint
from tests.support.imagecheck import check_image_archive, read_archive_manifest
from tests.support.overlay_storage import RockerStorage, build_rocker_storage

pytestmark = pytest.mark.overlay


@pytest.fixture(scope="module")
def storage(tmp_path_factory: pytest.TempPathFactory) -> RockerStorage:
    return build_rocker_storage(tmp_path_factory.mktemp("e2e") / "rocker")


@pytest.mark.tools
def test_committed_image_equals_the_merged_view_in_every_consumer(storage: RockerStorage, tmp_path: Path) -> None:
    before = tree_fingerprint(storage.root)
    archive = tmp_path / "web.tar"
    result = run_luigi(
        *commit_args(
            storage.root, tmp_path, "--id", storage.container_id[:10], "--image", "web:snap", "--output", str(archive)
        )
    )
    assert result.returncode == 0, result.stderr
    check_image_archive(archive, storage.merged, tmp_path / "check", ref="web:snap")
    assert tree_fingerprint(storage.root) == before


def test_config_carries_base_image_settings_and_container_cmd(storage: RockerStorage, tmp_path: Path) -> None:
    archive = tmp_path / "web.tar"
    env = {"SOURCE_DATE_EPOCH": "1700000000"}
    args = commit_args(storage.root, tmp_path, "--id", storage.container_id, "--output", str(archive))
    assert run_luigi(*args, env=env).returncode == 0
    manifest = read_archive_manifest(archive)
    with tarfile.open(archive) as tar:
        config = json.load(tar.extractfile(manifest["Config"]))  # type: ignore[arg-type]
        repositories = json.load(tar.extractfile("repositories"))  # type: ignore[arg-type]
    base = json.loads(next((storage.root / "image/overlay2/imagedb/content/sha256").iterdir()).read_bytes())
    container = json.loads((storage.root / "containers" / storage.container_id / "config.json").read_bytes())
    assert config["created"] == "2023-11-14T22:13:20Z"
    assert config["config"]["Cmd"] == container["Config"]["Cmd"]
    assert config["config"]["Env"] == container["Config"]["Env"]
    for key in ("Entrypoint", "WorkingDir", "User", "ExposedPorts", "Labels"):
        assert config["config"][key] == base["config"][key], key
    assert len(config["rootfs"]["diff_ids"]) == len(storage.layer_ids) == len(manifest["Layers"])
    assert sum(1 for h in config["history"] if not h.get("empty_layer")) == len(storage.layer_ids)
    assert manifest["RepoTags"] == ["web-1:latest"]
    assert list(repositories) == ["web-1"] and list(repositories["web-1"]) == ["latest"]

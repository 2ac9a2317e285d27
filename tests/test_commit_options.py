"""docker commit's options through the command line: --author, --message, --change, --config, --squash, --iidfile."""

import json
import tarfile
from pathlib import Path

import pytest

from tests.support.cli import commit_args, error_lines, run_luigi
from tests.support.imagecheck import check_image_archive, read_archive_manifest
from tests.support.overlay_storage import RockerStorage, build_rocker_storage

pytestmark = pytest.mark.overlay


@pytest.fixture(scope="module")
def storage(tmp_path_factory: pytest.TempPathFactory) -> RockerStorage:
    return build_rocker_storage(tmp_path_factory.mktemp("options") / "rocker")


def _config(archive: Path) -> dict[str, object]:
    with tarfile.open(archive) as tar:
        member = tar.extractfile(read_archive_manifest(archive)["Config"])
        assert member is not None
        doc: dict[str, object] = json.load(member)
        return doc


def test_metadata_options_shape_the_config_and_iidfile_names_it(storage: RockerStorage, tmp_path: Path) -> None:
    extra = tmp_path / "extra.json"
    extra.write_text(json.dumps({"Env": ["FROM_FILE=yes"], "Labels": {"team": "infra"}}))
    archive = tmp_path / "img.tar"
    args = commit_args(storage.root, tmp_path, "--id", storage.container_id, "--output", str(archive))
    args += ["--author", "Ann <ann@example.com>", "--message", "before the upgrade", "--config", str(extra)]
    args += ["--change", "ENV MODE=prod", "--change", "EXPOSE 9090/udp", "--change", 'CMD ["/bin/serve"]']
    args += ["--iidfile", str(tmp_path / "iid")]
    result = run_luigi(*args)
    assert result.returncode == 0, result.stderr
    config = _config(archive)
    inner = config["config"]
    assert isinstance(inner, dict)
    assert config["author"] == "Ann <ann@example.com>"
    assert inner["Cmd"] == ["/bin/serve"]
    assert "MODE=prod" in inner["Env"] and "FROM_FILE=yes" in inner["Env"] and "APP_MODE=test" in inner["Env"]
    assert inner["Labels"]["team"] == "infra" and "org.opencontainers.image.title" in inner["Labels"]
    assert set(inner["ExposedPorts"]) == {"8080/tcp", "9090/udp"}
    history = config["history"]
    assert isinstance(history, list)
    assert history[-1]["comment"] == "before the upgrade" and history[-1]["author"] == "Ann <ann@example.com>"
    manifest = read_archive_manifest(archive)
    assert (tmp_path / "iid").read_text() == "sha256:" + manifest["Config"].rsplit("/", 1)[1]


def test_invalid_change_is_refused_before_anything_is_written(storage: RockerStorage, tmp_path: Path) -> None:
    args = commit_args(storage.root, tmp_path, "--id", storage.container_id, "--change", "RUN make")
    result = run_luigi(*args)
    assert result.returncode != 0
    [line] = error_lines(result)
    assert "RUN is not allowed" in line
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


@pytest.mark.tools
def test_squash_gives_one_layer_equal_to_the_merged_view(storage: RockerStorage, tmp_path: Path) -> None:
    archive = tmp_path / "squashed.tar"
    args = commit_args(storage.root, tmp_path, "--id", storage.container_id, "--image", "web:squashed")
    result = run_luigi(*args, "--output", str(archive), "--squash")
    assert result.returncode == 0, result.stderr
    assert len(read_archive_manifest(archive)["Layers"]) == 1
    config = _config(archive)
    assert len(config["history"]) == 1  # type: ignore[arg-type]
    check_image_archive(archive, storage.merged, tmp_path / "check", ref="web:squashed")
    with open("/proc/self/mountinfo") as f:
        assert "pipeline-squash-" not in f.read(), "the squash mount outlived the commit"

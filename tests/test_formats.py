"""Every output format, checked by real consumers against the container's merged view."""

import json
import os
import tarfile
from pathlib import Path

import pytest

from tests.support.cli import commit_args, error_lines, run_luigi
from tests.support.imagecheck import check_image_archive, check_oci_image
from tests.support.overlay_storage import RockerStorage, build_rocker_storage

pytestmark = pytest.mark.overlay


@pytest.fixture(scope="module")
def storage(tmp_path_factory: pytest.TempPathFactory) -> RockerStorage:
    return build_rocker_storage(tmp_path_factory.mktemp("formats") / "rocker")


def _commit(storage: RockerStorage, work: Path, fmt: str, output: Path) -> None:
    args = commit_args(storage.root, work, "--id", storage.container_id, "--image", "web:fmt", "--output", str(output))
    result = run_luigi(*args, "--format", fmt)
    assert result.returncode == 0, result.stderr


@pytest.mark.tools
def test_default_archive_is_both_a_docker_archive_and_an_oci_archive(storage: RockerStorage, tmp_path: Path) -> None:
    archive = tmp_path / "both.tar"
    _commit(storage, tmp_path, "both", archive)
    check_image_archive(archive, storage.merged, tmp_path / "as-docker", ref="web:fmt")
    check_oci_image(archive, storage.merged, tmp_path / "as-oci", tag="fmt", ref="docker.io/library/web:fmt")


@pytest.mark.tools
def test_oci_archive_alone_loads_everywhere(storage: RockerStorage, tmp_path: Path) -> None:
    archive = tmp_path / "oci.tar"
    _commit(storage, tmp_path, "oci", archive)
    check_oci_image(archive, storage.merged, tmp_path / "check", tag="fmt", ref="docker.io/library/web:fmt")


@pytest.mark.tools
def test_oci_dir_hardlinks_cached_layers_instead_of_copying(storage: RockerStorage, tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    _commit(storage, tmp_path, "oci-dir", layout)
    cache_blobs = {p.name: p.stat().st_ino for p in (tmp_path / "cache" / "blobs" / "sha256").iterdir()}
    layer_blobs = [p for p in (layout / "blobs" / "sha256").iterdir() if p.name in cache_blobs]
    assert len(layer_blobs) == len(storage.layer_ids)
    assert all(p.stat().st_ino == cache_blobs[p.name] for p in layer_blobs)
    check_oci_image(layout, storage.merged, tmp_path / "check", tag="fmt", ref="docker.io/library/web:fmt")
    assert not [p for p in tmp_path.rglob("*") if ".partial-" in p.name]
    assert os.path.isfile(layout / "oci-layout") and os.path.isfile(layout / "index.json")


@pytest.mark.tools
def test_gzip_layers_load_as_docker_and_oci_archive(storage: RockerStorage, tmp_path: Path) -> None:
    archive = tmp_path / "gzip.tar"
    args = commit_args(storage.root, tmp_path, "--id", storage.container_id, "--image", "web:fmt")
    result = run_luigi(*args, "--output", str(archive), "--compression", "gzip")
    assert result.returncode == 0, result.stderr
    with tarfile.open(archive) as tar:
        index = json.load(tar.extractfile("index.json"))  # type: ignore[arg-type]
        manifest = json.load(tar.extractfile("blobs/sha256/" + index["manifests"][0]["digest"][7:]))  # type: ignore[arg-type]
        first_layer = tar.extractfile("blobs/sha256/" + manifest["layers"][0]["digest"][7:])
        assert first_layer is not None and first_layer.read(2) == b"\x1f\x8b"
    assert {layer["mediaType"] for layer in manifest["layers"]} == {"application/vnd.oci.image.layer.v1.tar+gzip"}
    check_image_archive(archive, storage.merged, tmp_path / "as-docker", ref="web:fmt")
    check_oci_image(archive, storage.merged, tmp_path / "as-oci", tag="fmt", ref="docker.io/library/web:fmt")


@pytest.mark.tools
def test_zstd_layers_in_an_oci_archive_load_everywhere(storage: RockerStorage, tmp_path: Path) -> None:
    archive = tmp_path / "zstd.tar"
    args = commit_args(storage.root, tmp_path, "--id", storage.container_id, "--image", "web:fmt")
    result = run_luigi(*args, "--output", str(archive), "--format", "oci", "--compression", "zstd")
    assert result.returncode == 0, result.stderr
    check_oci_image(archive, storage.merged, tmp_path / "check", tag="fmt", ref="docker.io/library/web:fmt")


def test_zstd_is_refused_for_a_docker_archive_before_anything_is_packed(storage: RockerStorage, tmp_path: Path) -> None:
    result = run_luigi(*commit_args(storage.root, tmp_path, "--id", storage.container_id, "--compression", "zstd"))
    assert result.returncode != 0
    [line] = error_lines(result)
    assert "--compression zstd" in line and "--format oci" in line
    assert not (tmp_path / "cache").exists()


def test_compressed_archives_are_byte_identical_across_fresh_runs(storage: RockerStorage, tmp_path: Path) -> None:
    outputs = []
    for run in ("a", "b"):
        work = tmp_path / run
        args = commit_args(storage.root, work, "--id", storage.container_id, "--output", str(work / "img.tar"))
        result = run_luigi(*args, "--compression", "gzip", env={"SOURCE_DATE_EPOCH": "1700000000"})
        assert result.returncode == 0, result.stderr
        outputs.append((work / "img.tar").read_bytes())
    assert outputs[0] == outputs[1]

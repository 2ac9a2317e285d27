"""A commit is of the container as it is now: every target is named by what it was made from, so a changed
container, a rebuilt storage or a damaged cache never hands back an older image (issue 10's nine problems)."""

import json
import os
import shutil
import subprocess
import sys
import tarfile
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from pipeline.demo import build_sample_storage
from pipeline.snapshots.catalog import read_records
from tests.support.cachefiles import lose_blob
from tests.support.cli import REPO, commit_args, run_luigi
from tests.support.imagecheck import read_archive_config, read_archive_manifest, unpack_layers_with_python
from tests.support.registry_server import serve_registry

pytestmark = pytest.mark.root


def _file_in_image(archive: Path, work: Path, name: str) -> bytes | None:
    rootfs = work / f"rootfs-{len(list(work.glob('rootfs-*')))}"
    unpack_layers_with_python(archive, rootfs)
    path = rootfs / name
    return path.read_bytes() if path.exists() else None


def _committed(sample_storage: tuple[Path, str], tmp_path: Path) -> tuple[Path, str, Path, list[str]]:
    """The sample container committed once to tmp_path/img.tar: its root, id, archive and the command's flags."""
    root, cid = sample_storage
    archive = tmp_path / "img.tar"
    args = commit_args(root, tmp_path, "--id", cid, "--output", str(archive))
    assert run_luigi(*args).returncode == 0
    return root, cid, archive, args


def _upper(root: Path, cid: str) -> Path:
    return root / "overlay2" / cid / "diff"


def test_changed_container_with_its_archive_deleted_is_committed_again(
    sample_storage: tuple[Path, str], tmp_path: Path
) -> None:
    root, cid, archive, args = _committed(sample_storage, tmp_path)
    first = read_archive_config(archive)
    (_upper(root, cid) / "etc").mkdir(exist_ok=True)
    (_upper(root, cid) / "etc" / "changed.conf").write_bytes(b"written after the first commit\n")
    archive.unlink()
    second = run_luigi(*args)
    assert second.returncode == 0, second.stderr
    assert _file_in_image(archive, tmp_path, "etc/changed.conf") == b"written after the first commit\n"
    assert read_archive_config(archive)["rootfs"]["diff_ids"][-1] != first["rootfs"]["diff_ids"][-1]


def test_changed_container_replaces_an_existing_archive_and_says_which_image(
    sample_storage: tuple[Path, str], tmp_path: Path
) -> None:
    root, cid, archive, args = _committed(sample_storage, tmp_path)
    old_id = read_archive_manifest(archive)["Config"].rpartition("/")[2]
    (_upper(root, cid) / "new.txt").write_bytes(b"new\n")
    second = run_luigi(*args)
    assert second.returncode == 0, second.stderr
    assert _file_in_image(archive, tmp_path, "new.txt") == b"new\n"
    assert f"replaced image sha256:{old_id}" in second.stderr


def test_changed_container_with_archive_and_layer_blob_deleted_gives_a_whole_archive(
    sample_storage: tuple[Path, str], tmp_path: Path
) -> None:
    root, cid, archive, args = _committed(sample_storage, tmp_path)
    old_top = read_archive_config(archive)["rootfs"]["diff_ids"][-1]
    (_upper(root, cid) / "new.txt").write_bytes(b"new\n")
    archive.unlink()
    lose_blob(tmp_path / "cache", old_top)
    second = run_luigi(*args)
    assert second.returncode == 0, second.stderr
    manifest = read_archive_manifest(archive)
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
    assert set(manifest["Layers"]) <= names, "the archive names a layer it does not hold"
    layers = [f"sha256:{n.rpartition('/')[2]}" for n in manifest["Layers"]]
    assert layers == read_archive_config(archive)["rootfs"]["diff_ids"]
    assert _file_in_image(archive, tmp_path, "new.txt") == b"new\n"


def test_unchanged_container_with_its_layer_blob_deleted_is_packed_again_and_the_archive_kept(
    sample_storage: tuple[Path, str], tmp_path: Path
) -> None:
    root, cid, archive, args = _committed(sample_storage, tmp_path)
    top = read_archive_config(archive)["rootfs"]["diff_ids"][-1]
    before = archive.read_bytes()
    lose_blob(tmp_path / "cache", top)
    archive.unlink()
    second = run_luigi(*args)
    assert second.returncode == 0, second.stderr
    assert "running   PackContainerLayer" in second.stderr
    assert "running   WriteImageConfig" not in second.stderr  # same content, same diff_id: same image
    assert archive.read_bytes() == before


def test_iidfile_that_exists_is_rewritten_with_the_new_image_id(
    sample_storage: tuple[Path, str], tmp_path: Path
) -> None:
    root, cid = sample_storage
    archive, iidfile = tmp_path / "img.tar", tmp_path / "iid"
    iidfile.write_text("sha256:" + "0" * 64)
    args = commit_args(root, tmp_path, "--id", cid, "--output", str(archive), "--iidfile", str(iidfile))
    assert run_luigi(*args).returncode == 0
    assert iidfile.read_text() == "sha256:" + read_archive_manifest(archive)["Config"].rpartition("/")[2]
    (_upper(root, cid) / "new.txt").write_bytes(b"new\n")
    assert run_luigi(*args).returncode == 0
    assert iidfile.read_text() == "sha256:" + read_archive_manifest(archive)["Config"].rpartition("/")[2]
    before = iidfile.stat().st_mtime_ns
    third = run_luigi(*args)
    assert third.returncode == 0 and " ran successfully" not in third.stderr
    assert iidfile.stat().st_mtime_ns == before


def test_a_name_wins_over_an_id_prefix_as_in_docker(sample_storage: tuple[Path, str], tmp_path: Path) -> None:
    root, cid = sample_storage
    other = "c2" + "7" * 62
    for part in ("containers", "overlay2"):
        subprocess.run(["cp", "-a", str(root / part / cid), str(root / part / other)], check=True)
    for container, name in ((cid, "c2"), (other, "other")):
        path = root / "containers" / container / "config.json"
        path.write_text(json.dumps(json.loads(path.read_text()) | {"ID": container, "Name": name}))
    archive = tmp_path / "img.tar"
    result = run_luigi(*commit_args(root, tmp_path, "--id", "c2", "--output", str(archive)))
    assert result.returncode == 0, result.stderr
    assert read_archive_config(archive)["container"] == cid  # the container named c2, not the one whose id starts c2
    archive.unlink()
    assert run_luigi(*commit_args(root, tmp_path, "--id", "c27", "--output", str(archive))).returncode == 0
    assert read_archive_config(archive)["container"] == other  # a unique prefix still works


def test_image_layer_rebuilt_in_place_is_packed_again(sample_storage: tuple[Path, str], tmp_path: Path) -> None:
    root, cid, archive, args = _committed(sample_storage, tmp_path)
    assert _file_in_image(archive, tmp_path, "etc/os-release") == b"NAME=demo\nVERSION=1\n"
    # The storage rebuilt at the same path (an image removed and re-created, a backup restored), its base layer
    # holding other content under the same layer id.
    shutil.rmtree(root)
    build_sample_storage(root)
    base_file = next((root / "overlay2").glob("*/diff/etc/os-release"))
    base_file.write_bytes(b"NAME=demo\nVERSION=2\n")
    second = run_luigi(*args)
    assert second.returncode == 0, second.stderr
    assert "running   PackImageLayer" in second.stderr
    assert _file_in_image(archive, tmp_path, "etc/os-release") == b"NAME=demo\nVERSION=2\n"


@pytest.mark.tools("docker-registry")
def test_push_after_the_container_changed_pushes_its_present_state(
    sample_storage: tuple[Path, str], tmp_path: Path
) -> None:
    root, cid = sample_storage
    with serve_registry(tmp_path / "registry") as server:
        reference = f"{server.host}/web:1"
        args = ["PushImage", "--id", cid, "--image", reference, "--storage-root", str(root)]
        args += ["--commit-cache-dir", str(tmp_path / "cache"), "--commit-output-dir", str(tmp_path / "out")]
        args += ["--registry-insecure", "true"]
        env = {"DOCKER_CONFIG": str(tmp_path / "no-docker-config")}
        assert run_luigi(*args, env=env).returncode == 0
        first = _registry_config(server.host, "web", "1")
        (_upper(root, cid) / "new.txt").write_bytes(b"new\n")
        second = run_luigi(*args, env=env)
        assert second.returncode == 0, second.stderr
        assert "running   PushImage" in second.stderr
        pushed = _registry_config(server.host, "web", "1")
        assert pushed["rootfs"]["diff_ids"][:-1] == first["rootfs"]["diff_ids"][:-1]
        assert pushed["rootfs"]["diff_ids"][-1] != first["rootfs"]["diff_ids"][-1]
        third = run_luigi(*args, env=env)
        assert third.returncode == 0 and "running   PushImage" not in third.stderr


def _registry_config(host: str, repository: str, tag: str) -> dict[str, Any]:
    """The image config the tag points at, read with the distribution API."""
    accept = {"Accept": "application/vnd.oci.image.manifest.v1+json"}
    request = urllib.request.Request(f"http://{host}/v2/{repository}/manifests/{tag}", headers=accept)
    with urllib.request.urlopen(request, timeout=30) as response:
        manifest = json.load(response)
    url = f"http://{host}/v2/{repository}/blobs/{manifest['config']['digest']}"
    with urllib.request.urlopen(url, timeout=30) as response:
        config: dict[str, Any] = json.load(response)
    return config


# --- snapshots --------------------------------------------------------------------------------------------------


def _snapshot(root: Path, work: Path, stamp: str, *extra: str, env: dict[str, str] | None = None) -> Any:
    args = ["SnapshotAll", "--snapshot", stamp, "--storage-root", str(root), "--format", "both"]
    args += ["--commit-output-dir", str(work / "out"), "--commit-cache-dir", str(work / "cache"), *extra]
    return run_luigi(*args, env=env)


def _orphan_archives(work: Path) -> set[Path]:
    on_disk = set((work / "out" / "snapshots").glob("*/*.tar"))
    return on_disk - {Path(r.archive) for r in read_records(work / "out")}


def test_snapshot_resumed_after_a_kill_keeps_its_own_archive(sample_storage: tuple[Path, str], tmp_path: Path) -> None:
    root, _ = sample_storage
    killed = _snapshot(root, tmp_path, "2026-11-28T0500", env={"PIPELINE_FAILPOINTS": "snapshot:record@1"})
    assert killed.returncode == -9, killed.stderr
    # Meanwhile an earlier period's run snapshots the same, unchanged container.
    assert _snapshot(root, tmp_path, "2026-11-28T0400").returncode == 0
    resumed = _snapshot(root, tmp_path, "2026-11-28T0500")
    assert resumed.returncode == 0, resumed.stderr
    records = {r.stamp: r for r in read_records(tmp_path / "out")}
    assert records["2026-11-28T0500"].status == "new"
    assert records["2026-11-28T0500"].archive.endswith("2026-11-28T0500.tar")
    assert _orphan_archives(tmp_path) == set()


def test_overlapping_snapshot_runs_each_record_their_own_snapshot(
    sample_storage: tuple[Path, str], tmp_path: Path
) -> None:
    root, _ = sample_storage
    command = [sys.executable, "-m", "luigi", "--module", "pipeline", "SnapshotAll", "--storage-root", str(root)]
    command += ["--format", "both"]
    command += ["--commit-output-dir", str(tmp_path / "out"), "--commit-cache-dir", str(tmp_path / "cache")]
    command += ["--keep", "1", "--local-scheduler"]
    runs = [
        subprocess.Popen([*command, "--snapshot", stamp], cwd=REPO, stderr=subprocess.PIPE, text=True)
        for stamp in ("2026-11-28T0400", "2026-11-28T0500")
    ]
    outcomes = [(run, run.communicate(timeout=300)[1]) for run in runs]
    for run, stderr in outcomes:
        assert run.returncode == 0, stderr
    records = read_records(tmp_path / "out")
    assert [r.stamp for r in records] == ["2026-11-28T0500"]  # --keep 1
    for record in records:
        target = Path(record.archive)
        assert target.exists() and (record.status == "reused" or target.stem == record.stamp)
    assert _orphan_archives(tmp_path) == set()


def test_snapshots_of_two_storages_in_one_period_are_two_runs(sample_storage: tuple[Path, str], tmp_path: Path) -> None:
    root, cid = sample_storage
    second_root = tmp_path / "second"
    subprocess.run(["cp", "-a", str(root), str(second_root)], check=True)
    other = "9" * 64
    for part in ("containers", "overlay2"):
        os.rename(second_root / part / cid, second_root / part / other)
    path = second_root / "containers" / other / "config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"ID": other, "Name": "elsewhere"}))
    assert _snapshot(root, tmp_path, "2026-11-28T0400").returncode == 0
    second = _snapshot(second_root, tmp_path, "2026-11-28T0400")
    assert second.returncode == 0, second.stderr
    assert sorted(r.container_id for r in read_records(tmp_path / "out")) == sorted([cid, other])
    assert len(list((tmp_path / "out" / "catalog" / "runs").glob("*.json"))) == 2


def test_lost_layer_records_are_packed_again_without_changing_the_image(
    sample_storage: tuple[Path, str], tmp_path: Path
) -> None:
    root, cid = sample_storage
    archive, iidfile = tmp_path / "img.tar", tmp_path / "iid"
    args = commit_args(root, tmp_path, "--id", cid, "--output", str(archive), "--iidfile", str(iidfile))
    assert run_luigi(*args).returncode == 0
    image_id = iidfile.read_text()
    for record in (tmp_path / "cache" / "layers").glob("*.json"):
        record.unlink()
    iidfile.unlink()  # an output that must agree with the archive after the re-run
    second = run_luigi(*args)
    assert second.returncode == 0, second.stderr
    assert "running   PackContainerLayer" in second.stderr
    # Same state, same diff_ids: the config written for it (and so the image id) stays.
    assert iidfile.read_text() == image_id == "sha256:" + read_archive_manifest(archive)["Config"].rpartition("/")[2]
    for record in (tmp_path / "cache" / "layers").glob("*.json"):
        record.unlink()
    archive.unlink()
    third = run_luigi(*args)
    assert third.returncode == 0, third.stderr
    assert iidfile.read_text() == image_id == "sha256:" + read_archive_manifest(archive)["Config"].rpartition("/")[2]

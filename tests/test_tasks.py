"""CommitImage through the real command line: results, idempotency, reuse and bad input."""

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.support.cli import REPO, commit_args, error_lines, run_luigi, tree_fingerprint


def _members(archive: Path) -> list[str]:
    with tarfile.open(archive) as tar:
        return tar.getnames()


def test_commit_by_prefix_writes_archive_named_after_the_container(
    sample_storage: tuple[Path, str], tmp_path: Path
) -> None:
    root, cid = sample_storage
    result = run_luigi(*commit_args(root, tmp_path, "--id", cid[:6]))
    assert result.returncode == 0, result.stderr
    archive = tmp_path / "out" / "demo-web_latest.tar"
    names = _members(archive)
    assert names[-2:] == ["manifest.json", "repositories"]
    with tarfile.open(archive) as tar:
        manifest = json.load(tar.extractfile("manifest.json"))  # type: ignore[arg-type]
        config = json.load(tar.extractfile(manifest[0]["Config"]))  # type: ignore[arg-type]
    assert manifest[0]["RepoTags"] == ["demo-web:latest"]
    assert len(manifest[0]["Layers"]) == len(config["rootfs"]["diff_ids"]) == 2
    assert config["config"]["Cmd"] == ["/bin/hello"] and config["config"]["Labels"] == {"demo": "yes"}


def test_rerun_with_same_parameters_runs_nothing_and_rewrites_nothing(
    sample_storage: tuple[Path, str], tmp_path: Path
) -> None:
    root, cid = sample_storage
    args = commit_args(root, tmp_path, "--id", cid, "--image", "again:1")
    assert run_luigi(*args).returncode == 0
    archive = tmp_path / "out" / "again_1.tar"
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file() and "storage" not in p.parts}
    second = run_luigi(*args)
    assert second.returncode == 0
    assert " ran successfully" not in second.stderr and "complete ones were encountered" in second.stderr
    after = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file() and "storage" not in p.parts}
    assert after == before and archive in after


def test_layers_are_packed_once_per_content_and_reused_by_a_later_commit(
    sample_storage: tuple[Path, str], tmp_path: Path
) -> None:
    root, cid = sample_storage
    first = run_luigi(*commit_args(root, tmp_path, "--id", cid, "--image", "one"))
    second = run_luigi(*commit_args(root, tmp_path, "--id", cid, "--image", "two"))
    assert first.returncode == second.returncode == 0
    assert "running   PackImageLayer" in first.stderr
    # The container did not change between the two commits: its layer in that state is packed once too.
    assert "running   PackImageLayer" not in second.stderr
    assert "running   PackContainerLayer" not in second.stderr
    assert _members(tmp_path / "out" / "one_latest.tar")[:4] == _members(tmp_path / "out" / "two_latest.tar")[:4]


def test_source_date_epoch_makes_fresh_runs_byte_identical(sample_storage: tuple[Path, str], tmp_path: Path) -> None:
    root, cid = sample_storage
    env = {"SOURCE_DATE_EPOCH": "1700000000"}
    outputs = []
    for run in ("a", "b"):
        work = tmp_path / run
        result = run_luigi(*commit_args(root, work, "--id", cid, "--output", str(work / "img.tar")), env=env)
        assert result.returncode == 0, result.stderr
        outputs.append((work / "img.tar").read_bytes())
    assert outputs[0] == outputs[1]


def test_deleted_intermediate_target_is_rebuilt_alone(sample_storage: tuple[Path, str], tmp_path: Path) -> None:
    root, cid = sample_storage
    args = commit_args(root, tmp_path, "--id", cid, "--output", str(tmp_path / "img.tar"))
    assert run_luigi(*args).returncode == 0
    (tmp_path / "img.tar").unlink()
    result = run_luigi(*args)
    assert result.returncode == 0
    assert "running   WriteImageArchive" in result.stderr
    assert "running   Pack" not in result.stderr and "running   WriteImageConfig" not in result.stderr
    assert (tmp_path / "img.tar").exists()


def _assert_refused(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode != 0, result.stderr
    lines = error_lines(result)
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize("bad_id", ["../../etc", "/etc/passwd", "a/b", "..", "", "a\x01b"])
def test_id_that_is_not_a_container_id_is_refused(
    sample_storage: tuple[Path, str], tmp_path: Path, bad_id: str
) -> None:
    root, _ = sample_storage
    before = tree_fingerprint(root)
    result = run_luigi(*commit_args(root, tmp_path, "--id", bad_id))
    _assert_refused(result, "id")
    assert not (tmp_path / "out").exists()
    assert tree_fingerprint(root) == before


def test_unknown_id_lists_the_known_containers(sample_storage: tuple[Path, str], tmp_path: Path) -> None:
    root, cid = sample_storage
    _assert_refused(run_luigi(*commit_args(root, tmp_path, "--id", "ffff")), "no container matches 'ffff'", cid[:12])


def test_ambiguous_prefix_lists_the_candidates(sample_storage: tuple[Path, str], tmp_path: Path) -> None:
    root, cid = sample_storage
    twin = cid[:4] + "0" * 60
    for part in ("containers", "overlay2"):
        subprocess.run(["cp", "-a", str(root / part / cid), str(root / part / twin)], check=True)
    result = run_luigi(*commit_args(root, tmp_path, "--id", cid[:4]))
    _assert_refused(result, "ambiguous", cid[:16], twin[:16])


def test_invalid_image_reference_is_refused(sample_storage: tuple[Path, str], tmp_path: Path) -> None:
    root, cid = sample_storage
    _assert_refused(run_luigi(*commit_args(root, tmp_path, "--id", cid, "--image", "Bad:Ref")), "Bad:Ref")
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_missing_diff_dir_is_refused_naming_the_layer(sample_storage: tuple[Path, str], tmp_path: Path) -> None:
    root, cid = sample_storage
    shutil.rmtree(root / "overlay2" / cid / "diff")
    _assert_refused(run_luigi(*commit_args(root, tmp_path, "--id", cid)), f"{cid}/diff", "no diff/ directory")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("lower", ["../../etc", "abc", "x/diff:../../../etc/diff", "/abs/diff"])
def test_malformed_or_escaping_lower_file_is_refused(
    sample_storage: tuple[Path, str], tmp_path: Path, lower: str
) -> None:
    root, cid = sample_storage
    (root / "overlay2" / cid / "lower").write_text(lower)
    before = tree_fingerprint(root)
    _assert_refused(run_luigi(*commit_args(root, tmp_path, "--id", cid)), "lower")
    assert tree_fingerprint(root) == before
    assert not (tmp_path / "out").exists()


def test_diff_symlinked_out_of_the_storage_root_is_refused(sample_storage: tuple[Path, str], tmp_path: Path) -> None:
    root, cid = sample_storage
    diff = root / "overlay2" / cid / "diff"
    shutil.rmtree(diff)
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", diff)
    _assert_refused(run_luigi(*commit_args(root, tmp_path, "--id", cid)), "outside the storage root")


def test_malformed_container_config_is_refused(sample_storage: tuple[Path, str], tmp_path: Path) -> None:
    root, cid = sample_storage
    (root / "containers" / cid / "config.json").write_text('{"ID": "x", "Config": ')
    _assert_refused(run_luigi(*commit_args(root, tmp_path, "--id", cid)), "config.json", "malformed JSON")


def test_unwritable_output_location_is_refused_before_packing(sample_storage: tuple[Path, str], tmp_path: Path) -> None:
    root, cid = sample_storage
    (tmp_path / "file").write_text("not a directory")
    result = run_luigi(*commit_args(root, tmp_path, "--id", cid, "--output", str(tmp_path / "file" / "img.tar")))
    _assert_refused(result, str(tmp_path / "file"))
    assert not (tmp_path / "cache").exists()


def test_failed_commit_leaves_no_partial_files(sample_storage: tuple[Path, str], tmp_path: Path) -> None:
    root, cid = sample_storage
    (root / "overlay2" / cid / "diff" / ".wh.sneaky").write_text("looks like a whiteout")
    before = tree_fingerprint(root)
    result = run_luigi(*commit_args(root, tmp_path, "--id", cid))
    _assert_refused(result, ".wh.sneaky")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.rglob("*") if ".partial-" in p.name] == []
    assert tree_fingerprint(root) == before


def test_demo_builds_storage_and_commits_a_loadable_archive(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "demo", str(tmp_path / "demo")], capture_output=True, text=True, cwd=REPO
    )
    assert result.returncode == 0, result.stderr
    archive = tmp_path / "demo" / "images" / "demo-web_latest.tar"
    assert f"image archive: {archive}" in result.stdout and "podman load -i" in result.stdout
    assert _members(archive)[-2:] == ["manifest.json", "repositories"]
    if shutil.which("skopeo"):
        inspect = subprocess.run(["skopeo", "inspect", f"docker-archive:{archive}"], capture_output=True, text=True)
        assert inspect.returncode == 0, inspect.stderr
        assert len(json.loads(inspect.stdout)["Layers"]) == 2


def test_rocker_bind_mounts_listed_as_volumes_are_not_image_volumes(
    sample_storage: tuple[Path, str], tmp_path: Path
) -> None:
    root, cid = sample_storage
    path = root / "containers" / cid / "config.json"
    doc = json.loads(path.read_text())
    doc["Config"]["Volumes"] = ["/srv/data:/data", "/var/log/app:/logs"]  # rocker's -v HOST:CONTAINER list
    path.write_text(json.dumps(doc))
    archive = tmp_path / "img.tar"
    result = run_luigi(*commit_args(root, tmp_path, "--id", cid, "--output", str(archive)))
    assert result.returncode == 0, result.stderr
    with tarfile.open(archive) as tar:
        manifest = json.load(tar.extractfile("manifest.json"))  # type: ignore[arg-type]
        config = json.load(tar.extractfile(manifest[0]["Config"]))  # type: ignore[arg-type]
    assert not config["config"].get("Volumes")


def test_author_that_is_not_utf8_is_one_error_line_before_packing(
    sample_storage: tuple[Path, str], tmp_path: Path
) -> None:
    root, cid = sample_storage
    command = [sys.executable, "-m", "luigi", "--module", "pipeline"]
    command += [os.fsdecode(a) for a in commit_args(root, tmp_path, "--id", cid)]
    command += ["--author", os.fsdecode(b"bad \xff author"), "--local-scheduler"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, errors="replace", check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("ERROR: ")] == [
        "ERROR: --author 'bad \\\\xff author': not valid UTF-8, which an image config must be; give it as UTF-8 text"
    ]
    assert not (tmp_path / "cache" / "blobs").exists()

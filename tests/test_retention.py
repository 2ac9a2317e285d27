import hashlib
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from pipeline.demo import build_sample_storage
from pipeline.snapshots.catalog import SnapshotRecord, pruned_path, read_records, record_path
from pipeline.snapshots.retention import apply_retention, plan_retention
from tests.support.cli import REPO, commit_args, resume, run_luigi
from tests.support.imagecheck import read_archive_manifest

Completed = subprocess.CompletedProcess[str]


def _record(output_dir: Path, stamp: str, diff_id: str) -> None:
    archive = output_dir / f"{stamp}.tar"
    archive.write_bytes(b"archive")
    record = SnapshotRecord("c" * 64, "web", stamp, f"web:{stamp}", str(archive), "sha256:" + "0" * 64,
                            (diff_id,), (1,), 7, "fp", 0.1, "new")  # fmt: skip
    path = record_path(output_dir, record.container_id, stamp)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(record.to_json())


def test_compressed_forms_of_kept_layers_stay_and_the_others_go_with_their_mappings(tmp_path: Path) -> None:
    out, cache = tmp_path / "out", tmp_path / "cache"
    out.mkdir()
    blobs = cache / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    kept, old, kept_gz, old_gz = ("1" * 64, "2" * 64, "3" * 64, "4" * 64)
    for name in (kept, old, kept_gz, old_gz):
        (blobs / name).write_bytes(b"blob")
        past = time.time() - 7200
        os.utime(blobs / name, (past, past))
    (cache / "compressed").mkdir()
    for diff_id, digest in ((kept, kept_gz), (old, old_gz)):
        mapping = {"diff_id": f"sha256:{diff_id}", "digest": f"sha256:{digest}"}
        (cache / "compressed" / f"{diff_id}-gzip-1.json").write_text(json.dumps(mapping))
    _record(out, "2026-11-28T0400", f"sha256:{old}")
    _record(out, "2026-11-28T0500", f"sha256:{kept}")

    plan = plan_retention(out, cache, keep=1, grace_seconds=60)

    doomed = {p.name for p in plan.paths}
    assert {old, old_gz, f"{old}-gzip-1.json", "2026-11-28T0400.tar"} <= doomed
    assert not {kept, kept_gz, f"{kept}-gzip-1.json", "2026-11-28T0500.tar"} & doomed


def _old(path: Path) -> None:
    past = time.time() - 7200
    os.utime(path, (past, past))


def test_cache_entries_whose_blobs_are_gone_are_collected_with_the_blobs(tmp_path: Path) -> None:
    out, cache = tmp_path / "out", tmp_path / "cache"
    out.mkdir()
    blobs = cache / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    kept, gone, unneeded = "1" * 64, "2" * 64, "3" * 64
    for name in (kept, unneeded):
        (blobs / name).write_bytes(b"blob")
        _old(blobs / name)
    _record(out, "2026-11-28T0500", f"sha256:{kept}")
    for name in (kept, gone, unneeded):
        (cache / "layers").mkdir(exist_ok=True)
        (cache / "layers" / f"{name}.json").write_text(json.dumps({"diff_id": f"sha256:{name}", "size": 4}))
        (cache / "commits" / name).mkdir(parents=True)
        config = {"rootfs": {"type": "layers", "diff_ids": [f"sha256:{kept}", f"sha256:{name}"]}}
        (cache / "commits" / name / "config.json").write_text(json.dumps(config))
    (cache / "compressed").mkdir()
    mapping = {"diff_id": f"sha256:{kept}", "digest": f"sha256:{gone}"}  # a kept layer's gzip form, its blob gone
    (cache / "compressed" / f"{kept}-gzip-1.json").write_text(json.dumps(mapping))

    plan = plan_retention(out, cache, keep=1, grace_seconds=60)

    doomed = set(plan.paths)
    for name in (gone, unneeded):
        assert {cache / "layers" / f"{name}.json", cache / "commits" / name} <= doomed
    assert cache / "compressed" / f"{kept}-gzip-1.json" in doomed
    assert blobs / unneeded in doomed and blobs / kept not in doomed
    assert not {cache / "layers" / f"{kept}.json", cache / "commits" / kept} & doomed
    # Entries go before the blobs they name: a kill halfway never leaves an entry naming a missing blob.
    order = list(plan.paths)
    assert order.index(cache / "layers" / f"{unneeded}.json") < order.index(blobs / unneeded)
    apply_retention(plan)
    assert not (cache / "commits" / unneeded).exists() and (cache / "commits" / kept).is_dir()


def test_pruned_markers_stay_until_much_older_than_the_newest_kept_snapshot(tmp_path: Path) -> None:
    out, cache = tmp_path / "out", tmp_path / "cache"
    out.mkdir()
    for stamp in ("2026-11-01T0400", "2026-11-27T0400", "2026-11-28T0400", "2026-11-28T0500"):
        _record(out, stamp, "sha256:" + "1" * 64)
    plan = plan_retention(out, cache, keep=1, grace_seconds=60)
    assert {m.name for m in plan.markers} == {"2026-11-27T0400", "2026-11-28T0400"}  # the oldest is stale at once
    apply_retention(plan)
    old_marker = pruned_path(out, "c" * 64, "2026-11-01T0400")
    old_marker.touch()  # as an earlier run left it
    _record(out, "2026-12-05T0000", "sha256:" + "1" * 64)
    later = plan_retention(out, cache, keep=1, grace_seconds=60)
    assert old_marker in later.paths and pruned_path(out, "c" * 64, "2026-11-28T0400") not in later.paths
    assert pruned_path(out, "c" * 64, "2026-11-27T0400") in later.paths  # over 7 days before 2026-12-05


def test_oci_layouts_are_deleted_as_directories_and_their_shared_blobs_not_counted_as_freed(tmp_path: Path) -> None:
    out, cache = tmp_path / "out", tmp_path / "cache"
    blobs = cache / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    (blobs / ("1" * 64)).write_bytes(b"x" * 1000)
    layouts = []
    for stamp in ("2026-11-28T0400", "2026-11-28T0500"):
        layout = out / "snapshots" / "web" / stamp
        (layout / "blobs" / "sha256").mkdir(parents=True)
        os.link(blobs / ("1" * 64), layout / "blobs" / "sha256" / ("1" * 64))
        (layout / "index.json").write_bytes(b"{}")
        record = SnapshotRecord("c" * 64, "web", stamp, f"web:{stamp}", str(layout), "sha256:" + "0" * 64,
                                ("sha256:" + "1" * 64,), (1000,), 7, "fp", 0.1, "new")  # fmt: skip
        path = record_path(out, record.container_id, stamp)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(record.to_json())
        layouts.append(layout)
    plan = plan_retention(out, cache, keep=1, grace_seconds=0)
    assert layouts[0] in plan.paths
    record_size = record_path(out, "c" * 64, "2026-11-28T0400").stat().st_size
    assert plan.freed_bytes == record_size + len(b"{}")  # the layer blob keeps its other links
    apply_retention(plan)
    assert not layouts[0].exists() and (layouts[1] / "index.json").exists()
    assert (blobs / ("1" * 64)).stat().st_nlink == 2


# --- through the command line (issue 11, class 6) --------------------------------------------------------------------

STAMP_04, STAMP_05, STAMP_06, STAMP_07 = (f"2026-11-28T{h}00" for h in ("04", "05", "06", "07"))
OTHER = "ab" * 32


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The demo container, plus a copy of it named `other` (same image layer, its own file)."""
    root = tmp_path_factory.mktemp("pristine") / "storage"
    first = build_sample_storage(root)
    for part in ("containers", "overlay2"):
        subprocess.run(["cp", "-a", str(root / part / first), str(root / part / OTHER)], check=True)
    config = root / "containers" / OTHER / "config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"ID": OTHER, "Name": "other"}))
    (root / "overlay2" / OTHER / "diff" / "app" / "other.txt").write_text("only in other\n")
    return root, first


@pytest.fixture
def storage(pristine: tuple[Path, str], tmp_path: Path) -> tuple[Path, str]:
    root = tmp_path / "storage"
    subprocess.run(["cp", "-a", str(pristine[0]), str(root)], check=True)  # keeps whiteouts and trusted.* xattrs
    return root, pristine[1]


def _snapshot(root: Path, work: Path, stamp: str, *extra: str, env: dict[str, str] | None = None) -> Completed:
    args = ["SnapshotAll", "--snapshot", stamp, "--storage-root", str(root), "--containers", "demo-web"]
    args += [] if "--format" in extra else ["--format", "both"]
    args += ["--commit-output-dir", str(work / "out"), "--commit-cache-dir", str(work / "cache"), *extra]
    return run_luigi(*args, env=env)


def _change(root: Path, cid: str, text: str) -> None:
    (root / "overlay2" / cid / "diff" / "app" / "changing.txt").write_text(text)


def _on_disk(work: Path) -> set[Path]:
    """Every snapshot archive (tar) and layout (oci-dir) under out/snapshots, named as the pipeline names them."""
    return {p for p in (work / "out" / "snapshots").glob("*/*") if not p.name.startswith(".")}


def _orphans(work: Path) -> set[Path]:
    return _on_disk(work) - {Path(r.archive) for r in read_records(work / "out")}


def _check_layout(layout: Path) -> None:
    """An OCI layout whose index, manifest, config and layer blobs are all there and match their digests."""

    def blob(digest: str) -> bytes:
        data = (layout / "blobs" / "sha256" / digest.removeprefix("sha256:")).read_bytes()
        assert "sha256:" + hashlib.sha256(data).hexdigest() == digest
        return data

    index = json.loads((layout / "index.json").read_text())
    manifest = json.loads(blob(index["manifests"][0]["digest"]))
    for descriptor in [manifest["config"], *manifest["layers"]]:
        assert len(blob(descriptor["digest"])) == descriptor["size"]


@pytest.mark.root
def test_oci_dir_snapshots_with_keep_1_leave_exactly_the_newest_layout(
    storage: tuple[Path, str], tmp_path: Path
) -> None:
    root, cid = storage
    for stamp in (STAMP_04, STAMP_05, STAMP_06):
        _change(root, cid, f"state at {stamp}\n")
        result = _snapshot(
            root, tmp_path, stamp, "--format", "oci-dir", "--keep", "1", "--schedule-gc-grace-minutes", "0"
        )
        assert result.returncode == 0, result.stderr
        assert "Traceback" not in result.stderr, result.stderr
    records = read_records(tmp_path / "out")
    assert [r.stamp for r in records] == [STAMP_06]
    assert _on_disk(tmp_path) == {Path(records[0].archive)} and Path(records[0].archive).is_dir()
    assert _orphans(tmp_path) == set()
    _check_layout(Path(records[0].archive))
    blobs = {p.name for p in (tmp_path / "cache" / "blobs" / "sha256").iterdir()}
    assert blobs == {d.removeprefix("sha256:") for d in records[0].diff_ids}


def _wait_stopped(process: subprocess.Popen[str], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[1]
        state = Path(f"/proc/{process.pid}/stat").read_text().rpartition(")")[2].split()[0]
        if state == "T":
            return
        time.sleep(0.05)
    raise AssertionError("the commit never reached its failpoint")


@pytest.mark.root
def test_a_commit_using_blobs_keeps_them_while_retention_runs(storage: tuple[Path, str], tmp_path: Path) -> None:
    root, cid = storage
    assert _snapshot(root, tmp_path, STAMP_04).returncode == 0
    archive = tmp_path / "other.tar"
    command = [sys.executable, "-m", "luigi", "--module", "pipeline", *commit_args(root, tmp_path, "--id", "other")]
    command += ["--output", str(archive), "--local-scheduler"]
    # Stopped after copying the image layer's blob, before the container layer's: a blob no snapshot names.
    env = os.environ | {"PIPELINE_FAILPOINTS": "archive:blob-copied@1:stop"}
    commit = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_stopped(commit)
        _change(root, cid, "changed\n")
        retention = _snapshot(root, tmp_path, STAMP_05, "--keep", "1", "--schedule-gc-grace-minutes", "0")
        assert retention.returncode == 0, retention.stderr
        assert "in use" in retention.stderr, retention.stderr
    finally:
        resume(commit.pid)
        stderr = commit.communicate(timeout=120)[1]
    assert commit.returncode == 0, stderr
    with tarfile.open(archive) as tar:  # whole: every blob there, each matching its name
        blobs = [m for m in tar.getmembers() if m.isfile() and m.name.startswith("blobs/sha256/")]
        for member in blobs:
            data = tar.extractfile(member)
            assert data is not None and hashlib.sha256(data.read()).hexdigest() == member.name.rpartition("/")[2]
    layers = read_archive_manifest(archive)["Layers"]
    assert len(layers) == 2 and all(name in {m.name for m in blobs} for name in layers)
    # Once no commit uses the cache, the next run collects what no kept snapshot needs.
    _change(root, cid, "changed again\n")
    later = _snapshot(root, tmp_path, STAMP_06, "--keep", "1", "--schedule-gc-grace-minutes", "0")
    assert later.returncode == 0, later.stderr
    blob_dir = tmp_path / "cache" / "blobs" / "sha256"
    assert not (blob_dir / layers[1].rpartition("/")[2]).exists()


@pytest.mark.root
def test_an_archive_no_record_names_is_collected_after_the_grace(storage: tuple[Path, str], tmp_path: Path) -> None:
    root, cid = storage
    assert _snapshot(root, tmp_path, STAMP_04).returncode == 0
    _change(root, cid, "changed\n")
    killed = _snapshot(root, tmp_path, STAMP_05, env={"PIPELINE_FAILPOINTS": "snapshot:record@1"})
    assert killed.returncode == -9, killed.stderr
    (orphan,) = _orphans(tmp_path)
    assert orphan.name == f"{STAMP_05}.tar"

    _change(root, cid, "changed again\n")
    within_grace = _snapshot(root, tmp_path, STAMP_06, "--keep", "1")
    assert within_grace.returncode == 0, within_grace.stderr
    assert _orphans(tmp_path) == {orphan}  # younger than [snapshot] gc_grace_minutes: a run may be recording it

    after_grace = _snapshot(root, tmp_path, STAMP_07, "--keep", "1", "--schedule-gc-grace-minutes", "0")
    assert after_grace.returncode == 0, after_grace.stderr
    assert _orphans(tmp_path) == set()
    assert _on_disk(tmp_path) == {Path(r.archive) for r in read_records(tmp_path / "out")}

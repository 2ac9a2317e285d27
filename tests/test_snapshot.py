"""SnapshotAll through the command line: one archive per container, skip-unchanged, catalog and retention."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.demo import build_sample_storage
from pipeline.snapshots.catalog import read_records
from tests.support.cli import REPO, run_luigi
from tests.support.imagecheck import read_archive_manifest

FLEET = 20


@pytest.fixture
def fleet(tmp_path: Path) -> tuple[Path, list[str]]:
    """FLEET containers on one image: the demo container and copies of it, each with its own file."""
    root = tmp_path / "storage"
    first = build_sample_storage(root)
    ids = [first]
    for n in range(1, FLEET):
        cid = f"{n:02d}" * 32
        for part in ("containers", "overlay2"):
            subprocess.run(["cp", "-a", str(root / part / first), str(root / part / cid)], check=True)
        config = root / "containers" / cid / "config.json"
        doc = json.loads(config.read_text())
        doc.update(ID=cid, Name=f"app-{n:02d}")
        config.write_text(json.dumps(doc))
        (root / "overlay2" / cid / "diff" / "app" / "own.txt").write_text(f"container {n}\n")
        ids.append(cid)
    return root, ids


def _snapshot(root: Path, work: Path, stamp: str, *extra: str) -> subprocess.CompletedProcess[str]:
    args = ["SnapshotAll", "--snapshot", stamp, "--storage-root", str(root)]
    args += [] if "--format" in extra else ["--format", "both"]  # one archive per snapshot (the store: elsewhere)
    args += ["--commit-output-dir", str(work / "out"), "--commit-cache-dir", str(work / "cache"), *extra]
    return run_luigi(*args)


def _packs(result: subprocess.CompletedProcess[str]) -> int:
    return result.stderr.count("INFO pipeline.store.cache: packed ")


def _archives(work: Path) -> set[Path]:
    return set((work / "out" / "snapshots").glob("*/*.tar"))


def test_every_container_gets_an_archive_and_shared_layers_are_packed_once(
    fleet: tuple[Path, list[str]], tmp_path: Path
) -> None:
    root, ids = fleet
    result = _snapshot(root, tmp_path, "2026-11-28T0400")
    assert result.returncode == 0, result.stderr
    assert _packs(result) == 1 + FLEET  # the image layer once, each container layer once
    records = read_records(tmp_path / "out")
    assert sorted(r.container_id for r in records) == sorted(ids)
    assert {r.status for r in records} == {"new"}
    for record in records:
        manifest = read_archive_manifest(Path(record.archive))
        assert manifest["RepoTags"] == [record.reference] and record.reference.endswith(":2026-11-28T0400")
        assert [f"sha256:{p.rsplit('/', 1)[1]}" for p in manifest["Layers"]] == list(record.diff_ids)
    assert f"snapshot 2026-11-28T0400: {FLEET} container(s) ({FLEET} new, 0 unchanged)" in result.stderr
    index = (tmp_path / "out" / "catalog" / "catalog.jsonl").read_text().splitlines()
    assert len(index) == FLEET


def test_rerun_in_the_same_period_runs_nothing(fleet: tuple[Path, list[str]], tmp_path: Path) -> None:
    root, _ = fleet
    assert _snapshot(root, tmp_path, "2026-11-28T0400").returncode == 0
    again = _snapshot(root, tmp_path, "2026-11-28T0430")  # the same hourly period
    assert again.returncode == 0
    assert " ran successfully" not in again.stderr and _packs(again) == 0


def test_unchanged_containers_cost_a_record_and_no_archive_bytes(fleet: tuple[Path, list[str]], tmp_path: Path) -> None:
    root, ids = fleet
    assert _snapshot(root, tmp_path, "2026-11-28T0400").returncode == 0
    archives = {p: p.stat().st_mtime_ns for p in _archives(tmp_path)}
    blobs = set((tmp_path / "cache" / "blobs" / "sha256").iterdir())
    (root / "overlay2" / ids[3] / "diff" / "app" / "own.txt").write_text("changed since the last snapshot\n")

    result = _snapshot(root, tmp_path, "2026-11-28T0500")
    assert result.returncode == 0, result.stderr
    assert _packs(result) == 1
    later = [r for r in read_records(tmp_path / "out") if r.stamp == "2026-11-28T0500"]
    assert len(later) == FLEET
    assert [r.container_id for r in later if r.status == "new"] == [ids[3]]
    for record in later:
        if record.status == "reused":
            assert Path(record.archive) in archives and record.reused_from == "2026-11-28T0400"
    new_archives = _archives(tmp_path) - set(archives)
    assert [p.parent.name.endswith(ids[3][:12]) for p in new_archives] == [True]
    assert {p: p.stat().st_mtime_ns for p in archives} == archives
    assert len(set((tmp_path / "cache" / "blobs" / "sha256").iterdir()) - blobs) == 1


def test_containers_glob_selects_by_name_or_id(fleet: tuple[Path, list[str]], tmp_path: Path) -> None:
    root, ids = fleet
    result = _snapshot(root, tmp_path, "2026-11-28T0400", "--containers", f"app-0[12],{ids[5][:12]}*")
    assert result.returncode == 0, result.stderr
    assert sorted(r.container_id for r in read_records(tmp_path / "out")) == sorted([ids[1], ids[2], ids[5]])


def test_state_filter_running_selects_only_live_containers(fleet: tuple[Path, list[str]], tmp_path: Path) -> None:
    root, ids = fleet
    config = root / "containers" / ids[7] / "config.json"
    doc = json.loads(config.read_text())
    doc["State"] = {"Running": True, "Pid": 1}  # pid 1 is alive; its root cgroup is never frozen
    config.write_text(json.dumps(doc))
    result = _snapshot(root, tmp_path, "2026-11-28T0400", "--state", "running")
    assert result.returncode == 0, result.stderr
    assert [r.container_id for r in read_records(tmp_path / "out")] == [ids[7]]


def test_retention_keeps_the_newest_and_everything_they_need(fleet: tuple[Path, list[str]], tmp_path: Path) -> None:
    root, ids = fleet
    args = ("--containers", "app-0[1-3]")
    changing = root / "overlay2" / ids[1] / "diff" / "app" / "own.txt"
    for hour in ("04", "05", "06"):
        changing.write_text(f"state at {hour}\n")
        assert _snapshot(root, tmp_path, f"2026-11-28T{hour}00", *args).returncode == 0
    before = _archives(tmp_path)

    dry = _snapshot(root, tmp_path, "2026-11-28T0700", *args, "--keep", "1", "--prune-dry-run")
    assert dry.returncode == 0
    assert "retention would keep" in dry.stdout and "delete " in dry.stdout
    assert before <= _archives(tmp_path)

    env_grace = tmp_path / "grace.cfg"
    env_grace.write_text("[snapshot]\ngc_grace_minutes = 0\n")
    result = run_luigi(
        "SnapshotAll", "--snapshot", "2026-11-28T0800", "--storage-root", str(root), "--format", "both",
        "--commit-output-dir",
        str(tmp_path / "out"), "--commit-cache-dir", str(tmp_path / "cache"), *args, "--keep", "1",
        env={"LUIGI_CONFIG_PATH": str(env_grace)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    records = read_records(tmp_path / "out")
    assert {r.stamp for r in records} == {"2026-11-28T0800"} and len(records) == 3
    blob_dir = tmp_path / "cache" / "blobs" / "sha256"
    for record in records:
        assert Path(record.archive).exists()
        for diff_id in record.diff_ids:
            assert (blob_dir / diff_id.removeprefix("sha256:")).exists()
    # The changing container's older archives are gone; the unchanged ones' first archives are still needed.
    kept_archives = {Path(r.archive) for r in records}
    assert _archives(tmp_path) == kept_archives
    needed = {d.removeprefix("sha256:") for r in records for d in r.diff_ids}
    assert {p.name for p in blob_dir.iterdir()} == needed


def test_catalog_prints_as_a_table(fleet: tuple[Path, list[str]], tmp_path: Path) -> None:
    root, ids = fleet
    assert _snapshot(root, tmp_path, "2026-11-28T0400", "--containers", "app-01").returncode == 0
    table = subprocess.run(
        [sys.executable, "-m", "pipeline", "snapshots", str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True
    )
    assert table.returncode == 0, table.stderr
    header, row = table.stdout.splitlines()
    assert header.split()[:4] == ["STAMP", "NAME", "CONTAINER", "STATUS"]
    assert row.split()[:4] == ["2026-11-28T0400", "app-01", ids[1][:12], "new"]

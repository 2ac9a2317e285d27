"""Tests of the cgroup freezer with real processes in real, temporary cgroups (v1 and v2 where each is mounted)."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.errors import StorageError
from pipeline.freezer import MARKER_SUFFIX, Freezer, find_freezer, paused, thaw_abandoned
from tests.cgroups import UNAVAILABLE, VERSIONS, Cgroup, cgroup_mount, grows

REPO = Path(__file__).resolve().parents[1]

# A commit killed by SIGKILL (which no handler or finally block can intercept) while the container is frozen.
KILLED_COMMIT_SCRIPT = """
import os, signal, sys
from pathlib import Path
from pipeline.freezer import paused
with paused(int(sys.argv[1]), Path(sys.argv[2]), label="killed-commit") as freezer:
    assert freezer is not None and freezer.is_frozen()
    os.kill(os.getpid(), signal.SIGKILL)
"""

# Waits to be moved into a cgroup, then reports what find_freezer says from there.
FIND_FROM_INSIDE_SCRIPT = """
import sys
from pipeline.freezer import find_freezer
pid = int(sys.stdin.readline())
print(find_freezer(pid))
"""


def markers(marker_dir: Path) -> list[Path]:
    return sorted(marker_dir.glob(f"*{MARKER_SUFFIX}"))


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def write_marker(path: Path, **record: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))


# --- find_freezer ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cgroup", VERSIONS, indirect=True)
def test_find_freezer_finds_the_cgroup_a_process_was_moved_into(cgroup: Cgroup, tmp_path: Path) -> None:
    process = cgroup.start_counter(tmp_path / "counter")
    assert find_freezer(process.pid) == Freezer(cgroup.path, cgroup.version)


@pytest.mark.root
@pytest.mark.skipif(all(UNAVAILABLE.values()), reason="no writable cgroup hierarchy (needs root and a freezer)")
def test_find_freezer_returns_none_for_a_process_in_the_root_cgroups() -> None:
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        # The child inherits the test runner's cgroups, which on some hosts are not the roots: move it explicitly.
        for version in (1, 2):
            mount = cgroup_mount(version)
            if mount is not None:
                (mount / "cgroup.procs").write_text(str(process.pid))
        assert find_freezer(process.pid) is None
    finally:
        process.kill()
        process.wait()


def test_find_freezer_returns_none_for_a_dead_pid() -> None:
    assert find_freezer(dead_pid()) is None


@pytest.mark.parametrize("cgroup", VERSIONS, indirect=True)
def test_find_freezer_refuses_a_cgroup_that_holds_the_caller(cgroup: Cgroup, tmp_path: Path) -> None:
    target = cgroup.start_counter(tmp_path / "counter")
    finder = subprocess.Popen(
        [sys.executable, "-c", FIND_FROM_INSIDE_SCRIPT], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    cgroup.processes.append(finder)
    cgroup.add(finder.pid)
    out, _ = finder.communicate(f"{target.pid}\n".encode(), timeout=60)
    assert finder.returncode == 0
    assert out.decode().strip() == "None"


# --- paused ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cgroup", VERSIONS, indirect=True)
def test_paused_freezes_the_container_and_resumes_it_after(cgroup: Cgroup, tmp_path: Path) -> None:
    counter, marker_dir = tmp_path / "counter", tmp_path / "markers"
    process = cgroup.start_counter(counter)
    with paused(process.pid, marker_dir, label="web-1") as freezer:
        assert freezer == Freezer(cgroup.path, cgroup.version)
        assert freezer.is_frozen()
        assert not grows(counter)
        [marker] = markers(marker_dir)
        record = json.loads(marker.read_text())
        assert {k: record[k] for k in ("cgroup", "version", "pid", "label", "owner_pid")} == {
            "cgroup": str(cgroup.path),
            "version": cgroup.version,
            "pid": process.pid,
            "label": "web-1",
            "owner_pid": os.getpid(),
        }
    assert not Freezer(cgroup.path, cgroup.version).is_frozen()
    assert grows(counter)
    assert markers(marker_dir) == []


@pytest.mark.parametrize("cgroup", VERSIONS, indirect=True)
def test_exception_inside_paused_still_thaws_and_removes_the_marker(cgroup: Cgroup, tmp_path: Path) -> None:
    counter, marker_dir = tmp_path / "counter", tmp_path / "markers"
    process = cgroup.start_counter(counter)
    with pytest.raises(RuntimeError, match="packing failed"):
        with paused(process.pid, marker_dir, label="web-1"):
            assert not grows(counter)
            raise RuntimeError("packing failed")
    assert not Freezer(cgroup.path, cgroup.version).is_frozen()
    assert grows(counter)
    assert markers(marker_dir) == []


def test_paused_warns_and_yields_none_when_there_is_no_freezer(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    marker_dir = tmp_path / "markers"
    with caplog.at_level(logging.WARNING, logger="pipeline.freezer"):
        with paused(dead_pid(), marker_dir, label="gone-container") as freezer:
            assert freezer is None
    [record] = [r for r in caplog.records if r.name == "pipeline.freezer"]
    assert "gone-container" in record.getMessage()
    assert "unpaused" in record.getMessage()
    assert markers(marker_dir) == []


# --- thaw_abandoned -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cgroup", VERSIONS, indirect=True)
def test_thaw_abandoned_thaws_the_cgroup_of_a_commit_killed_while_frozen(cgroup: Cgroup, tmp_path: Path) -> None:
    counter, marker_dir = tmp_path / "counter", tmp_path / "markers"
    process = cgroup.start_counter(counter)
    commit = subprocess.Popen([sys.executable, "-c", KILLED_COMMIT_SCRIPT, str(process.pid), str(marker_dir)], cwd=REPO)
    assert commit.wait(timeout=60) == -signal.SIGKILL
    # The kill really left the container frozen, with the marker saying so.
    freezer = Freezer(cgroup.path, cgroup.version)
    assert freezer.is_frozen()
    assert not grows(counter)
    [marker] = markers(marker_dir)
    record = json.loads(marker.read_text())
    assert (record["owner_pid"], record["cgroup"]) == (commit.pid, str(cgroup.path))

    assert thaw_abandoned(marker_dir) == [cgroup.path]
    assert not freezer.is_frozen()
    assert grows(counter)
    assert markers(marker_dir) == []


@pytest.mark.parametrize("cgroup", VERSIONS, indirect=True)
def test_thaw_abandoned_leaves_a_live_commits_marker_and_freeze_alone(cgroup: Cgroup, tmp_path: Path) -> None:
    counter, marker_dir = tmp_path / "counter", tmp_path / "markers"
    process = cgroup.start_counter(counter)
    with paused(process.pid, marker_dir, label="web-1") as freezer:
        assert freezer is not None
        [marker] = markers(marker_dir)
        assert thaw_abandoned(marker_dir) == []
        assert markers(marker_dir) == [marker]
        assert freezer.is_frozen()
        assert not grows(counter)
    assert grows(counter)


@pytest.mark.parametrize("cgroup", VERSIONS, indirect=True)
def test_thaw_abandoned_keeps_frozen_a_cgroup_a_live_commit_holds_too(cgroup: Cgroup, tmp_path: Path) -> None:
    counter, marker_dir = tmp_path / "counter", tmp_path / "markers"
    process = cgroup.start_counter(counter)
    with paused(process.pid, marker_dir, label="web-1") as freezer:
        assert freezer is not None
        [live] = markers(marker_dir)
        dead = marker_dir / f"0-dead{MARKER_SUFFIX}"
        write_marker(
            dead, cgroup=str(cgroup.path), version=cgroup.version, pid=process.pid, label="web-1", owner_pid=dead_pid()
        )
        assert thaw_abandoned(marker_dir) == []
        assert markers(marker_dir) == [live]  # the dead commit's marker is gone, the live one's kept
        assert freezer.is_frozen()


def test_thaw_abandoned_drops_a_dead_owners_marker_whose_cgroup_is_gone(tmp_path: Path) -> None:
    marker_dir = tmp_path / "markers"
    marker = marker_dir / f"1-2-abcd{MARKER_SUFFIX}"
    write_marker(marker, cgroup=str(tmp_path / "gone"), version=2, pid=2, label="old", owner_pid=dead_pid())
    assert thaw_abandoned(marker_dir) == []
    assert not marker.exists()
    assert not (tmp_path / "gone").exists()


def test_thaw_abandoned_treats_a_reused_owner_pid_as_dead(tmp_path: Path) -> None:
    marker_dir = tmp_path / "markers"
    marker = marker_dir / f"1-2-abcd{MARKER_SUFFIX}"
    # This test's own pid is alive, but with another start time it stands for an earlier process of that number.
    write_marker(
        marker, cgroup=str(tmp_path / "gone"), version=1, pid=2, label="old", owner_pid=os.getpid(), owner_start=1
    )
    assert thaw_abandoned(marker_dir) == []
    assert not marker.exists()


def test_thaw_abandoned_leaves_another_machines_markers_alone(tmp_path: Path) -> None:
    marker_dir = tmp_path / "markers"
    foreign = marker_dir / f"1-2-abcd{MARKER_SUFFIX}"
    previous_boot = marker_dir / f"3-4-abcd{MARKER_SUFFIX}"
    common = {"cgroup": str(tmp_path / "cg"), "version": 2, "pid": 2, "label": "x", "owner_pid": dead_pid()}
    write_marker(foreign, **common, boot_id="another-boot", host="another-host-of-the-shared-dir")
    write_marker(previous_boot, **common, boot_id="an-earlier-boot", host=os.uname().nodename)
    assert thaw_abandoned(marker_dir) == []
    assert foreign.exists()
    assert not previous_boot.exists()  # its owner died with the boot, and so did every freeze


def test_thaw_abandoned_logs_and_removes_malformed_markers(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    marker_dir = tmp_path / "markers"
    good = {"cgroup": "/sys/fs/cgroup/x", "version": 1, "pid": 2, "label": "x", "owner_pid": os.getpid()}
    bad = {
        "not-json": b"{",
        "list": b"[]",
        "no-cgroup": json.dumps({k: v for k, v in good.items() if k != "cgroup"}).encode(),
        "relative-cgroup": json.dumps({**good, "cgroup": "x"}).encode(),
        "version-3": json.dumps({**good, "version": 3}).encode(),
        "boolean-owner": json.dumps({**good, "owner_pid": True}).encode(),
        "not-utf8": b"\xff\xfe",
    }
    marker_dir.mkdir()
    for name, content in bad.items():
        (marker_dir / f"{name}{MARKER_SUFFIX}").write_bytes(content)
    unrelated = marker_dir / "notes.txt"
    unrelated.write_text("not a marker")
    with caplog.at_level(logging.WARNING, logger="pipeline.freezer"):
        assert thaw_abandoned(marker_dir) == []
    assert markers(marker_dir) == []
    assert unrelated.exists()
    warned = [r.getMessage() for r in caplog.records if r.name == "pipeline.freezer"]
    assert len(warned) == len(bad)
    assert all("malformed" in message for message in warned)


def test_thaw_abandoned_of_a_missing_marker_dir_finds_nothing(tmp_path: Path) -> None:
    assert thaw_abandoned(tmp_path / "never-created") == []


# --- Freezer on paths that are not (or no longer) cgroups ------------------------------------------------------------


def test_thaw_of_a_removed_cgroup_does_nothing(tmp_path: Path) -> None:
    freezer = Freezer(tmp_path / "gone", 1)
    freezer.thaw()
    assert not freezer.is_frozen()
    assert not freezer.path.exists()


def test_thaw_of_a_directory_that_is_no_cgroup_fails_without_creating_files(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="not a cgroup v2"):
        Freezer(tmp_path, 2).thaw()
    assert list(tmp_path.iterdir()) == []


def test_freeze_waits_then_thaws_and_fails_when_the_cgroup_never_reports_frozen(tmp_path: Path) -> None:
    # A stand-in v2 cgroup whose processes never finish freezing: cgroup.events keeps saying "frozen 0".
    (tmp_path / "cgroup.freeze").write_text("0")
    (tmp_path / "cgroup.events").write_text("populated 1\nfrozen 0\n")
    started = time.monotonic()
    with pytest.raises(StorageError, match=f"{tmp_path}: the cgroup's processes did not all freeze within 0.3 s"):
        Freezer(tmp_path, 2).freeze(timeout=0.3)
    assert time.monotonic() - started >= 0.3
    assert (tmp_path / "cgroup.freeze").read_text() == "0"  # not left half-frozen

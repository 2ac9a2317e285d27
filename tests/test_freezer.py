"""Tests of the cgroup freezer with real processes in real, temporary cgroups (v1 and v2 where each is mounted).

A container's cgroup is made as docker's cgroupfs driver makes it, `<parent>/<container id>` (the parent is the
test's own cgroup, standing for /docker); any other cgroup is one the freezer must never freeze.
"""

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

from pipeline.errors import FreezerError
from pipeline.host import process
from pipeline.host.freezer import (
    MARKER_SUFFIX,
    Freezer,
    container_cgroup,
    find_freezer,
    locate_freezer,
    paused,
    thaw_abandoned,
)
from tests.support.cgroups import UNAVAILABLE, VERSIONS, Cgroup, FreezerWatch, cgroup_mount, grows

REPO = Path(__file__).resolve().parents[1]
CID = "c0ffee" + "0123456789abcdef" * 3 + "0123456789"  # a full 64-hex container id
OTHER = "beef" + "0123456789abcdef" * 3 + "012345678901"  # another container's
assert len(CID) == len(OTHER) == 64

# A commit killed by SIGKILL (which no handler or finally block can intercept) while the container is frozen.
KILLED_COMMIT_SCRIPT = """
import os, signal, sys
from pathlib import Path
from pipeline.host.freezer import paused
with paused(int(sys.argv[1]), Path(sys.argv[2]), label="killed-commit", container_id=sys.argv[3]) as freezer:
    assert freezer is not None and freezer.is_frozen()
    os.kill(os.getpid(), signal.SIGKILL)
"""

# Waits to be moved into a cgroup, then reports what find_freezer says from there.
FIND_FROM_INSIDE_SCRIPT = """
import sys
from pipeline.host.freezer import find_freezer
pid = int(sys.stdin.readline())
print(find_freezer(pid, sys.argv[1]))
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


@pytest.fixture
def container(cgroup: Cgroup) -> Cgroup:
    """The container's cgroup, named after its id inside the test's cgroup (as /docker/<id>)."""
    return cgroup.child(CID)


def freezer_log(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "pipeline.host.freezer"]


# --- which cgroup is the container's --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cgroup", "own"),
    [
        # docker, cgroupfs driver (default parent, then --cgroup-parent) and systemd driver
        (f"/docker/{CID}", f"/docker/{CID}"),
        (f"/ci/jobs/{CID}", f"/ci/jobs/{CID}"),
        (f"/system.slice/docker-{CID}.scope", f"/system.slice/docker-{CID}.scope"),
        # podman: systemd, cgroupfs, --cgroups split; a systemd inside the container making sub-cgroups
        (f"/machine.slice/libpod-{CID}.scope", f"/machine.slice/libpod-{CID}.scope"),
        (f"/machine.slice/libpod-{CID}.scope/container", f"/machine.slice/libpod-{CID}.scope"),
        (f"/libpod_parent/libpod-{CID}", f"/libpod_parent/libpod-{CID}"),
        (f"/user.slice/podman.service/libpod-payload-{CID}", f"/user.slice/podman.service/libpod-payload-{CID}"),
        # rocker: the id at the hierarchy's root; a sub-cgroup the container made
        (f"/{CID}", f"/{CID}"),
        (f"/docker/{CID}/init.scope", f"/docker/{CID}"),
    ],
)
def test_container_cgroup_is_the_one_named_after_the_container(cgroup: str, own: str) -> None:
    assert container_cgroup(cgroup, CID) == own


@pytest.mark.parametrize(
    ("cgroup", "why"),
    [
        ("/", "root cgroup"),
        ("/user.slice/user-1000.slice/session-2.scope", "not named after the container"),
        (f"/docker/{OTHER}", "not named after the container"),
        (f"/docker/{CID[:12]}", "not named after the container"),
        (f"/docker/{CID}x", "not named after the container"),
        (f"/system.slice/{CID}.service", "not named after the container"),
        (f"/machine.slice/libpod-conmon-{CID}.scope", "not named after the container"),
        ("/libpod_parent/conmon", "not named after the container"),
        (f"/libpod_parent/libpod-{CID}/conmon", "conmon's"),
    ],
)
def test_container_cgroup_refuses_cgroups_not_the_containers(cgroup: str, why: str) -> None:
    refused = container_cgroup(cgroup, CID)
    assert not isinstance(refused, str)
    assert why in refused.why


def test_container_cgroup_needs_a_full_container_id() -> None:
    refused = container_cgroup("/docker/web", "web")
    assert not isinstance(refused, str) and "not a full 64-hex id" in refused.why


# --- find_freezer ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cgroup", VERSIONS, indirect=True)
def test_find_freezer_finds_the_cgroup_a_process_was_moved_into(container: Cgroup) -> None:
    process = container.start_sleeper()
    assert find_freezer(process.pid, CID) == Freezer(container.path, container.version)


@pytest.mark.parametrize("cgroup", VERSIONS, indirect=True)
def test_find_freezer_finds_the_containers_cgroup_above_a_sub_cgroup_its_pid_is_in(container: Cgroup) -> None:
    process = container.child("init.scope").start_sleeper()
    assert find_freezer(process.pid, CID) == Freezer(container.path, container.version)


@pytest.mark.parametrize("cgroup", VERSIONS, indirect=True)
@pytest.mark.parametrize("name", ["pipeline-unrelated", f"libpod-conmon-{CID}.scope", OTHER])
def test_find_freezer_refuses_the_cgroup_of_a_process_outside_the_container(cgroup: Cgroup, name: str) -> None:
    unrelated = cgroup.child(name)
    process = unrelated.start_sleeper()
    found = locate_freezer(process.pid, CID)
    assert isinstance(found, str)
    assert f"its v{cgroup.version} cgroup /" in found and f"{name} is not named after the container" in found
    assert find_freezer(process.pid, CID) is None


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
        assert find_freezer(process.pid, CID) is None
    finally:
        process.kill()
        process.wait()


def test_find_freezer_returns_none_for_a_dead_pid() -> None:
    assert find_freezer(dead_pid(), CID) is None


@pytest.mark.parametrize("cgroup", VERSIONS, indirect=True)
def test_find_freezer_refuses_a_cgroup_that_holds_the_caller(container: Cgroup) -> None:
    target = container.start_sleeper()
    finder = subprocess.Popen(
        [sys.executable, "-c", FIND_FROM_INSIDE_SCRIPT, CID], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    container.processes.append(finder)
    container.add(finder.pid)
    out, _ = finder.communicate(f"{target.pid}\n".encode(), timeout=60)
    assert finder.returncode == 0
    assert out.decode().strip() == "None"


# --- paused ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cgroup", VERSIONS, indirect=True)
def test_paused_freezes_the_container_and_resumes_it_after(container: Cgroup, tmp_path: Path) -> None:
    counter, marker_dir = tmp_path / "counter", tmp_path / "markers"
    process = container.start_counter(counter)
    with paused(process.pid, marker_dir, label="web-1", container_id=CID) as freezer:
        assert freezer == Freezer(container.path, container.version)
        assert freezer.is_frozen()
        assert not grows(counter)
        [marker] = markers(marker_dir)
        record = json.loads(marker.read_text())
        keys = ("cgroup", "cgroup_inode", "container_id", "version", "pid", "label", "owner_pid")
        assert {k: record[k] for k in keys} == {
            "cgroup": str(container.path),
            "cgroup_inode": container.path.stat().st_ino,
            "container_id": CID,
            "version": container.version,
            "pid": process.pid,
            "label": "web-1",
            "owner_pid": os.getpid(),
        }
    assert not Freezer(container.path, container.version).is_frozen()
    assert grows(counter)
    assert markers(marker_dir) == []


@pytest.mark.parametrize("cgroup", VERSIONS, indirect=True)
def test_paused_never_freezes_the_cgroup_of_an_unrelated_process_given_as_the_pid(
    cgroup: Cgroup, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A stale or forged State.Pid: the process is real and in a real cgroup, just not the container's.
    counter, marker_dir = tmp_path / "counter", tmp_path / "markers"
    process = cgroup.start_counter(counter)
    with FreezerWatch(cgroup) as watch, caplog.at_level(logging.WARNING, logger="pipeline.host.freezer"):
        with paused(process.pid, marker_dir, label="web-1 (c0ffee012345)", container_id=CID) as freezer:
            assert freezer is None
            assert grows(counter)
    assert watch.states == {"THAWED"}
    assert markers(marker_dir) == []
    [warning] = freezer_log(caplog)
    assert warning.startswith(f"container web-1 (c0ffee012345) (pid {process.pid}): not freezing it: ")
    assert f"its v{cgroup.version} cgroup /{cgroup.path.name} is not named after the container" in warning
    assert "proceeds unpaused" in warning


@pytest.mark.parametrize("cgroup", VERSIONS, indirect=True)
@pytest.mark.parametrize("frozen", ["container", "ancestor"])
def test_paused_leaves_a_container_frozen_before_frozen_and_never_thaws_it(
    cgroup: Cgroup, container: Cgroup, frozen: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Frozen by its engine (docker pause, podman pause) or, with the ancestor, by whoever manages the parent.
    counter, marker_dir = tmp_path / "counter", tmp_path / "markers"
    process = container.start_counter(counter)
    (container if frozen == "container" else cgroup).freeze_directly()
    with FreezerWatch(container) as watch, caplog.at_level(logging.INFO, logger="pipeline.host.freezer"):
        with paused(process.pid, marker_dir, label="web-1", container_id=CID) as freezer:
            assert freezer is None
            assert markers(marker_dir) == []
            assert not grows(counter)
    assert watch.states == {"FROZEN"}
    assert container.freezer_state() == "FROZEN" and not grows(counter)
    assert markers(marker_dir) == []
    [message] = freezer_log(caplog)
    assert f"container web-1 (pid {process.pid}): already paused ({container.path} is frozen" in message


@pytest.mark.parametrize("cgroup", VERSIONS, indirect=True)
def test_exception_inside_paused_still_thaws_and_removes_the_marker(container: Cgroup, tmp_path: Path) -> None:
    counter, marker_dir = tmp_path / "counter", tmp_path / "markers"
    process = container.start_counter(counter)
    with pytest.raises(RuntimeError, match="packing failed"):
        with paused(process.pid, marker_dir, label="web-1", container_id=CID):
            assert not grows(counter)
            raise RuntimeError("packing failed")
    assert not Freezer(container.path, container.version).is_frozen()
    assert grows(counter)
    assert markers(marker_dir) == []


def test_paused_warns_and_yields_none_when_there_is_no_freezer(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    marker_dir = tmp_path / "markers"
    with caplog.at_level(logging.WARNING, logger="pipeline.host.freezer"):
        pid = dead_pid()
        with paused(pid, marker_dir, label="gone-container", container_id=CID) as freezer:
            assert freezer is None
    [message] = freezer_log(caplog)
    assert f"container gone-container (pid {pid}): not freezing it: pid {pid} is gone" in message
    assert "unpaused" in message
    assert markers(marker_dir) == []


# --- thaw_abandoned -------------------------------------------------------------------------------------------------


def kill_commit_while_frozen(pid: int, marker_dir: Path) -> int:
    """Run a commit that freezes the container with this pid and is SIGKILLed while it is frozen; its pid."""
    argv = [sys.executable, "-c", KILLED_COMMIT_SCRIPT, str(pid), str(marker_dir), CID]
    commit = subprocess.Popen(argv, cwd=REPO)
    assert commit.wait(timeout=60) == -signal.SIGKILL
    return commit.pid


@pytest.mark.parametrize("cgroup", VERSIONS, indirect=True)
def test_thaw_abandoned_thaws_the_cgroup_of_a_commit_killed_while_frozen(container: Cgroup, tmp_path: Path) -> None:
    counter, marker_dir = tmp_path / "counter", tmp_path / "markers"
    process = container.start_counter(counter)
    commit_pid = kill_commit_while_frozen(process.pid, marker_dir)
    # The kill really left the container frozen, with the marker saying so.
    freezer = Freezer(container.path, container.version)
    assert freezer.is_frozen()
    assert not grows(counter)
    [marker] = markers(marker_dir)
    record = json.loads(marker.read_text())
    assert (record["owner_pid"], record["cgroup"]) == (commit_pid, str(container.path))

    assert thaw_abandoned(marker_dir) == [container.path]
    assert not freezer.is_frozen()
    assert grows(counter)
    assert markers(marker_dir) == []


@pytest.mark.parametrize("cgroup", VERSIONS, indirect=True)
def test_thaw_abandoned_thaws_for_a_killed_commit_not_yet_reaped(container: Cgroup, tmp_path: Path) -> None:
    """With luigi's --workers the process that froze the container is a forked worker: killed with its run, it stays
    a zombie until init reaps it, and the next run must not take it for a live commit (kill(pid, 0) answers)."""
    counter, marker_dir = tmp_path / "counter", tmp_path / "markers"
    held = container.start_counter(counter)
    argv = [sys.executable, "-c", KILLED_COMMIT_SCRIPT, str(held.pid), str(marker_dir), CID]
    commit = subprocess.Popen(argv, cwd=REPO)
    try:
        deadline = time.monotonic() + 60
        while process.state(commit.pid) != b"Z":
            assert time.monotonic() < deadline, "the commit never died"
            time.sleep(0.01)
        assert Freezer(container.path, container.version).is_frozen()
        assert thaw_abandoned(marker_dir) == [container.path]
        assert grows(counter)
    finally:
        assert commit.wait(timeout=60) == -signal.SIGKILL


@pytest.mark.parametrize("cgroup", VERSIONS, indirect=True)
def test_thaw_abandoned_leaves_a_live_commits_marker_and_freeze_alone(container: Cgroup, tmp_path: Path) -> None:
    counter, marker_dir = tmp_path / "counter", tmp_path / "markers"
    process = container.start_counter(counter)
    with paused(process.pid, marker_dir, label="web-1", container_id=CID) as freezer:
        assert freezer is not None
        [marker] = markers(marker_dir)
        assert thaw_abandoned(marker_dir) == []
        assert markers(marker_dir) == [marker]
        assert freezer.is_frozen()
        assert not grows(counter)
    assert grows(counter)


@pytest.mark.parametrize("cgroup", VERSIONS, indirect=True)
def test_thaw_abandoned_keeps_frozen_a_cgroup_a_live_commit_holds_too(container: Cgroup, tmp_path: Path) -> None:
    counter, marker_dir = tmp_path / "counter", tmp_path / "markers"
    process = container.start_counter(counter)
    with paused(process.pid, marker_dir, label="web-1", container_id=CID) as freezer:
        assert freezer is not None
        [live] = markers(marker_dir)
        dead = marker_dir / f"0-dead{MARKER_SUFFIX}"
        write_marker(
            dead,
            **json.loads(live.read_text()) | {"owner_pid": dead_pid(), "owner_start": None},
        )
        assert thaw_abandoned(marker_dir) == []
        assert markers(marker_dir) == [live]  # the dead commit's marker is gone, the live one's kept
        assert freezer.is_frozen()


@pytest.mark.parametrize("cgroup", VERSIONS, indirect=True)
def test_thaw_abandoned_never_thaws_a_cgroup_a_marker_does_not_prove_the_commit_froze(
    container: Cgroup, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A marker without the container's id and the cgroup's inode (hand-written, or from before they were recorded,
    # when a container paused already got one too): the cgroup may well be frozen by its engine.
    marker_dir = tmp_path / "markers"
    process = container.start_sleeper()
    container.freeze_directly()
    marker = marker_dir / f"1-2-abcd{MARKER_SUFFIX}"
    common = {"version": container.version, "pid": process.pid, "label": "web-1", "owner_pid": dead_pid()}
    write_marker(marker, cgroup=str(container.path), **common)
    with FreezerWatch(container) as watch, caplog.at_level(logging.WARNING, logger="pipeline.host.freezer"):
        assert thaw_abandoned(marker_dir) == []
    assert watch.states == {"FROZEN"} and container.freezer_state() == "FROZEN"
    assert not marker.exists()
    [warning] = freezer_log(caplog)
    assert f"container web-1: not thawing {container.path}" in warning
    assert "does not record which container's cgroup was frozen" in warning


@pytest.mark.parametrize("cgroup", VERSIONS, indirect=True)
def test_thaw_abandoned_never_thaws_a_newer_cgroup_at_the_frozen_ones_path(
    cgroup: Cgroup, container: Cgroup, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    marker_dir = tmp_path / "markers"
    commit_pid = kill_commit_while_frozen(container.start_sleeper().pid, marker_dir)
    assert container.freezer_state() == "FROZEN"
    # The container is removed and one with its id made again (a restart), then paused by its engine.
    container.remove()
    cgroup.children.remove(container)
    again = cgroup.child(CID)
    again.start_sleeper()
    again.freeze_directly()
    with FreezerWatch(again) as watch, caplog.at_level(logging.WARNING, logger="pipeline.host.freezer"):
        assert thaw_abandoned(marker_dir) == []
    assert watch.states == {"FROZEN"} and again.freezer_state() == "FROZEN"
    assert markers(marker_dir) == []
    [warning] = freezer_log(caplog)
    assert f"not thawing {again.path}, named by the marker of commit process {commit_pid}" in warning
    assert "newer cgroup at that path" in warning


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
    with caplog.at_level(logging.WARNING, logger="pipeline.host.freezer"):
        assert thaw_abandoned(marker_dir) == []
    assert markers(marker_dir) == []
    assert unrelated.exists()
    warned = [r.getMessage() for r in caplog.records if r.name == "pipeline.host.freezer"]
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
    with pytest.raises(FreezerError, match="not a cgroup v2"):
        Freezer(tmp_path, 2).thaw()
    assert list(tmp_path.iterdir()) == []


def test_freeze_waits_then_thaws_and_fails_when_the_cgroup_never_reports_frozen(tmp_path: Path) -> None:
    # A stand-in v2 cgroup whose processes never finish freezing: cgroup.events keeps saying "frozen 0".
    (tmp_path / "cgroup.freeze").write_text("0")
    (tmp_path / "cgroup.events").write_text("populated 1\nfrozen 0\n")
    started = time.monotonic()
    with pytest.raises(FreezerError, match=f"{tmp_path}: the cgroup's processes did not all freeze within 0.3 s"):
        Freezer(tmp_path, 2).freeze(timeout=0.3)
    assert time.monotonic() - started >= 0.3
    assert (tmp_path / "cgroup.freeze").read_text() == "0"  # not left half-frozen

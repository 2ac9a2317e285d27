"""A commit freezes only its container's own cgroup, and never thaws a cgroup it did not freeze (issue 11).

The commits run the command line on the demo rocker storage, whose config.json the test sets to say the container
runs with a given pid: a real process in a real, temporary cgroup (tests/support/cgroups.py). The container's own
cgroup is named after its id as docker's cgroupfs driver names it (`<parent>/<id>`); the unrelated process's cgroup
is not.
A thread samples the cgroup's freezer state for the whole commit, so even a freeze and thaw in between is seen.
"""

from __future__ import annotations

import hashlib
import json
import logging
import signal
from pathlib import Path
from typing import Any

import pytest

from pipeline.demo import build_sample_storage
from pipeline.engines.rocker import RockerStorage
from pipeline.host.freezer import Freezer, container_cgroup_names, find_freezer, locate_freezer, paused
from tests.support.cgroups import VERSIONS, Cgroup, FreezerWatch, grows
from tests.support.cli import (
    CONTAINER_LAYER_PACK,
    commit_args,
    resume,
    run_luigi,
    start_commit_stopped_at_container_layer,
)
from tests.support.dockerd import Dockerd

# Reached inside the pause, just before the container's own layer is packed.
DEMO_CONTAINER_ID = hashlib.sha256(b"pipeline demo container").hexdigest()  # the id pipeline.demo gives it


def _storage(tmp_path: Path, state: dict[str, Any]) -> tuple[Path, str]:
    root = tmp_path / "storage"
    cid = build_sample_storage(root)
    assert cid == DEMO_CONTAINER_ID
    config_path = root / "containers" / cid / "config.json"
    config = json.loads(config_path.read_text())
    config["State"] = state
    config_path.write_text(json.dumps(config))
    return root, cid


def _freezer_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "pipeline.host.freezer" in line or "container demo-web" in line]


@pytest.mark.parametrize("cgroup", VERSIONS, indirect=True)
def test_commit_never_freezes_an_unrelated_process_given_as_the_containers_pid(cgroup: Cgroup, tmp_path: Path) -> None:
    # State.Pid names a live process that is not the container's (a number reused since, or a forged record).
    counter = tmp_path / "counter"
    unrelated = cgroup.start_counter(counter)
    root, cid = _storage(tmp_path, {"Running": True, "Pid": unrelated.pid})
    with FreezerWatch(cgroup) as watch:
        commit = start_commit_stopped_at_container_layer(commit_args(root, tmp_path, "--id", cid))
        try:
            assert cgroup.freezer_state() == "THAWED"
            assert grows(counter)
        finally:
            resume(commit.pid)
        _, stderr = commit.communicate(timeout=120)
    assert commit.returncode == 0, stderr
    assert watch.states == {"THAWED"}
    [warning] = [line for line in stderr.splitlines() if "not freezing it" in line]
    assert f"container demo-web ({cid[:12]}) (pid {unrelated.pid}): not freezing it:" in warning
    assert f"/{cgroup.path.name} is not named after the container" in warning
    assert "proceeds unpaused" in warning
    assert not list((tmp_path / "cache" / "freezer").glob("*"))


@pytest.mark.parametrize("cgroup", VERSIONS, indirect=True)
@pytest.mark.parametrize(
    "recorded",
    [
        # The engine's record says paused (rocker's State.Paused, as docker's): the reader reports it not running.
        {"Running": True, "Paused": True},
        # The record says running (stale, or frozen by another tool or commit): the cgroup itself says frozen.
        {"Running": True},
    ],
    ids=["recorded-paused", "recorded-running"],
)
def test_commit_of_a_container_paused_before_leaves_it_paused(
    cgroup: Cgroup, recorded: dict[str, Any], tmp_path: Path
) -> None:
    container = cgroup.child(DEMO_CONTAINER_ID)
    counter = tmp_path / "counter"
    process = container.start_counter(counter)
    container.freeze_directly()
    root, cid = _storage(tmp_path, recorded | {"Pid": process.pid})
    with FreezerWatch(container) as watch:
        commit = start_commit_stopped_at_container_layer(commit_args(root, tmp_path, "--id", cid))
        try:
            assert container.freezer_state() == "FROZEN"
        finally:
            resume(commit.pid)
        _, stderr = commit.communicate(timeout=120)
    assert commit.returncode == 0, stderr
    assert watch.states == {"FROZEN"}  # never thawed, not even for a moment
    assert container.freezer_state() == "FROZEN" and not grows(counter)
    assert not list((tmp_path / "cache" / "freezer").glob("*"))
    if "Paused" not in recorded:
        [line] = _freezer_lines(stderr)
        assert f"(pid {process.pid}): already paused ({container.path} is frozen" in line


@pytest.mark.parametrize("cgroup", VERSIONS, indirect=True)
def test_commit_killed_while_packing_a_paused_container_leaves_it_paused(cgroup: Cgroup, tmp_path: Path) -> None:
    # No freeze of ours, so no marker: the next commit finds nothing to thaw.
    container = cgroup.child(DEMO_CONTAINER_ID)
    process = container.start_sleeper()
    container.freeze_directly()
    root, cid = _storage(tmp_path, {"Running": True, "Pid": process.pid})
    args = commit_args(root, tmp_path, "--id", cid)
    with FreezerWatch(container) as watch:
        killed = run_luigi(*args, env={"PIPELINE_FAILPOINTS": CONTAINER_LAYER_PACK})
        assert killed.returncode == -signal.SIGKILL
        assert not list((tmp_path / "cache" / "freezer").glob("*"))
        rerun = run_luigi(*args)
    assert rerun.returncode == 0, rerun.stderr
    assert "already paused" in rerun.stderr and "left frozen by commit process" not in rerun.stderr
    assert watch.states == {"FROZEN"} and container.freezer_state() == "FROZEN"


def test_rocker_container_recorded_paused_is_not_treated_as_running(tmp_path: Path) -> None:
    # rocker's State is moby's: `rocker stop` sets Paused and leaves Running true (container/utils.go).
    root, cid = _storage(tmp_path, {"Running": True, "Paused": True, "Pid": 4242})
    container = RockerStorage(root).read_container(cid)
    assert (container.running, container.pid) == (False, 4242)


# --- a real Docker Engine ---------------------------------------------------------------------------------------


@pytest.mark.docker
def test_real_docker_containers_cgroup_is_frozen_and_a_paused_one_never_thawed(
    dockerd: Dockerd, busybox_image: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # `docker commit` of a paused container from the command line is test_docker_engine.py's
    # test_commit_of_a_paused_container_leaves_it_paused; this drives the freezer itself, past the reader's State.
    name = "pipeline-freezer-ownership"
    dockerd.run("run", "--detach", "--network", "none", "--name", name, busybox_image, "sleep", "100000")
    try:
        cid, pid_text = dockerd.run("inspect", "--format", "{{.Id}} {{.State.Pid}}", name).split()
        pid = int(pid_text)
        found = locate_freezer(pid, cid)
        assert isinstance(found, Freezer), found
        assert found.path.name in container_cgroup_names(cid)  # /docker/<id> (cgroupfs) or docker-<id>.scope
        other = hashlib.sha256(b"another container").hexdigest()
        assert find_freezer(pid, other) is None  # its pid given for another container: not that one's cgroup

        dockerd.run("pause", name)
        assert found.is_frozen()
        with caplog.at_level(logging.WARNING, logger="pipeline.host.freezer"):
            with paused(pid, tmp_path / "markers", label=name, container_id=cid) as froze:
                assert froze is None
        assert found.is_frozen()
        assert dockerd.run("inspect", "--format", "{{.State.Status}}", name).strip() == "paused"
        assert [r.getMessage() for r in caplog.records if "already paused" in r.getMessage()]
        assert not list((tmp_path / "markers").glob("*"))
        dockerd.run("unpause", name)
        assert not found.is_frozen()
    finally:
        dockerd.attempt("rm", "--force", name)

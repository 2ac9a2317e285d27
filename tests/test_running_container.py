"""A running container is frozen through its cgroup while its layer is packed, and always thawed after."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.demo import build_sample_storage
from pipeline.host.freezer import Freezer
from tests.support.cgroups import VERSIONS, Cgroup, grows
from tests.support.cli import (
    CONTAINER_LAYER_PACK,
    REPO,
    commit_args,
    resume,
    run_luigi,
    start_commit_stopped_at_container_layer,
)

# The id pipeline.demo gives its container: only a cgroup named after it is ever frozen (pipeline.host.freezer).
DEMO_CONTAINER_ID = hashlib.sha256(b"pipeline demo container").hexdigest()


def _running_storage(tmp_path: Path, pid: int) -> tuple[Path, str]:
    root = tmp_path / "storage"
    cid = build_sample_storage(root)
    assert cid == DEMO_CONTAINER_ID
    config_path = root / "containers" / cid / "config.json"
    config = json.loads(config_path.read_text())
    config["State"] = {"Running": True, "Pid": pid}
    config_path.write_text(json.dumps(config))
    return root, cid


@pytest.mark.parametrize("cgroup", VERSIONS, indirect=True)
def test_running_container_is_frozen_while_its_layer_is_packed(cgroup: Cgroup, tmp_path: Path) -> None:
    cgroup = cgroup.child(DEMO_CONTAINER_ID)  # the container's own cgroup, as docker's /docker/<id>
    counter = tmp_path / "counter"
    container = cgroup.start_counter(counter)
    root, cid = _running_storage(tmp_path, container.pid)
    commit = start_commit_stopped_at_container_layer(commit_args(root, tmp_path, "--id", cid))
    try:
        assert Freezer(cgroup.path, cgroup.version).is_frozen()
        assert not grows(counter)
    finally:
        resume(commit.pid)
    _, stderr = commit.communicate(timeout=120)
    assert commit.returncode == 0, stderr
    assert not Freezer(cgroup.path, cgroup.version).is_frozen()
    assert grows(counter)
    assert list((tmp_path / "cache" / "freezer").iterdir()) == []


@pytest.mark.parametrize("cgroup", VERSIONS, indirect=True)
def test_pause_false_leaves_the_container_running(cgroup: Cgroup, tmp_path: Path) -> None:
    cgroup = cgroup.child(DEMO_CONTAINER_ID)  # the container's own cgroup, as docker's /docker/<id>
    counter = tmp_path / "counter"
    container = cgroup.start_counter(counter)
    root, cid = _running_storage(tmp_path, container.pid)
    commit = start_commit_stopped_at_container_layer(commit_args(root, tmp_path, "--id", cid, "--pause", "false"))
    try:
        assert not Freezer(cgroup.path, cgroup.version).is_frozen()
        assert grows(counter)
    finally:
        resume(commit.pid)
    commit.communicate(timeout=120)
    assert commit.returncode == 0


@pytest.mark.parametrize("cgroup", VERSIONS, indirect=True)
def test_commit_killed_while_frozen_is_thawed_by_the_next_run(cgroup: Cgroup, tmp_path: Path) -> None:
    cgroup = cgroup.child(DEMO_CONTAINER_ID)  # the container's own cgroup, as docker's /docker/<id>
    counter = tmp_path / "counter"
    container = cgroup.start_counter(counter)
    root, cid = _running_storage(tmp_path, container.pid)
    args = commit_args(root, tmp_path, "--id", cid)
    killed = run_luigi(*args, env={"PIPELINE_FAILPOINTS": CONTAINER_LAYER_PACK})
    assert killed.returncode == -9
    assert Freezer(cgroup.path, cgroup.version).is_frozen() and not grows(counter)
    assert len(list((tmp_path / "cache" / "freezer").iterdir())) == 1
    rerun = run_luigi(*args)
    assert rerun.returncode == 0, rerun.stderr
    assert "left frozen by commit process" in rerun.stderr
    assert not Freezer(cgroup.path, cgroup.version).is_frozen() and grows(counter)


@pytest.mark.parametrize("cgroup", VERSIONS, indirect=True)
def test_documented_command_thaws_after_a_killed_commit(cgroup: Cgroup, tmp_path: Path) -> None:
    cgroup = cgroup.child(DEMO_CONTAINER_ID)  # the container's own cgroup, as docker's /docker/<id>
    counter = tmp_path / "counter"
    container = cgroup.start_counter(counter)
    root, cid = _running_storage(tmp_path, container.pid)
    assert run_luigi(*commit_args(root, tmp_path, "--id", cid), env={"PIPELINE_FAILPOINTS": CONTAINER_LAYER_PACK})
    assert Freezer(cgroup.path, cgroup.version).is_frozen()
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "thaw", str(tmp_path / "cache" / "freezer")],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0 and "thawed 1 cgroup(s)" in result.stdout, result.stderr
    assert grows(counter)


def test_container_that_is_no_longer_running_is_committed_with_a_warning(tmp_path: Path) -> None:
    process = subprocess.Popen(["true"])
    process.wait()
    root, cid = _running_storage(tmp_path, process.pid)
    result = run_luigi(*commit_args(root, tmp_path, "--id", cid))
    assert result.returncode == 0
    assert "proceeds unpaused" in result.stderr

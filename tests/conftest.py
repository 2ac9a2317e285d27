"""Shared fixtures: the root requirement and helpers to read the layer tars the pipeline writes."""

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from pipeline.demo import build_sample_storage

if TYPE_CHECKING:
    from tests.cgroups import Cgroup

IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root (device nodes, trusted.* xattrs, overlay mounts)")
TOOLS = ("skopeo", "umoci", "podman")
needs_tools = pytest.mark.skipif(
    not all(shutil.which(t) for t in TOOLS), reason=f"needs {', '.join(TOOLS)} (./dev setup installs them as root)"
)


@pytest.fixture
def cgroup(request: pytest.FixtureRequest) -> Iterator["Cgroup"]:
    """A temporary real cgroup of the version given by indirect parametrization (tests.cgroups.VERSIONS)."""
    from tests.cgroups import Cgroup, cgroup_mount

    version: int = request.param
    mount = cgroup_mount(version)
    assert mount is not None
    group = Cgroup(mount / f"pipeline-test-{os.getpid()}-{uuid.uuid4().hex[:8]}", version)
    group.path.mkdir()
    try:
        yield group
    finally:
        group.remove()


# --- a private Docker Engine (tests/dockerd.py), one for the whole session ---------------------------------------


@pytest.fixture(scope="session")
def dockerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator["Dockerd"]:
    """A private offline dockerd, started once per session and always stopped at its end (even after failures)."""
    from tests.dockerd import docker_missing_reason, start_dockerd

    if (reason := docker_missing_reason()) is not None:
        pytest.skip(reason)
    daemon = start_dockerd(tmp_path_factory.mktemp("dockerd"))
    try:
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture(scope="session")
def busybox_image(dockerd: "Dockerd") -> str:
    """pipeline-test/busybox:latest imported into the session's dockerd (one layer, made offline)."""
    from tests.dockerd import import_busybox

    ref = "pipeline-test/busybox:latest"
    import_busybox(dockerd, ref)
    return ref


if TYPE_CHECKING:
    from tests.dockerd import Dockerd


@pytest.fixture(scope="session")
def pristine_sample(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The demo's rocker storage (pipeline.demo), built once per session; tests take copies (sample_storage)."""
    root = tmp_path_factory.mktemp("pristine") / "storage"
    return root, build_sample_storage(root)


@pytest.fixture
def sample_storage(pristine_sample: tuple[Path, str], tmp_path: Path) -> tuple[Path, str]:
    """A private copy of the demo's rocker storage under tmp_path/storage, and its container id."""
    root = tmp_path / "storage"
    # cp -a keeps what copytree cannot: whiteout devices and trusted.* xattrs.
    subprocess.run(["cp", "-a", str(pristine_sample[0]), str(root)], check=True)
    return root, pristine_sample[1]

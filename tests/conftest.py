"""Shared fixtures, and the hook that skips (with the reason) a test whose markers ask for what this host lacks."""

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from pipeline.demo import build_sample_storage
from tests.support.dockerd import docker_missing_reason
from tests.support.overlay_storage import requires_root_reason

if TYPE_CHECKING:
    from tests.support.cgroups import Cgroup

IS_ROOT = os.geteuid() == 0
TOOLS = ("skopeo", "umoci", "podman")  # what @pytest.mark.tools without arguments needs
DEV_TOOLS = (*TOOLS, "docker-registry", "promtool", "prometheus-node-exporter")  # what ./dev setup installs


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Skip, with the reason, a test whose markers (declared in pyproject.toml) ask for what this host lacks.

    Runs before the test's fixtures are set up, so a skipped test never builds overlay storage or starts dockerd.
    """
    if item.get_closest_marker("root") is not None and not IS_ROOT:
        pytest.skip("needs root (device nodes, trusted.* xattrs, overlay mounts)")
    if item.get_closest_marker("overlay") is not None and (reason := requires_root_reason()) is not None:
        pytest.skip(reason)
    for marker in item.iter_markers("tools"):
        missing = [tool for tool in marker.args or TOOLS if shutil.which(tool) is None]
        if missing:
            pytest.skip(f"needs {', '.join(missing)} on PATH (./dev setup installs {', '.join(DEV_TOOLS)} as root)")
    if item.get_closest_marker("docker") is not None and (reason := docker_missing_reason()) is not None:
        pytest.skip(reason)


@pytest.fixture
def cgroup(request: pytest.FixtureRequest) -> Iterator["Cgroup"]:
    """A temporary real cgroup of the version given by indirect parametrization (tests.support.cgroups.VERSIONS)."""
    from tests.support.cgroups import Cgroup, cgroup_mount

    version: int = request.param
    mount = cgroup_mount(version)
    assert mount is not None
    group = Cgroup(mount / f"pipeline-test-{os.getpid()}-{uuid.uuid4().hex[:8]}", version)
    group.path.mkdir()
    try:
        yield group
    finally:
        group.remove()


# --- a private Docker Engine (tests/support/dockerd.py), one for the whole session -------------------------------


@pytest.fixture(scope="session")
def dockerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator["Dockerd"]:
    """A private offline dockerd, started once per session and always stopped at its end (even after failures)."""
    from tests.support.dockerd import start_dockerd

    daemon = start_dockerd(tmp_path_factory.mktemp("dockerd"))
    try:
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture(scope="session")
def busybox_image(dockerd: "Dockerd") -> str:
    """pipeline-test/busybox:latest imported into the session's dockerd (one layer, made offline)."""
    from tests.support.dockerd import import_busybox

    ref = "pipeline-test/busybox:latest"
    import_busybox(dockerd, ref)
    return ref


if TYPE_CHECKING:
    from tests.support.dockerd import Dockerd


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

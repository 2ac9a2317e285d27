"""Shared fixtures: the root requirement and helpers to read the layer tars the pipeline writes."""

import os
import shutil
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

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

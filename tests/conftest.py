"""Shared fixtures: the root requirement and helpers to read the layer tars the pipeline writes."""

import os
import shutil

import pytest

IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root (device nodes, trusted.* xattrs, overlay mounts)")
TOOLS = ("skopeo", "umoci", "podman")
needs_tools = pytest.mark.skipif(
    not all(shutil.which(t) for t in TOOLS), reason=f"needs {', '.join(TOOLS)} (./dev setup installs them as root)"
)

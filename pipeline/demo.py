"""Builds a small sample rocker storage (real overlay whiteouts when run as root) and commits it with luigi.

`python -m pipeline demo [DIR]` (what `./dev demo` runs); it prints where the archive is and how to load it.
"""

import hashlib
import json
import os
import shlex
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

_BASE = hashlib.sha256(b"pipeline demo base layer").hexdigest()
_CONTAINER = hashlib.sha256(b"pipeline demo container").hexdigest()
_IMAGE_ID = hashlib.sha256(b"pipeline demo image").hexdigest()


def build_sample_storage(root: Path) -> str:
    """Create rocker storage under root with one container over a one-layer image; return the container id."""
    base = root / "overlay2" / _BASE / "diff"
    layer = root / "overlay2" / _CONTAINER
    for path in (base, layer / "diff", layer / "work", layer / "merged", root / "containers" / _CONTAINER):
        path.mkdir(parents=True, exist_ok=True)
    _write(base / "etc/os-release", "NAME=demo\nVERSION=1\n")
    _write(base / "etc/motd", "welcome to the base image\n")
    _write(base / "usr/share/doc/demo/README", "docs that the container deletes\n")
    _write(base / "var/cache/app/old.dat", "stale cache the container replaces\n")
    _write(base / "bin/hello", "#!/bin/sh\necho hello from the committed image\n", mode=0o755)
    (layer / "lower").write_text(f"{_BASE}/diff")
    _change_container(base, layer)
    config = {
        "ID": _CONTAINER,
        "Name": "demo-web",
        "Created": "2026-01-01T00:00:00Z",
        "State": {"Running": False, "Pid": 0},
        "Config": {"Cmd": ["/bin/hello"], "Image": "demo-base:1.0"},
    }
    (root / "containers" / _CONTAINER / "config.json").write_text(json.dumps(config))
    store = root / "image" / "overlay2"
    _write(
        store / "repositories" / _IMAGE_ID,
        json.dumps(
            {
                "Repository": "demo-base",
                "Tag": "1.0",
                "ID": _IMAGE_ID,
                "image_layer_info": {"Layers": [{"Digest": f"sha256:{_BASE}"}]},
            }
        ),
    )
    _write(
        store / "imagedb" / "content" / "sha256" / _IMAGE_ID,
        json.dumps(
            {
                "architecture": "amd64",
                "os": "linux",
                "config": {"Env": ["PATH=/usr/bin:/bin"], "WorkingDir": "/", "Labels": {"demo": "yes"}},
            }
        ),
    )
    return _CONTAINER


def _change_container(base: Path, layer: Path) -> None:
    """The container's changes: through a real overlay mount as root, so whiteouts are the kernel's own."""
    if any((layer / "diff").iterdir()):
        return
    merged = layer / "merged"
    options = f"lowerdir={base},upperdir={layer / 'diff'},workdir={layer / 'work'}"
    mounted = (
        os.geteuid() == 0
        and subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o", options, str(merged)], capture_output=True
        ).returncode
        == 0
    )
    target = merged if mounted else layer / "diff"
    try:
        _write(target / "etc/motd", "changed inside the container\n")
        _write(target / "app/data.txt", "written by the container\n")
        if mounted:
            (target / "usr/share/doc/demo/README").unlink()
            for child in (target / "var/cache/app").iterdir():
                child.unlink()
            (target / "var/cache/app").rmdir()
            _write(target / "var/cache/app/new.dat", "fresh cache\n")
        else:
            # Without root there is no overlay mount; a 0/0 device is still a whiteout where the kernel allows it.
            try:
                (target / "usr/share/doc/demo").mkdir(parents=True, exist_ok=True)
                os.mknod(target / "usr/share/doc/demo/README", stat.S_IFCHR, os.makedev(0, 0))
            except PermissionError:
                pass
    finally:
        if mounted:
            subprocess.run(["umount", str(merged)], check=True)


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    workdir = Path(args[0] if args else "demo").resolve()
    root = workdir / "storage"
    container_id = build_sample_storage(root)
    output = workdir / "images" / "demo-web_latest.tar"
    command = [
        sys.executable,
        "-m",
        "luigi",
        "--module",
        "pipeline",
        "CommitImage",
        "--id",
        container_id[:12],
        "--image",
        "demo-web:latest",
        "--output",
        str(output),
        "--storage-root",
        str(root),
        "--commit-cache-dir",
        str(workdir / "cache"),
        "--local-scheduler",
    ]
    print("$ " + shlex.join(command), flush=True)
    with tempfile.TemporaryFile() as log:
        result = subprocess.run(command, stdout=log, stderr=log)
        if result.returncode != 0:
            log.seek(0)
            sys.stderr.buffer.write(log.read())
            print(f"commit failed (exit {result.returncode})", file=sys.stderr)
            return result.returncode
    print(f"image archive: {output} ({output.stat().st_size} bytes)")
    print(f"load it with:  docker load -i {output}   or   podman load -i {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A builder of Docker Engine overlay2 storage as dockerd lays it out, with real kernel overlay mounts for every layer.

On-disk format from moby (https://github.com/moby/moby): layer/filestore.go (layerdb/sha256/<chain-id>/{diff,size,
cache-id,parent}, layerdb/mounts/<container-id>/{mount-id,init-id,parent}), layer/layer_store.go (chain ids, the
"<mount-id>-init" layer), layer/layer.go (CreateChainID), daemon/graphdriver/overlay2/overlay.go (overlay2/<id>/{diff,
link,lower,work,committed}, overlay2/l/<short id> -> ../<id>/diff), daemon/initlayer/setup_unix.go (what the init
layer holds), container/container.go and container/state.go (containers/<id>/config.v2.json), image/fs.go
(imagedb/content/sha256/<image-id>, the id being the digest of the config). The file trees are those of
tests.support.overlay_storage's rocker builder, so both engines are checked against the same changes. Not written:
tar-split.json.gz, which nothing reads before tar-split reassembly (issue 6 part 3).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import secrets
import string
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pipeline.layer.writer import write_layer
from tests.support.overlay_storage import (
    CONTAINER_CMD,
    CONTAINER_ENV,
    CREATED,
    IMAGE_ENV,
    TreeView,
    _write_base,
    _write_container,
    _write_mid,
    overlay_mount,
    read_tree,
)

IMAGE_REFERENCE = "base:1.0"
# Files daemon/initlayer/setup_unix.go creates when the image lacks them (the base image has /etc/hostname and /dev).
INIT_FILES = (".dockerenv", "etc/resolv.conf", "etc/hosts", "dev/console", "dev/pts", "dev/shm", "proc", "sys")


@dataclass(frozen=True)
class DockerStorage:
    """A docker root with one container on a two-layer image, and the views of its file system."""

    root: Path  # holds containers/, image/overlay2/, overlay2/
    container_id: str
    mount_id: str  # the container's writable layer in overlay2/
    cache_ids: tuple[str, ...]  # the image layers in overlay2/, oldest first
    chain_ids: tuple[str, ...]  # "sha256:<hex>", oldest first
    image_id: str  # "sha256:<hex>"
    merged: TreeView  # what docker commit's image holds: the container layer over the image layers, no init layer
    running_view: TreeView  # what the container saw while running (the init layer's files included)


def _short_id() -> str:
    # overlay2's GenerateID: 26 characters of base32, used for the l/ symlinks that keep mount options short.
    return "".join(secrets.choice(string.ascii_uppercase + "234567") for _ in range(26))


def _diff_id(diff: Path) -> str:
    """The sha256 of a tar of the layer, as docker records in layerdb/sha256/<chain-id>/diff."""
    return write_layer(diff, io.BytesIO()).diff_id


def _size(diff: Path) -> int:
    """What ApplyDiff reports and layerdb keeps in size: the bytes of the layer's regular files."""
    return sum(p.lstat().st_size for p in diff.rglob("*") if p.is_file() and not p.is_symlink())


def _chain_id(parent: str | None, diff_id: str) -> str:
    # layer.go CreateChainID: the bottom layer's chain id is its diff id, then sha256("<parent chain> <diff id>").
    if parent is None:
        return diff_id
    return "sha256:" + hashlib.sha256(f"{parent} {diff_id}".encode()).hexdigest()


class _Overlay2:
    """overlay2/ as the graph driver writes it."""

    def __init__(self, home: Path) -> None:
        self.home = home
        (home / "l").mkdir(parents=True)

    def create(self, layer_id: str, parent: str | None) -> Path:
        layer = self.home / layer_id
        layer.mkdir()
        layer.chmod(0o710)
        (layer / "diff").mkdir()
        (layer / "diff").chmod(0o755)
        link = _short_id()
        os.symlink(f"../{layer_id}/diff", self.home / "l" / link)
        (layer / "link").write_text(link)
        if parent is None:
            return layer
        (layer / "work").mkdir()
        (layer / "work").chmod(0o700)
        (self.home / parent / "committed").write_bytes(b"")
        lowers = [f"l/{(self.home / parent / 'link').read_text()}"]
        if (self.home / parent / "lower").exists():
            lowers += (self.home / parent / "lower").read_text().split(":")
        (layer / "lower").write_text(":".join(lowers))
        return layer

    def lowers(self, layer_id: str) -> list[Path]:
        """The lower dirs of a layer, top first, through the l/ symlinks as the driver passes them to mount."""
        return [self.home / entry for entry in (self.home / layer_id / "lower").read_text().split(":")]

    @contextmanager
    def mount(self, layer_id: str) -> Iterator[Path]:
        """Get/Put: mount the layer at merged/, and remove merged/ again after unmounting, as Put does."""
        layer = self.home / layer_id
        (layer / "merged").mkdir(mode=0o700)
        with overlay_mount(self.lowers(layer_id), layer / "diff", layer / "work", layer / "merged") as merged:
            yield merged
        (layer / "merged").rmdir()


def _write_init_layer(merged: Path) -> None:
    """daemon/initlayer/setup_unix.go: mount points and files the daemon bind-mounts over, created if missing."""
    for name in INIT_FILES:
        path = merged / name
        if path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        if name in ("dev/pts", "dev/shm", "proc", "sys"):
            path.mkdir(mode=0o755)
        else:
            path.write_bytes(b"")
            path.chmod(0o755)
    if not (merged / "etc/mtab").exists():
        os.symlink("/proc/mounts", merged / "etc/mtab")


def _write(path: Path, data: bytes | str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    path.chmod(mode)


def build_docker_storage(root: Path, *, name: str = "web-1") -> DockerStorage:
    """Build dockerd's overlay2 storage under root: a two-layer image, the init layer and one changed container."""
    container_id = hashlib.sha256(f"docker-test container {name}".encode()).hexdigest()
    mount_id = secrets.token_hex(32)
    base_id, mid_id = secrets.token_hex(32), secrets.token_hex(32)
    drivers = _Overlay2(root / "overlay2")

    base = drivers.create(base_id, None)
    (base / "diff").rmdir()  # the rocker builder's writer makes diff/ itself, with an explicit mode
    _write_base(base / "diff")
    drivers.create(mid_id, base_id)
    with drivers.mount(mid_id) as merged:
        _write_mid(merged)
    drivers.create(f"{mount_id}-init", mid_id)
    with drivers.mount(f"{mount_id}-init") as merged:
        _write_init_layer(merged)
    drivers.create(mount_id, f"{mount_id}-init")
    with drivers.mount(mount_id) as merged:
        _write_container(merged)
        running_view = read_tree(merged)
    # The image docker commit writes: the writable layer over the image layers, the init layer left out. An overlay
    # with an empty upper dir shows exactly its lower dirs.
    with tempfile.TemporaryDirectory(prefix="docker-commit-view-") as tmp:
        for sub in ("upper", "work", "merged"):
            (Path(tmp) / sub).mkdir()
        lowers = [root / "overlay2" / layer_id / "diff" for layer_id in (mount_id, mid_id, base_id)]
        with overlay_mount(lowers, Path(tmp, "upper"), Path(tmp, "work"), Path(tmp, "merged")) as view:
            merged_view = read_tree(view)

    layerdb = root / "image/overlay2/layerdb"
    diff_ids, chain_ids, parent = [], [], None
    for cache_id in (base_id, mid_id):
        diff_id = _diff_id(root / "overlay2" / cache_id / "diff")
        chain_id = _chain_id(parent, diff_id)
        meta = layerdb / "sha256" / chain_id.removeprefix("sha256:")
        meta.mkdir(parents=True)
        _write(meta / "diff", diff_id)
        _write(meta / "cache-id", cache_id)
        _write(meta / "size", str(_size(root / "overlay2" / cache_id / "diff")))
        if parent is not None:
            _write(meta / "parent", parent)
        diff_ids.append(diff_id)
        chain_ids.append(chain_id)
        parent = chain_id
    mounts = layerdb / "mounts" / container_id
    _write(mounts / "mount-id", mount_id)
    _write(mounts / "init-id", f"{mount_id}-init")
    _write(mounts / "parent", chain_ids[-1])

    image_config = {
        "architecture": "amd64",
        "os": "linux",
        "created": CREATED,
        "config": {
            "Env": IMAGE_ENV,
            "Entrypoint": ["/bin/busybox"],
            "Cmd": ["sh"],
            "WorkingDir": "/opt/app",
            "User": "0:0",
            "ExposedPorts": {"8080/tcp": {}},
            "Labels": {"org.opencontainers.image.title": "base", "quoted": 'say "hi" \\ bye'},
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created": CREATED, "created_by": f"layer {i}"} for i in range(len(diff_ids))],
    }
    config_bytes = json.dumps(image_config).encode()
    image_hex = hashlib.sha256(config_bytes).hexdigest()
    _write(root / "image/overlay2/imagedb/content/sha256" / image_hex, config_bytes, 0o600)
    _write(
        root / "image/overlay2/repositories.json",
        json.dumps({"Repositories": {"base": {IMAGE_REFERENCE: f"sha256:{image_hex}"}}}),
    )
    _write_container_config(root, container_id, name, f"sha256:{image_hex}")
    return DockerStorage(
        root=root,
        container_id=container_id,
        mount_id=mount_id,
        cache_ids=(base_id, mid_id),
        chain_ids=tuple(chain_ids),
        image_id=f"sha256:{image_hex}",
        merged=merged_view,
        running_view=running_view,
    )


def _write_container_config(root: Path, container_id: str, name: str, image_id: str) -> None:
    """containers/<id>/config.v2.json as container.go's toDisk writes it; Config already holds the image's defaults,
    merged in by docker create, as docker commit expects."""
    directory = root / "containers" / container_id
    zero_time = "0001-01-01T00:00:00Z"
    doc = {
        "StreamConfig": {},
        "State": {
            "Running": False,
            "Paused": False,
            "Restarting": False,
            "OOMKilled": False,
            "RemovalInProgress": False,
            "Dead": False,
            "Pid": 0,
            "ExitCode": 0,
            "Error": "",
            "StartedAt": zero_time,
            "FinishedAt": zero_time,
            "Health": None,
        },
        "ID": container_id,
        "Created": CREATED,
        "Managed": False,
        "Path": "/bin/busybox",
        "Args": CONTAINER_CMD,
        "Config": {
            "Hostname": container_id[:12],
            "Domainname": "",
            "User": "0:0",
            "AttachStdin": False,
            "AttachStdout": True,
            "AttachStderr": True,
            "ExposedPorts": {"8080/tcp": {}, "9090/udp": {}},
            "Tty": False,
            "OpenStdin": False,
            "StdinOnce": False,
            "Env": CONTAINER_ENV,
            "Cmd": CONTAINER_CMD,
            "Image": IMAGE_REFERENCE,
            "Volumes": None,
            "WorkingDir": "/opt/app",
            "Entrypoint": ["/bin/busybox"],
            "OnBuild": None,
            "Labels": {"org.opencontainers.image.title": "base", "quoted": 'say "hi" \\ bye', "role": "web"},
            "StopSignal": "SIGQUIT",
        },
        "Image": image_id,
        "NetworkSettings": {"Bridge": "", "SandboxID": "", "Ports": {}, "Networks": {}},
        "LogPath": str(directory / f"{container_id}-json.log"),
        "Name": f"/{name}",
        "Driver": "overlay2",
        "OS": "linux",
        "MountLabel": "",
        "ProcessLabel": "",
        "RestartCount": 0,
        "HasBeenStartedBefore": False,
        "HasBeenManuallyStopped": False,
        "MountPoints": {},
        "SecretReferences": None,
        "ConfigReferences": None,
        "AppArmorProfile": "",
        "HostnamePath": str(directory / "hostname"),
        "HostsPath": str(directory / "hosts"),
        "ShmPath": "",
        "ResolvConfPath": str(directory / "resolv.conf"),
        "SeccompProfile": "",
        "NoNewPrivileges": False,
    }
    _write(directory / "config.v2.json", json.dumps(doc) + "\n", 0o600)
    _write(directory / "hostconfig.json", json.dumps({"NetworkMode": "bridge", "RestartPolicy": {"Name": "no"}}), 0o600)
    _write(directory / "hostname", container_id[:12] + "\n")
    _write(directory / "hosts", "127.0.0.1\tlocalhost\n")
    _write(directory / "resolv.conf", "nameserver 127.0.0.11\n")

"""The docker reader against a real Docker Engine (a private, offline dockerd: tests/support/dockerd.py), and every
archive the pipeline writes loaded back into it.

A container is changed by real `docker exec`s (the kernel's own whiteouts, opaque directory, copy-ups and
hardlinks in dockerd's overlay2 storage), committed with the command line, `docker load`ed, and a container
created from the loaded image must `docker export` the same files as the original container.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import stat
import struct
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.cli import commit_args, error_lines, run_luigi, tree_fingerprint
from tests.support.dockerd import Dockerd
from tests.support.imagecheck import XATTR_PAX_PREFIX, compare_trees, read_archive_manifest
from tests.support.overlay_storage import Entry, TreeView, is_image_xattr

pytestmark = pytest.mark.docker

CMD = ("sleep", "100000")
XATTR, XATTR_VALUE = "user.pipeline", b"set from the host"
# A VFS_CAP_REVISION_2 file capability: cap_net_bind_service (bit 10) permitted and effective.
CAPABILITY = struct.pack("<5I", 0x02000001, 1 << 10, 0, 0, 0)

# What docker itself puts into every container, from the init layer it mounts under the container's own layer
# (daemon/initlayer, daemon/graphdriver/overlay2: "<mount-id>-init") or as mount points: neither `docker commit`
# nor the pipeline puts it into an image, and a container created from the loaded image gets it anew. The init
# layer's etc/mtab symlink comes back even where the original container deleted it, so it is ignored too.
DOCKER_INJECTED = frozenset({b".dockerenv", b"etc/hosts", b"etc/hostname", b"etc/resolv.conf", b"etc/mtab"})
DOCKER_MOUNT_POINTS = frozenset({b"dev", b"proc", b"sys"})  # and everything below them

# The base image's second and third layers, built with COPY only (the legacy builder, no RUN: nothing to pull).
DOCKERFILE = b"""\
FROM pipeline-test/busybox:latest
COPY opt /opt
COPY --chown=1000:1000 srv /srv
ENV GREETING=hello PATH=/bin
WORKDIR /srv
LABEL org.example.test=docker-engine
"""
CONTEXT_FILES = {
    "opt/app/a.txt": b"a\n",
    "opt/app/sub/b.txt": b"b\n",
    "opt/keepdir/k.txt": b"k\n",
    "opt/file": b"a file that becomes a directory\n",
    "srv/keep.txt": b"kept\n",
    "srv/gone.txt": b"deleted by the container\n",
}
# What the container does to the image: every kind of change overlay records in the container's layer, and names
# and ids that need PAX records (a path over 100 bytes, a non-UTF-8 name, an id over 2097151).
LONG_DIR = "/deep/" + "a" * 60 + "/" + "b" * 60
CHANGES = rf"""
set -e
echo new > /new.txt
rm /srv/gone.txt
rm /etc/group
rm -rf /opt/app && mkdir /opt/app && echo replaced > /opt/app/x
rm /opt/file && mkdir /opt/file && echo inside > /opt/file/y
mv /opt/keepdir /opt/moved
mkdir -p /data/sub && echo linked > /data/sub/f && ln /data/sub/f /data/hard
ln -s ../srv/keep.txt /data/sym && ln -s /nowhere /data/dangling
touch /data/suid && chmod 4755 /data/suid && chmod 2750 /data/sub
mkdir /data/sticky && chmod 1777 /data/sticky
chmod 600 /srv/keep.txt
chown -h 1234:5678 /srv/link
chown 4321:8765 /new.txt
mkfifo /data/fifo
mknod /data/null c 1 3
echo 'app:x:1000:1000::/srv:/bin/sh' >> /etc/passwd
ln /srv/keep.txt /srv/hardlink-to-lower
mkdir -p {LONG_DIR} && echo long > {LONG_DIR}/"$(printf 'caf\351-%0150d' 0)"
touch "/$(printf 'caf\351')" "/with space" /capability
mkdir /big-ids && chown 3000000:3000000 /big-ids
"""
# /etc itself cannot be replaced by an opaque directory in a running container: docker bind-mounts etc/hosts,
# etc/hostname and etc/resolv.conf into it, so `rm -rf /etc` fails with EBUSY. /opt/app is replaced instead.


@dataclass(frozen=True)
class ChangedContainer:
    name: str
    base: str  # the image it runs
    export: TreeView  # `docker export` of the container, docker's injected files left out
    upper: Path  # its layer's diff/ in dockerd's storage


@dataclass(frozen=True)
class Loaded:
    view: TreeView  # `docker export` of a container created from the loaded image
    inspect: dict[str, Any]
    history: list[str]  # `docker history` rows: ID|CreatedBy|Comment


# --- helpers ------------------------------------------------------------------------------------------------------


def _context_tar() -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        files = {"Dockerfile": DOCKERFILE, **CONTEXT_FILES}
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("srv/link")
        link.type, link.linkname, link.mtime = tarfile.SYMTYPE, "keep.txt", 1_700_000_000
        tar.addfile(link)
    return out.getvalue()


def _injected(path: bytes) -> bool:
    return path in DOCKER_INJECTED or path.split(b"/")[0] in DOCKER_MOUNT_POINTS


def export_view(d: Dockerd, container: str, work: Path) -> TreeView:
    """`docker export` of a container as a TreeView (hardlink entries resolved to their target's fields and
    grouped), without what docker injects into every container."""
    work.mkdir(parents=True, exist_ok=True)
    exported = work / f"{container}.export.tar"
    d.run("export", "-o", str(exported), container)
    entries: dict[bytes, Entry] = {}
    groups: dict[bytes, set[bytes]] = {}
    with tarfile.open(exported, "r:") as tar:
        for member in tar:
            path = os.fsencode(member.name).strip(b"/").removeprefix(b"./")
            if not path or path == b"." or _injected(path):
                continue
            if member.islnk():
                target = os.fsencode(member.linkname).strip(b"/").removeprefix(b"./")
                entries[path] = entries[target]
                groups.setdefault(target, {target}).add(path)
                continue
            entries[path] = _entry(tar, member)
    hardlinks = frozenset(frozenset(g) for g in groups.values())
    return TreeView(entries=dict(sorted(entries.items())), hardlinks=hardlinks)


def _entry(tar: tarfile.TarFile, member: tarfile.TarInfo) -> Entry:
    kinds = {
        tarfile.REGTYPE: "file", tarfile.AREGTYPE: "file", tarfile.DIRTYPE: "dir", tarfile.SYMTYPE: "symlink",
        tarfile.FIFOTYPE: "fifo", tarfile.CHRTYPE: "char", tarfile.BLKTYPE: "block",
    }  # fmt: skip
    kind = kinds[member.type]
    sha256 = ""
    if kind == "file":
        source = tar.extractfile(member)
        assert source is not None
        digest = hashlib.sha256()
        while chunk := source.read(1 << 20):
            digest.update(chunk)
        sha256 = digest.hexdigest()
    xattrs = sorted(
        (key.removeprefix(XATTR_PAX_PREFIX), value.encode("utf-8", "surrogateescape"))
        for key, value in member.pax_headers.items()
        if key.startswith(XATTR_PAX_PREFIX) and is_image_xattr(key.removeprefix(XATTR_PAX_PREFIX))
    )
    return Entry(
        kind=kind,
        mode=0 if kind == "symlink" else member.mode & 0o7777,
        uid=member.uid,
        gid=member.gid,
        size=member.size if kind == "file" else 0,
        sha256=sha256,
        target=os.fsencode(member.linkname) if kind == "symlink" else b"",
        rdev=(member.devmajor, member.devminor) if kind in ("char", "block") else (0, 0),
        xattrs=tuple(xattrs),
    )


def _archive_json(archive: Path, name: str) -> Any:
    with tarfile.open(archive, "r:") as tar:
        member = tar.extractfile(name)
        assert member is not None, f"{archive}: no {name}"
        return json.load(member)


def _layer_members(archive: Path, layer: str) -> dict[str, tarfile.TarInfo]:
    """The members of one (uncompressed) layer blob of an archive, by name."""
    with tarfile.open(archive, "r:") as outer:
        blob = outer.extractfile(layer)
        assert blob is not None
        with tarfile.open(fileobj=io.BytesIO(blob.read()), mode="r:") as inner:
            return {m.name.removeprefix("./").rstrip("/"): m for m in inner.getmembers()}


def wait_until_settled(root: Path, timeout: float = 20) -> None:
    """Wait until nothing under root changes for a second. `docker stop` returns once the container stopped, while
    dockerd may still be recording that (config.v2.json): run_luigi's never-written check must not see it. (With
    containerd's root in the data-root, as dockerd lays it out, its meta.db changed a second after the stop;
    tests.support.dockerd keeps it outside.)"""
    deadline = time.monotonic() + timeout
    before = tree_fingerprint(root)
    while time.monotonic() < deadline:
        time.sleep(1)
        if (now := tree_fingerprint(root)) == before:
            return
        before = now
    raise AssertionError(f"{root} still changes {timeout:.0f} s after the container stopped")


def _images_holding(d: Dockerd, diff_id: str) -> list[str]:
    ids = d.run("image", "ls", "--all", "--quiet", "--no-trunc").split()
    if not ids:
        return []
    images = json.loads(d.run("image", "inspect", *ids))
    return [image["Id"] for image in images if diff_id in image["RootFS"]["Layers"]]


def _image_layers(d: Dockerd, ref: str) -> list[str]:
    [image] = json.loads(d.run("image", "inspect", ref))
    layers: list[str] = image["RootFS"]["Layers"]
    return layers


@contextlib.contextmanager
def loaded(d: Dockerd, archive: Path, ref: str, work: Path, *, base: str) -> Iterator[Loaded]:
    """`docker load` a docker-archive, export a container created from it; container and image removed after."""
    config = _archive_json(archive, read_archive_manifest(archive)["Config"])
    base_layers = _image_layers(d, base)
    # docker load skips a layer whose chain it already holds (image/tarexport/load.go): no image may hold this
    # archive's container layer yet, so the loaded image's own layer is really applied from this archive.
    for diff_id in config["rootfs"]["diff_ids"][len(base_layers) :]:
        assert _images_holding(d, diff_id) == [], f"dockerd already holds {diff_id}: an earlier test left its image"
    assert f"Loaded image: {ref}" in d.run("load", "--input", str(archive))
    container = ref.replace("/", "-").replace(":", "-") + "-check"
    try:
        d.run("create", "--network", "none", "--name", container, ref)
        view = export_view(d, container, work)
        [inspect] = json.loads(d.run("image", "inspect", ref))
        history = d.run("history", "--no-trunc", "--format", "{{.ID}}|{{.CreatedBy}}|{{.Comment}}", ref)
        yield Loaded(view, inspect, history.splitlines())
    finally:
        d.attempt("rm", "--force", container)
        d.attempt("rmi", ref)


def commit(d: Dockerd, container: str, work: Path, *extra: str) -> Path:
    """Commit a container of the dockerd with the command line; the archive's path."""
    archive = work / "image.tar"
    result = run_luigi(
        *commit_args(d.root, work, "--id", container, "--storage-engine", "docker", "--output", str(archive), *extra)
    )
    assert result.returncode == 0, result.stderr
    # A warning would mean a fallback: no freezer for the running container, or a tar-split that no longer
    # matches dockerd's diff/ (the layer packed anew, with another diff_id than dockerd's).
    assert " WARNING " not in result.stderr, result.stderr
    return archive


def check_image(d: Dockerd, image: Loaded, archive: Path, *, ref: str, base: str, changed: bool = True) -> None:
    """docker inspect and docker history of a loaded image agree with the archive and the container."""
    manifest = read_archive_manifest(archive)
    config = _archive_json(archive, manifest["Config"])
    with tarfile.open(archive, "r:") as tar:
        member = tar.extractfile(manifest["Config"])
        assert member is not None
        config_digest = "sha256:" + hashlib.sha256(member.read()).hexdigest()
    assert image.inspect["Id"] == config_digest
    assert image.inspect["RepoTags"] == [ref] == manifest["RepoTags"]
    assert image.inspect["RootFS"]["Layers"] == config["rootfs"]["diff_ids"]
    # The image layers are the base image's, reassembled byte for byte from dockerd's tar-split records (the same
    # diff_ids), and the init layer is left out: one layer more than the base. An unchanged container may add
    # an empty layer or, as docker commit does, none.
    base_layers = _image_layers(d, base)
    layers = image.inspect["RootFS"]["Layers"]
    assert layers[: len(base_layers)] == base_layers
    assert len(layers) - len(base_layers) in ((1,) if changed else (0, 1)), layers
    assert image.inspect["Config"]["Cmd"] == list(CMD)
    assert "GREETING=hello" in image.inspect["Config"]["Env"] and image.inspect["Config"]["WorkingDir"] == "/srv"
    assert image.inspect["Config"]["Labels"] == {"org.example.test": "docker-engine"}
    assert len(image.history) == len(config["history"]) and image.history[0].startswith(config_digest + "|")


# --- fixtures -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_image(dockerd: Dockerd, busybox_image: str) -> str:
    """busybox plus two COPY layers, an ENV, a WORKDIR and a LABEL, built offline."""
    ref = "pipeline-test/base:1"
    dockerd.run("build", "--quiet", "--tag", ref, "-", input=_context_tar())
    return ref


@pytest.fixture(scope="module")
def changed(dockerd: Dockerd, base_image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChangedContainer]:
    """A running container changed by docker exec, plus a user.* xattr set from the host through its merged dir."""
    name = "changed"
    dockerd.run("run", "--detach", "--network", "none", "--name", name, base_image, *CMD)
    try:
        dockerd.run("exec", name, "sh", "-c", CHANGES)
        data = json.loads(dockerd.run("inspect", "--format", "{{json .GraphDriver.Data}}", name))
        merged = Path(data["MergedDir"])
        for path in ("new.txt", "srv/keep.txt"):  # a new file, and a lower file copied up by setting it
            os.setxattr(merged / path, XATTR, XATTR_VALUE)
        # docker export keeps security.capability (unlike user.*): the export comparison checks this one.
        os.setxattr(merged / "capability", "security.capability", CAPABILITY)
        export = export_view(dockerd, name, tmp_path_factory.mktemp("changed"))
        yield ChangedContainer(name, base_image, export, Path(data["UpperDir"]))
    finally:
        dockerd.attempt("rm", "--force", name)


# --- the reader against real dockerd storage ----------------------------------------------------------------------


def test_commit_of_a_changed_running_container_loads_as_the_same_files(
    dockerd: Dockerd, changed: ChangedContainer, tmp_path: Path
) -> None:
    # run_luigi also checks that nothing under dockerd's data-root changed while the running container was read.
    archive = commit(dockerd, changed.name, tmp_path, "--image", "snap:1", "--format", "both", "--compression", "none")
    # What dockerd's storage holds: the kernel's whiteouts (character devices 0/0) and opaque directory...
    gone = os.lstat(changed.upper / "srv/gone.txt")
    assert stat.S_ISCHR(gone.st_mode) and gone.st_rdev == 0
    assert os.getxattr(changed.upper / "opt/app", "trusted.overlay.opaque") == b"y"
    # ... became OCI markers in the container's layer.
    layers = read_archive_manifest(archive)["Layers"]
    members = _layer_members(archive, layers[-1])
    for marker in ("srv/.wh.gone.txt", "etc/.wh.group", "opt/.wh.keepdir", "opt/app/.wh..wh..opq"):
        assert members[marker].isfile() and members[marker].size == 0, marker
    assert not any(m.ischr() and (m.devmajor, m.devminor) == (0, 0) for m in members.values())
    assert not any("overlay" in key for m in members.values() for key in m.pax_headers)
    assert ".dockerenv" not in members and "etc/hosts" not in members  # the init layer is left out
    # docker export drops xattrs: the user.* xattr set from the host is checked in the layer tar and in the
    # layer dockerd unpacked when it loaded the archive.
    for path in ("new.txt", "srv/keep.txt"):
        assert members[path].pax_headers.get(XATTR_PAX_PREFIX + XATTR) == XATTR_VALUE.decode(), path

    # What the loaded image is compared with holds the entries that need PAX records, and the capability.
    export = changed.export.entries
    assert export[b"big-ids"].uid == 3_000_000 and b"caf\xe9" in export and len(max(export, key=len)) > 255
    assert export[b"capability"].xattrs == (("security.capability", CAPABILITY),)
    assert frozenset({b"srv/keep.txt", b"srv/hardlink-to-lower"}) in changed.export.hardlinks

    with loaded(dockerd, archive, "snap:1", tmp_path / "check", base=changed.base) as image:
        compare_trees(changed.export, image.view, label="docker load of a changed container")
        check_image(dockerd, image, archive, ref="snap:1", base=changed.base)
        upper = Path(image.inspect["GraphDriver"]["Data"]["UpperDir"])
        for path in ("new.txt", "srv/keep.txt"):
            assert os.getxattr(upper / path, XATTR) == XATTR_VALUE, path


# --- every archive the pipeline writes, loaded by docker ----------------------------------------------------------


# --format both --compression none (the defaults) is the first test's.
@pytest.mark.parametrize(("archive_format", "compression"), [("both", "gzip"), ("docker", "none"), ("docker", "gzip")])
def test_docker_loads_every_docker_archive_format_and_compression(
    dockerd: Dockerd, changed: ChangedContainer, tmp_path: Path, archive_format: str, compression: str
) -> None:
    ref = f"snap:{archive_format}-{compression}"
    archive = commit(
        dockerd, changed.name, tmp_path, "--image", ref, "--format", archive_format, "--compression", compression
    )
    with tarfile.open(archive, "r:") as tar:
        names = set(tar.getnames())
        for layer in read_archive_manifest(archive)["Layers"]:
            blob = tar.extractfile(layer)
            assert blob is not None
            assert (blob.read(2) == b"\x1f\x8b") == (compression == "gzip"), layer
    assert ("index.json" in names) == (archive_format == "both")
    with loaded(dockerd, archive, ref, tmp_path / "check", base=changed.base) as image:
        compare_trees(changed.export, image.view, label=f"docker load of --format {archive_format} {compression}")
        check_image(dockerd, image, archive, ref=ref, base=changed.base)


def test_a_pure_oci_archive_is_refused_by_docker_20_10(
    dockerd: Dockerd, changed: ChangedContainer, tmp_path: Path
) -> None:
    archive = commit(dockerd, changed.name, tmp_path, "--image", "snap:oci", "--format", "oci")
    with tarfile.open(archive, "r:") as tar:
        assert {"oci-layout", "index.json"} <= set(tar.getnames()) and "manifest.json" not in tar.getnames()
    # Docker Engine's own image store (graph drivers such as overlay2) loads only docker-archives: its loader
    # (image/tarexport/load.go) reads manifest.json, and without one falls back to the pre-1.10 layout of one
    # <layer-id>/json per directory, so it fails on blobs/json. OCI layouts load only with the containerd image
    # store (moby/moby#43822, issue #44162). That is why --format both (the default) exists.
    result = dockerd.attempt("load", "--input", str(archive))
    assert result.returncode != 0, result.stdout
    assert "blobs/json: no such file or directory" in result.stderr, result.stderr
    assert dockerd.run("image", "ls", "--quiet", "snap") == ""


@pytest.mark.parametrize("archive_format", ["docker", "both"])
def test_zstd_with_a_docker_archive_is_refused_on_the_command_line(
    dockerd: Dockerd, changed: ChangedContainer, tmp_path: Path, archive_format: str
) -> None:
    archive = tmp_path / "image.tar"
    result = run_luigi(
        *commit_args(dockerd.root, tmp_path, "--id", changed.name, "--storage-engine", "docker"),
        *("--format", archive_format, "--compression", "zstd", "--output", str(archive)),
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    [line] = error_lines(result)
    assert "zstd" in line, line
    assert not archive.exists()


# --- a container that changed nothing -----------------------------------------------------------------------------


@pytest.mark.parametrize("state", ["created", "running", "exited"])
def test_commit_of_an_unchanged_container_loads(dockerd: Dockerd, base_image: str, tmp_path: Path, state: str) -> None:
    name = f"unchanged-{state}"
    if state == "created":
        dockerd.run("create", "--network", "none", "--name", name, base_image, *CMD)
    else:
        dockerd.run("run", "--detach", "--network", "none", "--name", name, base_image, *CMD)
    try:
        if state == "exited":
            dockerd.run("stop", "--time", "0", name)
            wait_until_settled(dockerd.root)
        upper = Path(dockerd.run("inspect", "--format", "{{.GraphDriver.Data.UpperDir}}", name).strip())
        assert os.listdir(upper) == []
        expected = export_view(dockerd, name, tmp_path / "original")
        ref = f"snap:{name}"
        archive = commit(dockerd, name, tmp_path, "--image", ref)
        with loaded(dockerd, archive, ref, tmp_path / "check", base=base_image) as image:
            compare_trees(expected, image.view, label=f"docker load of an unchanged {state} container")
            check_image(dockerd, image, archive, ref=ref, base=base_image, changed=False)
    finally:
        dockerd.attempt("rm", "--force", name)


# --- a paused container -------------------------------------------------------------------------------------------


def test_commit_of_a_paused_container_leaves_it_paused(
    dockerd: Dockerd, changed: ChangedContainer, tmp_path: Path
) -> None:
    # config.v2.json says Running and Paused: the container is frozen already, and freezing then thawing it
    # around the commit would unpause it behind docker's back.
    dockerd.run("pause", changed.name)
    try:
        archive = commit(dockerd, changed.name, tmp_path, "--image", "snap:paused")
        assert dockerd.run("inspect", "--format", "{{.State.Status}}", changed.name).strip() == "paused"
        container_id = dockerd.run("inspect", "--format", "{{.Id}}", changed.name).strip()
        freezer = Path("/sys/fs/cgroup/freezer/docker", container_id, "freezer.state")  # cgroup v1, cgroupfs
        if freezer.exists():
            assert freezer.read_text().strip() == "FROZEN"
    finally:
        dockerd.run("unpause", changed.name)
    with loaded(dockerd, archive, "snap:paused", tmp_path / "check", base=changed.base) as image:
        compare_trees(changed.export, image.view, label="docker load of a paused container")
        check_image(dockerd, image, archive, ref="snap:paused", base=changed.base)

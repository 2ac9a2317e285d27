"""A builder of real podman containers-storage (overlay driver) in a private root: an imported base image, an image
committed on top of it, and a created container changed through `podman mount`, with its merged view recorded."""

from __future__ import annotations

import io
import os
import shutil
import stat
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

from tests.support import imagecheck
from tests.support.overlay_storage import CAPABILITY_NET_RAW, TreeView, read_tree

FIXED_MTIME = 1_700_000_000
BASE_CHANGES = (  # podman import --change: the base image's config
    'ENTRYPOINT ["/bin/busybox"]',
    'CMD ["sh"]',
    "ENV LANG=C.UTF-8",
    "WORKDIR /opt/app",
    "USER 0:0",
    "EXPOSE 8080/tcp",
    "LABEL org.opencontainers.image.title=base",
)
CONTAINER_CMD = ["/bin/sh", "-c", "echo hi"]
CREATE_ARGS = (  # podman create flags of the committed container, each landing in libpod's ContainerConfig
    "--env", "APP_MODE=test",
    "--env", 'GREETING=say "hi"',
    "--label", "role=web",
    "--expose", "9090/udp",
    "--publish", "8081:80",
    "--workdir", "/srv",
)  # fmt: skip


@dataclass(frozen=True)
class PodmanStorage:
    """A containers-storage root with the container "web" on a two-layer image, and what podman made of it."""

    root: Path  # podman --root (graphroot)
    podman: tuple[str, ...]  # argv prefix that points podman at this storage only
    env: dict[str, str]
    runroot: Path  # podman --runroot, outside work because of its length limit: remove it when done
    container_id: str  # of "web"
    merged: TreeView  # web's merged view recorded while mounted (ground truth)
    podman_archive: Path  # `podman commit web` + `podman save --format docker-archive`

    def run(self, *args: str) -> str:
        return run_podman(list(self.podman), self.env, *args)


def run_podman(podman: list[str], env: dict[str, str], *args: str) -> str:
    done = subprocess.run([*podman, *args], capture_output=True, text=True, env=env, check=False, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout.strip()


def podman_command(work: Path) -> tuple[list[str], dict[str, str], Path]:
    """podman's argv and environment for a private overlay storage under work/storage, and its runroot."""
    return imagecheck.podman_command(work, driver="overlay", root=work / "storage")


def _add(tar: tarfile.TarFile, name: str, kind: bytes = tarfile.REGTYPE, **fields: object) -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mtime = FIXED_MTIME
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    data = fields.pop("data", b"")
    for key, value in fields.items():
        setattr(info, key, value)
    assert isinstance(data, bytes)
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def build_base_tar() -> bytes:
    """The base image's only layer: files to delete, modify and replace, hardlinks, symlinks, setuid, owners."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for directory in ("bin", "etc", "usr", "usr/bin", "lib", "data", "gone", "gone/sub", "opt", "opt/app"):
            _add(tar, directory, tarfile.DIRTYPE)
        for directory in ("opt/app/lib", "var", "var/cache", "srv", "home"):
            _add(tar, directory, tarfile.DIRTYPE)
        _add(tar, "tmp", tarfile.DIRTYPE, mode=0o1777)
        _add(tar, "home/user", tarfile.DIRTYPE, uid=1000, gid=1000)
        _add(tar, "home/user/.profile", data=b"PS1='$ '\n", uid=1000, gid=1000, mode=0o600)
        _add(tar, "bin/busybox", data=b"#!busybox stand-in\n" * 64, mode=0o755)
        _add(tar, "bin/sh", tarfile.SYMTYPE, linkname="busybox")
        _add(tar, "etc/app.conf", data=b"setting=1\n")  # modified by the container
        _add(tar, "etc/hostname", data=b"base\n")  # deleted by the container
        _add(tar, "etc/passwd", data=b"root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n")
        _add(tar, "usr/bin/passwd", data=b"setuid stand-in\n", mode=0o4755)
        _add(tar, "lib/libc.so.6", data=b"libc stand-in\n" * 100, mode=0o755)
        _add(tar, "lib/libc.so", tarfile.SYMTYPE, linkname="libc.so.6")
        _add(tar, "lib/old.so", data=b"old library\n")  # deleted by the middle image layer
        _add(tar, "data/hello.txt", data=b"hello from the base layer\n")
        _add(tar, "data/hello-hardlink.txt", tarfile.LNKTYPE, linkname="data/hello.txt")
        _add(tar, "gone/sub/file", data=b"removed with its directory\n")  # gone/ is rm -r'd by the container
        _add(tar, "gone/other", data=b"also removed\n")
        _add(tar, "opt/app/old.py", data=b"print('old')\n")  # opt/app is removed and re-created by the container
        _add(tar, "opt/app/lib/util.py", data=b"def util(): pass\n")
        _add(tar, "var/cache/motd", data=b"cached\n")  # var/cache is removed by the middle image layer
        _add(tar, "srv/origin.txt", data=b"tagged in the base\n", pax_headers={"SCHILY.xattr.user.origin": "base"})
    return out.getvalue()


def _write(path: Path, data: bytes, mode: int = 0o644, uid: int = 0, gid: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chown(path, uid, gid)
    os.chmod(path, mode)  # after chown, which clears setuid bits


def change_middle_layer(merged: Path) -> None:
    """The builder container's changes, committed by podman into the middle image layer."""
    (merged / "lib/old.so").unlink()
    shutil.rmtree(merged / "var/cache")
    _write(merged / "usr/share/zoneinfo/UTC", b"TZif2 stand-in\n")
    os.symlink("/usr/share/zoneinfo/UTC", merged / "etc/localtime")
    _write(merged / "usr/sbin/ping", b"ping stand-in\n", 0o755)
    os.setxattr(merged / "usr/sbin/ping", "security.capability", CAPABILITY_NET_RAW)


def change_container(merged: Path) -> None:
    """The committed container's changes, made through its `podman mount` point as a process in it would."""
    with open(merged / "etc/app.conf", "ab") as f:  # copy-up of a modified lower file
        f.write(b"setting=2\n")
    (merged / "etc/hostname").unlink()  # whiteout of a file
    shutil.rmtree(merged / "gone")  # whiteout of a whole directory
    shutil.rmtree(merged / "opt/app")  # removed and re-created: the kernel marks the new directory opaque
    _write(merged / "opt/app/main.py", b"print('new')\n")
    _write(merged / "home/user/.secret", b"hunter2\n", 0o600, uid=1000, gid=1000)
    _write(merged / "usr/local/bin/su-helper", b"setuid helper\n", 0o4755)
    (merged / "run").mkdir()
    os.mkfifo(merged / "run/app.fifo")
    os.mknod(merged / "srv/zero", stat.S_IFCHR | 0o666, os.makedev(1, 5))
    _write(merged / "srv/www/index.html", b"<h1>hi</h1>\n")
    os.link(merged / "srv/www/index.html", merged / "srv/www/index-hardlink.html")
    os.symlink("index.html", merged / "srv/www/current")
    os.symlink("/bin/busybox", merged / "srv/shell")
    _write(merged / "srv/日本語/ファイル.txt", "ユニコード\n".encode())
    _write(merged / "café.txt", "crème\n".encode())
    _write(merged / "srv/tagged.txt", b"tagged\n")
    os.setxattr(merged / "srv/tagged.txt", "user.mime_type", b"text/plain")
    os.setxattr(merged / "srv/origin.txt", "user.reviewed", b"yes")  # copy-up of metadata only


def build_podman_storage(work: Path) -> PodmanStorage:
    """Make the storage with real podman; the container is created, never run (this sandbox refuses OCI runs)."""
    work.mkdir(parents=True, exist_ok=True)
    argv, env, runroot = podman_command(work)
    podman = [*argv]

    def run(*args: str) -> str:
        return run_podman(podman, env, *args)

    (work / "base.tar").write_bytes(build_base_tar())
    changes = [arg for change in BASE_CHANGES for arg in ("--change", change)]
    run("import", "--quiet", *changes, str(work / "base.tar"), "localhost/base:1")
    run("create", "--name", "builder", "localhost/base:1")
    change_middle_layer(Path(run("mount", "builder")))
    run("unmount", "builder")
    run("commit", "--quiet", "builder", "localhost/mid:1")

    container_id = run("create", "--name", "web", *CREATE_ARGS, "localhost/mid:1", *CONTAINER_CMD)
    mountpoint = Path(run("mount", "web"))
    try:
        change_container(mountpoint)
        merged = read_tree(mountpoint)
    finally:
        run("unmount", "web")

    run("commit", "--quiet", "web", "localhost/web-by-podman:1")
    archive = work / "podman-saved.tar"
    run("save", "--quiet", "--format", "docker-archive", "-o", str(archive), "localhost/web-by-podman:1")
    return PodmanStorage(
        root=work / "storage",
        podman=tuple(podman),
        env=env,
        runroot=runroot,
        container_id=container_id,
        merged=merged,
        podman_archive=archive,
    )

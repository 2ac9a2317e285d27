"""A builder of real rocker storage (overlay2 layers made through kernel overlay mounts) and a tree reader for tests."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import random
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

# Layer and image ids are derived from fixed strings so that every build yields the same storage and thus the
# same layer tars; the base id looks like a pulled layer (hex of a sha256).
BASE_LAYER_ID = hashlib.sha256(b"rocker-test base layer").hexdigest()
MID_LAYER_ID = hashlib.sha256(b"rocker-test mid layer").hexdigest()
FIXED_MTIME = 1_700_000_000  # 2023-11-14T22:13:20Z, set on every entry of every diff/ after the last umount
CREATED = "2024-01-02T03:04:05Z"
IMAGE_REPOSITORY = "base"
IMAGE_TAG = "1.0"
IMAGE_ENV = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8"]
CONTAINER_ENV = [*IMAGE_ENV, "APP_MODE=test", 'GREETING=say "hi"']
CONTAINER_CMD = ["/bin/sh", "-c", "echo hi"]

# A VFS v2 capability blob (magic 0x02000001) granting CAP_NET_RAW (bit 13) permitted; the kernel rejects
# malformed security.capability values, so the bytes must be valid.
CAPABILITY_NET_RAW = bytes.fromhex("0100000200200000000000000000000000000000")

# Only these xattrs describe the file system an image carries; trusted.overlay.* / user.overlay.* are overlay's
# own bookkeeping and must never reach an image.
_OVERLAY_XATTR_PREFIXES = ("trusted.overlay.", "user.overlay.")


def container_id_for(name: str) -> str:
    """The deterministic 64-hex container id the builder uses for a container called `name`."""
    return hashlib.sha256(f"rocker-test container {name}".encode()).hexdigest()


@dataclass(frozen=True)
class Entry:
    """One file-system entry as seen through lstat/readlink/xattrs, comparable across trees."""

    kind: str  # "file" | "dir" | "symlink" | "fifo" | "char" | "block"
    mode: int  # st_mode & 0o7777; 0 for symlinks (their mode bits mean nothing on Linux)
    uid: int
    gid: int
    size: int  # regular files only, else 0
    sha256: str  # regular files only, else ""
    target: bytes  # symlink target, else b""
    rdev: tuple[int, int]  # (major, minor) for char/block, else (0, 0)
    xattrs: tuple[tuple[str, bytes], ...]  # sorted; only security.capability and user.* (never overlay's own)


@dataclass(frozen=True)
class TreeView:
    """Every entry under a root (root excluded), keyed by relative bytes path, plus the hardlink groups."""

    entries: dict[bytes, Entry]
    hardlinks: frozenset[frozenset[bytes]]  # groups (size >= 2) of regular-file paths sharing an inode


@dataclass(frozen=True)
class RockerStorage:
    """A rocker storage root holding one container on top of a two-layer image, and its recorded merged view."""

    root: Path  # holds overlay2/, containers/, image/
    container_id: str  # 64 hex chars
    layer_ids: tuple[str, ...]  # oldest first; the last is the container id
    merged: TreeView  # the container's merged view recorded while mounted (ground truth)


def is_image_xattr(name: str) -> bool:
    """Whether an xattr belongs to the file system an image carries (security.capability, user.*)."""
    if name.startswith(_OVERLAY_XATTR_PREFIXES):
        return False
    return name == "security.capability" or name.startswith("user.")


def _kind(st_mode: int) -> str:
    if stat.S_ISREG(st_mode):
        return "file"
    if stat.S_ISDIR(st_mode):
        return "dir"
    if stat.S_ISLNK(st_mode):
        return "symlink"
    if stat.S_ISFIFO(st_mode):
        return "fifo"
    if stat.S_ISCHR(st_mode):
        return "char"
    if stat.S_ISBLK(st_mode):
        return "block"
    raise ValueError(f"unsupported file type {stat.filemode(st_mode)}")


def _sha256_file(path: bytes) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def read_entry(path: bytes | Path) -> Entry:
    """Describe one path without following it if it is a symlink."""
    raw = os.fsencode(path)
    st = os.lstat(raw)
    kind = _kind(st.st_mode)
    names = sorted(n for n in os.listxattr(raw, follow_symlinks=False) if is_image_xattr(n))
    xattrs = tuple((n, os.getxattr(raw, n, follow_symlinks=False)) for n in names)
    return Entry(
        kind=kind,
        mode=0 if kind == "symlink" else stat.S_IMODE(st.st_mode),
        uid=st.st_uid,
        gid=st.st_gid,
        size=st.st_size if kind == "file" else 0,
        sha256=_sha256_file(raw) if kind == "file" else "",
        target=os.readlink(raw) if kind == "symlink" else b"",
        rdev=(os.major(st.st_rdev), os.minor(st.st_rdev)) if kind in ("char", "block") else (0, 0),
        xattrs=xattrs,
    )


def stat_tree(root: Path) -> dict[bytes, os.stat_result]:
    """Every path under root (relative, as bytes) with its lstat, for choosing what to change next."""
    found = {}
    base = os.fsencode(root)
    for dirpath, dirnames, filenames in os.walk(base):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            found[os.path.relpath(path, base)] = os.lstat(path)
    return found


def read_tree(root: Path) -> TreeView:
    """Walk `root` with bytes paths (names need not be UTF-8) and describe every entry below it."""
    base = os.fsencode(root)
    entries: dict[bytes, Entry] = {}
    inodes: dict[tuple[int, int], set[bytes]] = {}
    pending = [b""]
    while pending:
        rel_dir = pending.pop()
        with os.scandir(os.path.join(base, rel_dir) if rel_dir else base) as it:
            for item in it:
                rel = os.path.join(rel_dir, item.name) if rel_dir else item.name
                entry = read_entry(item.path)
                entries[rel] = entry
                if entry.kind == "dir":
                    pending.append(rel)
                elif entry.kind == "file":
                    st = item.stat(follow_symlinks=False)
                    if st.st_nlink > 1:
                        inodes.setdefault((st.st_dev, st.st_ino), set()).add(rel)
    groups = frozenset(frozenset(g) for g in inodes.values() if len(g) >= 2)
    return TreeView(entries=dict(sorted(entries.items())), hardlinks=groups)


def _run(argv: list[str]) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")


@contextlib.contextmanager
def overlay_mount(lowers_top_first: list[Path], upper: Path, work: Path, merged: Path) -> Iterator[Path]:
    """Mount a kernel overlay at `merged` and always unmount it again, even when the body fails."""
    lowerdir = ":".join(str(p) for p in lowers_top_first)
    options = f"lowerdir={lowerdir},upperdir={upper},workdir={work}"
    _run(["mount", "-t", "overlay", "overlay", "-o", options, str(merged)])
    try:
        yield merged
    finally:
        done = subprocess.run(["umount", str(merged)], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            # A busy mount must not outlive the test: detach it lazily, then report the failure.
            subprocess.run(["umount", "-l", str(merged)], capture_output=True, check=False)
            raise RuntimeError(f"umount {merged} failed: {done.stderr.strip()}")


@functools.cache
def requires_root_reason() -> str | None:
    """Why real overlay storage cannot be built here (not root, or overlay mounts refused), or None if it can."""
    if os.geteuid() != 0:
        return "needs root: real overlay mounts, device nodes and trusted.overlay.* xattrs"
    with tempfile.TemporaryDirectory(prefix="overlay-probe-") as tmp:
        dirs = [Path(tmp, n) for n in ("lower", "upper", "work", "merged")]
        for d in dirs:
            d.mkdir()
        try:
            with overlay_mount([dirs[0]], dirs[1], dirs[2], dirs[3]):
                pass
        except (RuntimeError, OSError) as exc:
            return f"mount -t overlay is not permitted here: {exc}"
    return None


# --- writers: every helper sets owner, then mode (chown clears setuid bits), then xattrs (chown clears caps) ---


def _parents(path: Path) -> None:
    """Create missing ancestors with an explicit 0755, so the process umask cannot change the layers."""
    missing = [p for p in path.parents if not p.exists()]
    for parent in reversed(missing):
        parent.mkdir()
        os.chmod(parent, 0o755)


def _meta(path: Path, mode: int, uid: int, gid: int, xattrs: dict[str, bytes] | None) -> None:
    os.chown(path, uid, gid, follow_symlinks=False)
    os.chmod(path, mode)
    for name, value in (xattrs or {}).items():
        os.setxattr(path, name, value, follow_symlinks=False)


def _dir(path: Path, mode: int = 0o755, uid: int = 0, gid: int = 0, xattrs: dict[str, bytes] | None = None) -> None:
    _parents(path)
    path.mkdir()
    _meta(path, mode, uid, gid, xattrs)


def _file(
    path: Path,
    data: bytes = b"",
    mode: int = 0o644,
    uid: int = 0,
    gid: int = 0,
    xattrs: dict[str, bytes] | None = None,
) -> None:
    _parents(path)
    path.write_bytes(data)
    _meta(path, mode, uid, gid, xattrs)


def _symlink(path: Path, target: str) -> None:
    _parents(path)
    os.symlink(target, path)


def _node(path: Path, kind: int, mode: int, major: int = 0, minor: int = 0) -> None:
    _parents(path)
    if kind == stat.S_IFIFO:
        os.mkfifo(path)
    else:
        os.mknod(path, kind | mode, os.makedev(major, minor))
    os.chmod(path, mode)


def _sparse(path: Path, size: int, chunks: dict[int, bytes]) -> None:
    _parents(path)
    with open(path, "wb") as f:
        os.truncate(f.fileno(), size)
        for offset, data in chunks.items():
            f.seek(offset)
            f.write(data)
    os.chmod(path, 0o644)


def _write_base(diff: Path) -> None:
    """The bottom layer, written directly as a pulled layer would be unpacked."""
    _dir(diff, 0o755)
    _file(diff / "bin/busybox", b"#!busybox stand-in\n" * 64, 0o755)
    _symlink(diff / "bin/sh", "busybox")  # relative symlink
    _file(diff / "etc/hostname", b"base\n")  # deleted by the container
    _file(diff / "etc/app.conf", b"setting=1\n")  # modified by the container (copy-up)
    _file(diff / "etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n")
    _file(diff / "usr/bin/passwd", b"setuid stand-in\n", 0o4755)
    _file(diff / "lib/old.so", b"old library\n")  # deleted by the mid layer
    _file(diff / "lib/libc.so.6", b"libc stand-in\n" * 100, 0o755)
    _symlink(diff / "lib/libc.so", "libc.so.6")
    _file(diff / "var/cache/motd", b"cached\n")  # var/cache is deleted as a whole by the mid layer
    _file(diff / "var/cache/apt/pkgcache.bin", bytes(range(256)) * 16)
    _dir(diff / "var/cache/apt/archives/partial", 0o700)
    _file(diff / "opt/app/old.py", b"print('old')\n")  # opt/app is removed and re-created by the container
    _file(diff / "opt/app/lib/util.py", b"def util(): pass\n")
    _file(diff / "data/hello.txt", b"hello from the base layer\n")
    os.link(diff / "data/hello.txt", diff / "data/hello-hardlink.txt")
    _dir(diff / "data/empty-dir", 0o755)
    _dir(diff / "tmp", 0o1777)
    _dir(diff / "home/user", 0o755, uid=1000, gid=1000)
    _dir(diff / "dev", 0o755)


def _write_mid(merged: Path) -> None:
    """The middle layer, changed through an overlay mount so the kernel writes whiteouts into its diff/."""
    (merged / "lib/old.so").unlink()  # whiteout of a file
    _rmtree(merged / "var/cache")  # whiteout of a whole directory
    _file(merged / "usr/sbin/ping", b"ping stand-in\n", 0o755, xattrs={"security.capability": CAPABILITY_NET_RAW})
    _node(merged / "dev/null", stat.S_IFCHR, 0o666, 1, 3)
    _file(merged / "café/日本.txt", "こんにちは\n".encode())
    _file(merged / "usr/share/zoneinfo/UTC", b"TZif2 stand-in\n")
    _symlink(merged / "etc/localtime", "/usr/share/zoneinfo/UTC")  # absolute symlink
    _file(merged / "usr/lib/libx.so.1", b"libx\n" * 50, 0o755)
    os.link(merged / "usr/lib/libx.so.1", merged / "usr/lib/libx-hardlink.so.1")


def _write_container(merged: Path) -> None:
    """The container's writable layer, changed through its merged mount as a running container would."""
    with open(merged / "etc/app.conf", "ab") as f:  # copy-up of a modified lower file
        f.write(b"setting=2\n")
    (merged / "etc/hostname").unlink()
    _rmtree(merged / "opt/app")  # removed and re-created: the kernel marks the new dir opaque
    _file(merged / "opt/app/main.py", b"print('new')\n")
    _dir(merged / "opt/app/lib", 0o755)
    _file(merged / "opt/app/lib/helpers.py", b"def helper(): pass\n")
    _file(merged / "home/user/.secret", b"hunter2\n", 0o600, uid=1000, gid=1000)
    _dir(merged / "var/tmp", 0o1777)
    _node(merged / "run/app.fifo", stat.S_IFIFO, 0o644)
    _node(merged / "dev/zero", stat.S_IFCHR, 0o666, 1, 5)
    _node(merged / "dev/loop0", stat.S_IFBLK, 0o660, 7, 0)
    _file(merged / "usr/local/bin/su-helper", b"setuid helper\n", 0o4755)
    _file(merged / "usr/local/bin/capped", b"capped\n", 0o755, xattrs={"security.capability": CAPABILITY_NET_RAW})
    _symlink(merged / "usr/local/bin/shell", "/bin/busybox")  # absolute symlink
    _dir(merged / "srv", 0o755, xattrs={"user.owner": b"web"})
    _file(
        merged / "srv/tagged.txt",
        b"tagged\n",
        xattrs={"user.mime_type": b"text/plain", "user.binary": b"\xff\x00\x01raw"},
    )
    _file(merged / "srv/www/index.html", b"<h1>hi</h1>\n")
    os.link(merged / "srv/www/index.html", merged / "srv/www/index-hardlink.html")
    _symlink(merged / "srv/www/current", "index.html")  # relative symlink
    _symlink(merged / "srv/broken", "../does/not/exist")  # dangling symlink
    _file(merged / "srv" / ("long-name-" + "n" * 140 + ".txt"), b"long name\n")  # name > 100 bytes
    deep = merged / "srv/deep" / "/".join(f"{i}-" + "d" * 60 for i in range(5))
    _file(deep / "file-at-depth.txt", b"deep\n")  # path > 255 bytes
    _file(merged / "srv/日本語/ファイル.txt", "ユニコード\n".encode())
    _file(merged / os.fsdecode(b"srv/bad-\xff-name"), b"not utf-8\n")
    _sparse(merged / "srv/sparse.img", 8 << 20, {0: b"start", 4 << 20: b"middle", (8 << 20) - 3: b"end"})
    _dir(merged / "srv/empty", 0o755)
    _file(merged / "srv/empty.txt", b"")
    _file(merged / "srv/blob.bin", random.Random(20240102).randbytes(3 << 20))


def _rmtree(path: Path) -> None:
    """rm -r through the overlay (shutil.rmtree would do, but this keeps the deletion order obvious)."""
    for child in path.iterdir():
        if child.is_dir() and not child.is_symlink():
            _rmtree(child)
        else:
            child.unlink()
    path.rmdir()


def _fix_mtimes(diff: Path) -> None:
    """Give every entry of an unmounted layer the same mtime, so the layer tars are reproducible."""
    for dirpath, dirnames, filenames in os.walk(os.fsencode(diff)):
        for name in dirnames + filenames:
            os.utime(os.path.join(dirpath, name), (FIXED_MTIME, FIXED_MTIME), follow_symlinks=False)
    os.utime(diff, (FIXED_MTIME, FIXED_MTIME))


def _write_json(path: Path, value: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_metadata(root: Path, container_id: str, name: str, running: bool) -> None:
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
    }
    config_bytes = json.dumps(image_config, sort_keys=True).encode()
    image_id = hashlib.sha256(config_bytes).hexdigest()  # Docker's image id: the digest of its config
    content = root / "image/overlay2/imagedb/content/sha256" / image_id
    content.parent.mkdir(parents=True, exist_ok=True)
    content.write_bytes(config_bytes)
    _write_json(
        root / "image/overlay2/repositories" / image_id,
        {
            "Repository": IMAGE_REPOSITORY,
            "Tag": IMAGE_TAG,
            "ID": image_id,
            "Created": CREATED,
            "image_layer_info": {"Layers": [{"Digest": f"sha256:{layer}"} for layer in (BASE_LAYER_ID, MID_LAYER_ID)]},
        },
    )
    _write_json(
        root / "containers" / container_id / "config.json",
        {
            "ID": container_id,
            "Name": name,
            "Created": CREATED,
            "State": {"Running": running, "Pid": 0},
            "Config": {"Cmd": CONTAINER_CMD, "Image": f"{IMAGE_REPOSITORY}:{IMAGE_TAG}", "Env": CONTAINER_ENV},
        },
    )


def image_id(root: Path) -> str:
    """The id of the one image the builder wrote under `root`."""
    (path,) = (root / "image/overlay2/repositories").iterdir()
    return path.name


def build_rocker_storage(root: Path, *, name: str = "web-1", running: bool = False) -> RockerStorage:
    """Build base and mid image layers and one container layer under `root` through real overlay mounts."""
    container_id = container_id_for(name)
    layers = root / "overlay2"
    base, mid, top = layers / BASE_LAYER_ID, layers / MID_LAYER_ID, layers / container_id
    _write_base(base / "diff")

    for sub in ("diff", "work", "merged"):
        _dir(mid / sub)
    (mid / "lower").write_text(f"{BASE_LAYER_ID}/diff")
    with overlay_mount([base / "diff"], mid / "diff", mid / "work", mid / "merged") as merged:
        _write_mid(merged)

    for sub in ("diff", "work", "merged"):
        _dir(top / sub)
    (top / "lower").write_text(f"{BASE_LAYER_ID}/diff:{MID_LAYER_ID}/diff")  # rocker's order: bottom first
    with overlay_mount([mid / "diff", base / "diff"], top / "diff", top / "work", top / "merged") as merged:
        _write_container(merged)
        view = read_tree(merged)

    for layer in (base, mid, top):
        _fix_mtimes(layer / "diff")
    _write_metadata(root, container_id, name, running)
    return RockerStorage(
        root=root,
        container_id=container_id,
        layer_ids=(BASE_LAYER_ID, MID_LAYER_ID, container_id),
        merged=view,
    )

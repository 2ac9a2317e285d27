"""The shared end-to-end check of a docker-archive: Python, skopeo+umoci and podman must each unpack the container's
merged view exactly (docker-archive: https://github.com/moby/moby/tree/master/image/tarexport; whiteouts:
https://github.com/opencontainers/image-spec/blob/main/layer.md#whiteouts)."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import os
import shutil
import stat
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import IO, Any

import zstandard

from tests.support.overlay_storage import Entry, TreeView, is_image_xattr, read_tree

WHITEOUT_PREFIX = b".wh."  # .wh.<name> in a layer deletes <name> of the layers below
OPAQUE_MARKER = b".wh..wh..opq"  # <dir>/.wh..wh..opq hides everything the layers below hold in <dir>
XATTR_PAX_PREFIX = "SCHILY.xattr."  # the PAX record GNU tar, Go's archive/tar and Python's tarfile use for xattrs
_ENCODING, _ERRORS = "utf-8", "surrogateescape"  # how tarfile maps non-UTF-8 bytes of names and PAX values to str

_ENTRY_FIELDS = tuple(f.name for f in dataclasses.fields(Entry))


# --- running the real tools ---------------------------------------------------------------------------------------


def _run(argv: list[str], *, env: dict[str, str] | None = None) -> str:
    """Run a command; any failure becomes an AssertionError that quotes the command and its stderr."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, check=False, env=env)
    except OSError as exc:
        raise AssertionError(f"cannot run {' '.join(argv)}: {exc}") from exc
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed (exit {done.returncode}):\n{done.stderr.strip()}")
    return done.stdout


def podman_command(
    work: Path, *, driver: str = "vfs", root: Path | None = None
) -> tuple[list[str], dict[str, str], Path]:
    """podman's argv, environment and runroot, pointed only at directories under `work`.

    The storage.conf in `work` replaces the host's (CONTAINERS_STORAGE_CONF), so no host option (an overlay
    mount_program, another graphroot) applies; podman refuses a storage.conf without driver and runroot.
    podman 4.3 refuses a runroot longer than 50 characters, so it lives in a short directory named after `work`.
    --tmpdir keeps podman's alive lock and the events log (--events-backend file) under `work`;
    --network-config-dir keeps netavark's lock file out of /etc; --cgroup-manager cgroupfs avoids asking systemd.
    """
    root = root or work / "podroot"
    runroot = Path(tempfile.gettempdir()) / f"pr-{hashlib.sha256(os.fsencode(work)).hexdigest()[:16]}"
    conf = work / "storage.conf"
    conf.write_text(f'[storage]\ndriver = "{driver}"\nrunroot = "{runroot}"\ngraphroot = "{root}"\n')
    argv = [
        "podman",
        "--root", str(root),
        "--runroot", str(runroot),
        "--tmpdir", str(work / "podtmp"),
        "--network-config-dir", str(work / "podnet"),
        "--storage-driver", driver,
        "--cgroup-manager", "cgroupfs",
        "--events-backend", "file",
    ]  # fmt: skip
    return argv, {**os.environ, "CONTAINERS_STORAGE_CONF": str(conf)}, runroot


# --- reading and applying a docker-archive with Python only ----------------------------------------------------------


def read_archive_manifest(archive: Path) -> dict[str, Any]:
    """The single image entry of a docker-archive's manifest.json."""
    with tarfile.open(archive, "r:") as outer:
        return _read_manifest(outer, archive)


def read_archive_config(archive: Path) -> dict[str, Any]:
    """The image config a docker-archive's manifest.json names."""
    with tarfile.open(archive, "r:") as outer:
        config: dict[str, Any] = json.load(_member(outer, _read_manifest(outer, archive)["Config"], archive))
    return config


def _read_manifest(outer: tarfile.TarFile, archive: Path) -> dict[str, Any]:
    manifest = json.load(_member(outer, "manifest.json", archive))
    if not isinstance(manifest, list) or len(manifest) != 1:
        raise AssertionError(f"{archive}: manifest.json must list exactly one image, got {manifest!r}")
    entry: dict[str, Any] = manifest[0]
    return entry


def _member(outer: tarfile.TarFile, name: str, archive: Path) -> IO[bytes]:
    try:
        f = outer.extractfile(name)
    except KeyError:
        f = None
    if f is None:
        raise AssertionError(f"{archive}: no regular file {name!r} in the archive")
    return f


def unpack_layers_with_python(archive: Path, dest: Path) -> None:
    """Verify every layer's diff_id and apply the layers of a docker-archive in order into `dest`."""
    with tarfile.open(archive, "r:") as outer:
        manifest = _read_manifest(outer, archive)
        config = json.load(_member(outer, manifest["Config"], archive))
        layers: list[str] = manifest["Layers"]
        diff_ids: list[str] = config["rootfs"]["diff_ids"]
        if len(layers) != len(diff_ids):
            raise AssertionError(f"{archive}: {len(layers)} layers but {len(diff_ids)} rootfs.diff_ids")
        dest.mkdir(parents=True, exist_ok=True)
        for name, diff_id in zip(layers, diff_ids, strict=True):
            # A diff_id is the digest of the uncompressed tar: gzip or zstd blobs are decompressed first.
            with _uncompressed(_member(outer, name, archive)) as blob:
                actual = f"sha256:{_sha256(blob)}"
                if actual != diff_id:
                    raise AssertionError(f"{archive}: layer {name} hashes to {actual}, but its diff_id says {diff_id}")
                blob.seek(0)
                with tarfile.open(fileobj=blob, mode="r:", encoding=_ENCODING, errors=_ERRORS) as layer:
                    _apply_layer(layer, dest, f"{archive}:{name}")


def _uncompressed(blob: IO[bytes]) -> IO[bytes]:
    """The blob's tar in a seekable temporary file, decompressed when it starts with a gzip or zstd magic."""
    magic = blob.read(4)
    blob.seek(0)
    out = tempfile.TemporaryFile()
    if magic[:2] == b"\x1f\x8b":
        with gzip.GzipFile(fileobj=blob) as source:
            shutil.copyfileobj(source, out, 1 << 20)
    elif magic == b"\x28\xb5\x2f\xfd":
        zstandard.ZstdDecompressor().copy_stream(blob, out)
    else:
        shutil.copyfileobj(blob, out, 1 << 20)
    out.seek(0)
    return out


def _sha256(stream: IO[bytes]) -> str:
    digest = hashlib.sha256()
    while chunk := stream.read(1 << 20):
        digest.update(chunk)
    return digest.hexdigest()


def _layer_path(name: str, where: str) -> bytes:
    """A member name as a bytes path relative to the root (b"" for the root itself); refuses names that escape it."""
    parts = [p for p in os.fsencode(name).split(b"/") if p not in (b"", b".")]
    if b".." in parts:
        raise AssertionError(f"{where}: member {name!r} escapes the root")
    return b"/".join(parts)


def _inside(dest: Path, rel: bytes, where: str) -> bytes:
    """The on-disk path of `rel` under `dest`, refusing to pass through a symlink of an earlier layer."""
    base = os.fsencode(dest)
    parent = base
    for part in rel.split(b"/")[:-1]:
        parent = os.path.join(parent, part)
        if os.path.islink(parent):
            raise AssertionError(f"{where}: {rel!r} goes through the symlink {parent!r}")
    return os.path.join(base, rel)


def _remove(path: bytes) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def _apply_layer(layer: tarfile.TarFile, dest: Path, where: str) -> None:
    members = layer.getmembers()
    paths = [_layer_path(m.name, where) for m in members]
    seen: set[bytes] = set()
    for rel in paths:
        if rel in seen:
            raise AssertionError(f"{where}: duplicate path {rel!r} (an OCI layer must not repeat a path)")
        seen.add(rel)
    # Applied in tar order, as moby's and containerd's appliers do: a whiteout removes what the layers below
    # left, never an entry this layer itself wrote (image-spec layer.md), and an opaque marker follows its
    # directory's own entry, so a lower symlink replaced by a directory is gone before the marker is read.
    written: set[bytes] = set()
    for member, rel in zip(members, paths, strict=True):
        name = rel.rpartition(b"/")[2]
        if not rel:
            continue
        if not name.startswith(WHITEOUT_PREFIX):
            try:
                _extract(layer, member, rel, dest, where)
            except OSError as exc:
                raise AssertionError(f"{where}: cannot apply {member.name!r}: {exc}") from exc
            written.add(rel)
            continue
        parent_rel = rel[: -len(name) - 1]
        target_dir = _inside(dest, rel, where)[: -len(name) - 1]
        if name == OPAQUE_MARKER:
            if os.path.isdir(target_dir):
                for child in os.listdir(target_dir):
                    if (parent_rel + b"/" + child if parent_rel else child) not in written:
                        _remove(os.path.join(target_dir, child))
        else:
            victim_rel = (parent_rel + b"/" if parent_rel else b"") + name[len(WHITEOUT_PREFIX) :]
            victim = os.path.join(target_dir, name[len(WHITEOUT_PREFIX) :])
            if victim_rel in written:
                raise AssertionError(f"{where}: whiteout {rel!r} names an entry of its own layer")
            if os.path.lexists(victim):
                _remove(victim)


def _ensure_parents(dest: Path, rel: bytes) -> None:
    parent = os.fsencode(dest)
    for part in rel.split(b"/")[:-1]:
        parent = os.path.join(parent, part)
        if not os.path.lexists(parent):
            os.mkdir(parent, 0o755)


def _extract(layer: tarfile.TarFile, member: tarfile.TarInfo, rel: bytes, dest: Path, where: str) -> None:
    path = _inside(dest, rel, where)
    _ensure_parents(dest, rel)
    keep_dir = member.isdir() and os.path.isdir(path) and not os.path.islink(path)
    if os.path.lexists(path) and not keep_dir:
        _remove(path)
    if member.islnk():
        link_rel = _layer_path(member.linkname, where)
        os.link(_inside(dest, link_rel, where), path)
        return  # the inode already carries owner, mode and xattrs
    if member.isreg():
        source = layer.extractfile(member)
        assert source is not None
        with open(path, "wb") as out:
            shutil.copyfileobj(source, out, 1 << 20)
    elif member.isdir():
        if not keep_dir:
            os.mkdir(path, 0o700)
    elif member.issym():
        os.symlink(os.fsencode(member.linkname), path)
    elif member.isfifo():
        os.mkfifo(path, 0o600)
    elif member.ischr() or member.isblk():
        kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK
        os.mknod(path, kind | 0o600, os.makedev(member.devmajor, member.devminor))
    else:
        raise AssertionError(f"{where}: unsupported member type {member.type!r} at {rel!r}")
    # chown clears setuid/setgid bits and security.capability, so owner first, then mode, then xattrs.
    os.chown(path, member.uid, member.gid, follow_symlinks=False)
    if not member.issym():
        os.chmod(path, member.mode & 0o7777)
    _replace_xattrs(path, member, keep_dir)
    os.utime(path, (member.mtime, member.mtime), follow_symlinks=False)


def _replace_xattrs(path: bytes, member: tarfile.TarInfo, existed: bool) -> None:
    wanted = {
        key[len(XATTR_PAX_PREFIX) :]: value.encode(_ENCODING, _ERRORS)
        for key, value in member.pax_headers.items()
        if key.startswith(XATTR_PAX_PREFIX)
    }
    if existed:  # a directory entry replaces the lower directory's metadata, xattrs included
        for name in os.listxattr(path, follow_symlinks=False):
            if name not in wanted and is_image_xattr(name):
                os.removexattr(path, name, follow_symlinks=False)
    for name, value in wanted.items():
        os.setxattr(path, name, value, follow_symlinks=False)


# --- comparison -----------------------------------------------------------------------------------------------------


def _show(path: bytes) -> str:
    return path.decode("utf-8", "backslashreplace")


def compare_trees(expected: TreeView, actual: TreeView, *, label: str) -> None:
    """Fail with every path at which `actual` differs from `expected`, prefixed by which consumer saw it.

    There is deliberately no way to ignore a field: as root, the Python unpacker, umoci 0.4.7 and podman 4.3.1
    (vfs) were each measured to reproduce every field, xattr and hardlink of build_rocker_storage's merged view.
    """
    problems: list[str] = []
    for path in sorted(expected.entries.keys() - actual.entries.keys()):
        problems.append(f"missing: {_show(path)} ({expected.entries[path].kind})")
    for path in sorted(actual.entries.keys() - expected.entries.keys()):
        problems.append(f"extra: {_show(path)} ({actual.entries[path].kind})")
    for path in sorted(expected.entries.keys() & actual.entries.keys()):
        want, got = expected.entries[path], actual.entries[path]
        for name in _ENTRY_FIELDS:
            if (a := getattr(want, name)) != (b := getattr(got, name)):
                a, b = (f"{a:#o}", f"{b:#o}") if name == "mode" else (repr(a), repr(b))
                problems.append(f"differs: {_show(path)}: {name} expected {a}, got {b}")
    for group in sorted(sorted(g) for g in expected.hardlinks - actual.hardlinks):
        problems.append(f"hardlink group missing: {', '.join(_show(p) for p in group)}")
    for group in sorted(sorted(g) for g in actual.hardlinks - expected.hardlinks):
        problems.append(f"hardlink group unexpected: {', '.join(_show(p) for p in group)}")
    if problems:
        raise AssertionError(
            f"[{label}] {len(problems)} difference(s) from the merged view:\n  " + "\n  ".join(problems)
        )


# --- the end-to-end check -------------------------------------------------------------------------------------------


def check_image_archive(archive: Path, expected: TreeView, work: Path, *, ref: str) -> None:
    """Check a docker-archive with skopeo, a Python unpacker, skopeo+umoci and podman against `expected`.

    `ref` is the name podman knows the loaded image by (one of the archive's RepoTags, e.g. "web:1").
    """
    work.mkdir(parents=True, exist_ok=True)
    manifest = read_archive_manifest(archive)

    inspected = json.loads(_run(["skopeo", "inspect", f"docker-archive:{archive}"]))
    if len(inspected["Layers"]) != len(manifest["Layers"]):
        raise AssertionError(
            f"[skopeo] inspect lists {len(inspected['Layers'])} layers, manifest.json {len(manifest['Layers'])}"
        )

    python_root = work / "python-rootfs"
    unpack_layers_with_python(archive, python_root)
    compare_trees(expected, read_tree(python_root), label="python")

    oci = work / "oci"
    _run(["skopeo", "--insecure-policy", "copy", "--quiet", f"docker-archive:{archive}", f"oci:{oci}:check"])
    _run(["umoci", "unpack", "--image", f"{oci}:check", str(work / "bundle")])
    compare_trees(expected, read_tree(work / "bundle/rootfs"), label="umoci")

    podman, env, runroot = podman_command(work.resolve())
    try:
        _run([*podman, "load", "--quiet", "-i", str(archive)], env=env)
        mounted = Path(_run([*podman, "image", "mount", ref], env=env).strip())
        compare_trees(expected, read_tree(mounted), label="podman")
    except BaseException:
        _remove_podman_image(podman, env, runroot, ref, strict=False)  # the first failure is the one to report
        raise
    _remove_podman_image(podman, env, runroot, ref, strict=True)


def _remove_podman_image(podman: list[str], env: dict[str, str], runroot: Path, ref: str, *, strict: bool) -> None:
    try:
        for argv in ([*podman, "image", "unmount", ref], [*podman, "rmi", "--force", ref]):
            if strict:
                _run(argv, env=env)
            else:
                subprocess.run(argv, capture_output=True, check=False, env=env)
    finally:
        shutil.rmtree(runroot, ignore_errors=True)


def check_oci_image(image: Path, expected: TreeView, work: Path, *, tag: str, ref: str) -> None:
    """Check an OCI archive (a tar) or OCI layout directory with skopeo, umoci and podman against `expected`.

    `tag` is its org.opencontainers.image.ref.name; `ref` the name podman knows it by once loaded.
    """
    work.mkdir(parents=True, exist_ok=True)
    transport = "oci" if image.is_dir() else "oci-archive"
    inspected = json.loads(_run(["skopeo", "inspect", f"{transport}:{image}:{tag}"]))
    if not inspected["Layers"]:
        raise AssertionError(f"[skopeo] {transport}:{image}:{tag} has no layers")
    layout = work / "oci"
    _run(["skopeo", "--insecure-policy", "copy", "--quiet", f"{transport}:{image}:{tag}", f"oci:{layout}:check"])
    # Debian's umoci 0.4.7 refuses tar+zstd layers ("blob is not correct mediatype"); podman below reads them.
    raw = json.loads(_run(["skopeo", "inspect", "--raw", f"{transport}:{image}:{tag}"]))
    if not any(layer["mediaType"].endswith("+zstd") for layer in raw["layers"]):
        _run(["umoci", "unpack", "--image", f"{layout}:check", str(work / "bundle")])
        compare_trees(expected, read_tree(work / "bundle/rootfs"), label=f"umoci via {transport}")

    podman, env, runroot = podman_command(work.resolve())
    try:
        loaded = _run([*podman, "load", "-i", str(image)], env=env)
        if transport == "oci":
            # podman 4 names an image loaded from a layout directory after the directory, not its annotations.
            ref = loaded.rpartition("Loaded image: ")[2].strip() or ref
        mounted = Path(_run([*podman, "image", "mount", ref], env=env).strip())
        compare_trees(expected, read_tree(mounted), label=f"podman via {transport}")
    except BaseException:
        _remove_podman_image(podman, env, runroot, ref, strict=False)
        raise
    _remove_podman_image(podman, env, runroot, ref, strict=True)

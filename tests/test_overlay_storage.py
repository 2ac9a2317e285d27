"""Tests of the test side itself: the real-overlay rocker storage builder and the end-to-end image checker."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import stat
import tarfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from tests.support import imagecheck
from tests.support.imagecheck import check_image_archive, compare_trees
from tests.support.overlay_storage import (
    BASE_LAYER_ID,
    CAPABILITY_NET_RAW,
    FIXED_MTIME,
    MID_LAYER_ID,
    Entry,
    RockerStorage,
    TreeView,
    build_rocker_storage,
    image_id,
    overlay_mount,
    read_tree,
)


@pytest.fixture(scope="module")
def storage(tmp_path_factory: pytest.TempPathFactory) -> RockerStorage:
    return build_rocker_storage(tmp_path_factory.mktemp("storage") / "rocker")


def _diff(storage: RockerStorage, layer_id: str) -> Path:
    return storage.root / "overlay2" / layer_id / "diff"


def _is_whiteout(path: Path) -> bool:
    st = os.lstat(path)
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(0, 0)


# --- the builder ----------------------------------------------------------------------------------------------------


@pytest.mark.overlay
def test_mid_layer_records_deleted_lower_file_and_dir_as_whiteouts(storage: RockerStorage) -> None:
    mid = _diff(storage, MID_LAYER_ID)
    assert _is_whiteout(mid / "lib/old.so")
    assert _is_whiteout(mid / "var/cache")
    assert (_diff(storage, BASE_LAYER_ID) / "lib/old.so").is_file()  # the lower layer itself is untouched


@pytest.mark.overlay
def test_container_layer_marks_recreated_lower_dir_opaque(storage: RockerStorage) -> None:
    top = _diff(storage, storage.container_id)
    assert os.getxattr(top / "opt/app", "trusted.overlay.opaque") == b"y"
    assert _is_whiteout(top / "etc/hostname")
    assert (top / "etc/app.conf").read_bytes() == b"setting=1\nsetting=2\n"  # copied up, then modified
    assert (_diff(storage, BASE_LAYER_ID) / "etc/app.conf").read_bytes() == b"setting=1\n"


@pytest.mark.overlay
def test_merged_view_lacks_deleted_paths(storage: RockerStorage) -> None:
    entries = storage.merged.entries
    for gone in (
        b"lib/old.so",
        b"var/cache",
        b"var/cache/motd",
        b"etc/hostname",
        b"opt/app/old.py",
        b"opt/app/lib/util.py",
    ):
        assert gone not in entries
    assert entries[b"opt/app/main.py"].kind == "file"
    assert entries[b"opt/app/lib/helpers.py"].kind == "file"


@pytest.mark.overlay
def test_merged_view_has_every_entry_kind_the_product_must_pack(storage: RockerStorage) -> None:
    entries = storage.merged.entries
    assert {e.kind for e in entries.values()} == {"file", "dir", "symlink", "fifo", "char", "block"}
    assert entries[b"dev/null"].rdev == (1, 3)
    assert entries[b"dev/loop0"].rdev == (7, 0)
    assert entries[b"usr/local/bin/su-helper"].mode == 0o4755
    assert entries[b"usr/bin/passwd"].mode == 0o4755
    secret = entries[b"home/user/.secret"]
    assert (secret.uid, secret.gid, secret.mode) == (1000, 1000, 0o600)
    assert entries[b"var/tmp"].mode == entries[b"tmp"].mode == 0o1777
    capability = ("security.capability", CAPABILITY_NET_RAW)
    assert entries[b"usr/local/bin/capped"].xattrs == (capability,)
    assert entries[b"usr/sbin/ping"].xattrs == (capability,)
    assert dict(entries[b"srv/tagged.txt"].xattrs)["user.binary"] == b"\xff\x00\x01raw"
    assert entries[b"srv"].xattrs == (("user.owner", b"web"),)
    assert entries[b"srv/broken"].target == b"../does/not/exist"
    assert entries[b"usr/local/bin/shell"].target == b"/bin/busybox"
    assert entries[b"srv/www/current"].target == b"index.html"
    assert any(len(p.rpartition(b"/")[2]) > 100 for p in entries)
    assert any(len(p) > 255 for p in entries)
    assert "café/日本.txt".encode() in entries
    assert b"srv/bad-\xff-name" in entries
    assert entries[b"srv/sparse.img"].size == 8 << 20
    assert os.lstat(_diff(storage, storage.container_id) / "srv/sparse.img").st_blocks * 512 < 1 << 20  # has a hole
    assert entries[b"srv/empty.txt"].size == 0
    assert entries[b"srv/blob.bin"].size >= 1 << 20
    assert not any(p.startswith(b"srv/empty/") for p in entries)
    assert storage.merged.hardlinks == {
        frozenset({b"data/hello.txt", b"data/hello-hardlink.txt"}),
        frozenset({b"usr/lib/libx.so.1", b"usr/lib/libx-hardlink.so.1"}),
        frozenset({b"srv/www/index.html", b"srv/www/index-hardlink.html"}),
    }
    assert not any(name.startswith(("trusted.", "user.overlay.")) for e in entries.values() for name, _ in e.xattrs)


@pytest.mark.overlay
def test_builder_leaves_nothing_mounted(storage: RockerStorage) -> None:
    mount_points = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    assert not [m for m in mount_points if m.startswith(str(storage.root))]
    for layer in storage.layer_ids[1:]:
        assert list((storage.root / "overlay2" / layer / "merged").iterdir()) == []


@pytest.mark.overlay
def test_overlay_mount_unmounts_when_the_body_fails(tmp_path: Path) -> None:
    dirs = [tmp_path / name for name in ("lower", "upper", "work", "merged")]
    for d in dirs:
        d.mkdir()
    with pytest.raises(ValueError, match="the body failed"), overlay_mount(dirs[:1], *dirs[1:]) as merged:
        (merged / "written-while-mounted").write_bytes(b"x")
        raise ValueError("the body failed")
    assert not os.path.ismount(dirs[3])
    assert (dirs[1] / "written-while-mounted").exists()


@pytest.mark.overlay
def test_storage_follows_rocker_layout(storage: RockerStorage) -> None:
    assert storage.layer_ids == (BASE_LAYER_ID, MID_LAYER_ID, storage.container_id)
    assert all(re.fullmatch("[0-9a-f]{64}", i) for i in storage.layer_ids)
    layers = storage.root / "overlay2"
    assert not (layers / BASE_LAYER_ID / "lower").exists()
    assert (layers / MID_LAYER_ID / "lower").read_text() == f"{BASE_LAYER_ID}/diff"
    assert (layers / storage.container_id / "lower").read_text() == f"{BASE_LAYER_ID}/diff:{MID_LAYER_ID}/diff"
    config = json.loads((storage.root / "containers" / storage.container_id / "config.json").read_text())
    assert (config["ID"], config["Name"], config["State"]) == (
        storage.container_id,
        "web-1",
        {"Running": False, "Pid": 0},
    )
    assert config["Config"]["Image"] == "base:1.0"
    image = json.loads((storage.root / "image/overlay2/repositories" / image_id(storage.root)).read_text())
    assert image["image_layer_info"]["Layers"] == [{"Digest": f"sha256:{i}"} for i in (BASE_LAYER_ID, MID_LAYER_ID)]
    image_config = (storage.root / "image/overlay2/imagedb/content/sha256" / image["ID"]).read_bytes()
    assert hashlib.sha256(image_config).hexdigest() == image["ID"]
    assert json.loads(image_config)["config"]["Labels"]["quoted"] == 'say "hi" \\ bye'


@pytest.mark.overlay
def test_every_layer_entry_has_the_fixed_mtime(storage: RockerStorage) -> None:
    for layer in storage.layer_ids:
        for dirpath, dirnames, filenames in os.walk(os.fsencode(_diff(storage, layer))):
            for name in dirnames + filenames:
                assert os.lstat(os.path.join(dirpath, name)).st_mtime == FIXED_MTIME


# --- the checker ----------------------------------------------------------------------------------------------------


PLAIN_FILE = Entry(kind="file", mode=0o644, uid=0, gid=0, size=0, sha256="", target=b"", rdev=(0, 0), xattrs=())


def test_compare_trees_names_every_difference_and_the_consumer() -> None:
    expected = TreeView(
        entries={b"a": PLAIN_FILE, b"b": PLAIN_FILE, b"c": replace(PLAIN_FILE, mode=0o4755), b"bad-\xff": PLAIN_FILE},
        hardlinks=frozenset({frozenset({b"a", b"b"})}),
    )
    actual = TreeView(
        entries={
            b"a": PLAIN_FILE,
            b"b": PLAIN_FILE,
            b"c": replace(PLAIN_FILE, mode=0o755),
            b"d": replace(PLAIN_FILE, kind="fifo"),
        },
        hardlinks=frozenset(),
    )
    with pytest.raises(AssertionError) as failure:
        compare_trees(expected, actual, label="umoci")
    message = str(failure.value)
    assert message.startswith("[umoci] 4 difference(s)")
    assert "missing: bad-\\xff (file)" in message
    assert "extra: d (fifo)" in message
    assert "differs: c: mode expected 0o4755, got 0o755" in message
    assert "hardlink group missing: a, b" in message
    compare_trees(expected, expected, label="same")


def _write_tree(root: Path) -> None:
    (root / "etc").mkdir(parents=True)
    (root / "etc/motd").write_bytes(b"hello\n")
    os.link(root / "etc/motd", root / "etc/motd.link")
    (root / "bin").mkdir()
    (root / "bin/tool").write_bytes(b"#!/bin/sh\n")
    os.chmod(root / "bin/tool", 0o4755)
    os.symlink("../etc/motd", root / "bin/motd")


def _write_docker_archive(archive: Path, source: Path, *, keep: Callable[[str], bool]) -> None:
    """A minimal docker-archive: one layer tarred from `source` with the members `keep` accepts."""

    def member(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        info.uname = info.gname = ""
        return info if keep(info.name) else None

    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for child in sorted(source.iterdir()):
            tar.add(child, arcname=child.name, filter=member)
    diff_id = "sha256:" + hashlib.sha256(layer.getvalue()).hexdigest()
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": [diff_id]}})
    config_name = hashlib.sha256(config.encode()).hexdigest() + ".json"
    manifest = json.dumps([{"Config": config_name, "RepoTags": ["checker-test:1"], "Layers": ["layer.tar"]}])
    with tarfile.open(archive, "w") as tar:
        for name, data in (("manifest.json", manifest.encode()), (config_name, config.encode()), ("layer.tar", None)):
            payload = layer.getvalue() if data is None else data
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


@pytest.mark.root
@pytest.mark.tools
def test_check_image_archive_accepts_a_faithful_archive(tmp_path: Path) -> None:
    _write_tree(tmp_path / "source")
    _write_docker_archive(tmp_path / "image.tar", tmp_path / "source", keep=lambda name: True)
    check_image_archive(tmp_path / "image.tar", read_tree(tmp_path / "source"), tmp_path / "work", ref="checker-test:1")
    podroot = tmp_path / "work/podroot"  # the loaded image is gone again
    assert json.loads((podroot / "vfs-images/images.json").read_text()) == []
    assert list((podroot / "vfs/dir").iterdir()) == []


@pytest.mark.root
@pytest.mark.tools
def test_check_image_archive_names_a_missing_file(tmp_path: Path) -> None:
    _write_tree(tmp_path / "source")
    _write_docker_archive(tmp_path / "image.tar", tmp_path / "source", keep=lambda name: name != "bin/tool")
    with pytest.raises(AssertionError, match=r"\[python\] 1 difference\(s\).*\n  missing: bin/tool \(file\)"):
        check_image_archive(
            tmp_path / "image.tar", read_tree(tmp_path / "source"), tmp_path / "work", ref="checker-test:1"
        )


@pytest.mark.root
@pytest.mark.tools
def test_every_consumer_reports_a_missing_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_tree(tmp_path / "source")
    _write_docker_archive(tmp_path / "image.tar", tmp_path / "source", keep=lambda name: name != "etc/motd.link")
    failures: dict[str, str] = {}

    def record(expected: TreeView, actual: TreeView, *, label: str) -> None:
        try:
            compare_trees(expected, actual, label=label)
        except AssertionError as exc:
            failures[label] = str(exc)

    monkeypatch.setattr(imagecheck, "compare_trees", record)
    check_image_archive(tmp_path / "image.tar", read_tree(tmp_path / "source"), tmp_path / "work", ref="checker-test:1")
    assert sorted(failures) == ["podman", "python", "umoci"]
    for label, message in failures.items():
        assert f"[{label}] 2 difference(s)" in message
        assert "missing: etc/motd.link (file)" in message
        assert "hardlink group missing: etc/motd, etc/motd.link" in message

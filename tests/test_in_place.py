"""Archives assembled in place (issue 14, store.pack): on a filesystem that collapses ranges (ext4 and XFS), each
layer is written once, into a slot of the archive file itself, and the file is closed up around the layers; the
cache keeps the archive (a hardlink) and finds the layers in it. The bytes are those the copying path writes."""

from __future__ import annotations

import os
import random
import resource
import subprocess
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from pipeline.host import extents
from pipeline.layer.tarheader import ALIGNMENT
from pipeline.store.cache import LayerCache
from pipeline.store.layout import CacheLayout
from tests.support.cli import commit_args, run_luigi
from tests.support.fleet import add_container
from tests.support.imagecheck import check_image_archive, read_archive_manifest
from tests.support.overlay_storage import build_rocker_storage, container_id_for

pytestmark = [pytest.mark.overlay, pytest.mark.tools("skopeo", "umoci", "podman")]

NAME = "data-1"
BIG = 16 * (1 << 20) + 777


def _written_by_children() -> int:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_oublock * 512


def _commit(root: Path, work: Path, archive: Path) -> int:
    """Bytes the commit wrote to disk (its process tree; every file is fsync'd, so nothing is left in memory)."""
    before = _written_by_children()
    done = run_luigi(
        *commit_args(root, work, "--id", container_id_for(NAME), "--image", "data:1", "--output", str(archive))
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return _written_by_children() - before


@pytest.fixture
def storage(tmp_path: Path) -> tuple[Path, object]:
    if not extents.can_collapse(tmp_path, ALIGNMENT):
        pytest.skip(f"{tmp_path}: its filesystem cannot collapse ranges (ext4 and XFS can); nothing is in place")
    root = tmp_path / "rocker"
    build_rocker_storage(root)
    view = add_container(root, NAME, {"srv/data.bin": random.Random(3).randbytes(BIG), "srv/a.txt": b"a\n"})
    os.sync()
    return root, view


def test_a_cold_commit_writes_each_layer_once_into_the_archive_itself(
    storage: tuple[Path, object], tmp_path: Path
) -> None:
    root, view = storage
    archive = tmp_path / "out" / "data.tar"
    written = _commit(root, tmp_path / "work", archive)
    size = archive.stat().st_size
    assert size > BIG
    # Once: the old path wrote every layer twice (cache blob, then the archive) and measured > 2x.
    assert written < 1.2 * size, (written, size)

    cache = tmp_path / "work" / "cache"
    [packed] = CacheLayout(cache).packs()
    assert os.path.samefile(packed, archive) and archive.stat().st_nlink == 2
    with tarfile.open(archive) as tar:
        members = {m.name: (m.offset_data, m.size) for m in tar if m.isreg()}
    for layer in read_archive_manifest(archive)["Layers"]:
        digest = "sha256:" + layer.rsplit("/", 1)[1]
        assert not CacheLayout(cache).blob(digest).exists()  # no copy of its own: the cache finds it in the archive
        source = LayerCache(cache).locate(digest, members[layer][1])
        assert source is not None and (source.path, source.offset) == (packed, members[layer][0])
    check_image_archive(archive, view, tmp_path / "check", ref="data:1")  # type: ignore[arg-type]


def test_more_archives_of_one_commit_are_copies_and_a_lost_one_comes_back_linked(
    storage: tuple[Path, object], tmp_path: Path
) -> None:
    root, _ = storage
    work = tmp_path / "work"
    first, second = tmp_path / "out" / "a.tar", tmp_path / "out" / "b.tar"
    _commit(root, work, first)
    # A second archive of the same image is a copy of its own: editing one never changes another (or the cache).
    _commit(root, work, second)
    assert second.read_bytes() == first.read_bytes()
    assert not os.path.samefile(first, second) and second.stat().st_nlink == 1
    # The first deleted, the cache still holds its archive: committing again links it back, writing ~nothing.
    first.unlink()
    written = _commit(root, work, first)
    assert first.read_bytes() == second.read_bytes() and first.stat().st_nlink == 2
    assert written < BIG // 10, written


@contextmanager
def _tmpfs(where: Path) -> Iterator[Path]:
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512m", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


def test_the_copying_path_writes_the_same_archive(storage: tuple[Path, object], tmp_path: Path) -> None:
    """tmpfs collapses nothing: there the layers go into blob files and are copied into the archive, which must be
    byte-identical to the one assembled in place (SOURCE_DATE_EPOCH fixes every time stamp)."""
    root, _ = storage
    epoch = {"SOURCE_DATE_EPOCH": "1700000000"}
    in_place = tmp_path / "in-place.tar"
    args = ("--id", container_id_for(NAME), "--image", "data:1")
    assert run_luigi(*commit_args(root, tmp_path / "w1", *args, "--output", str(in_place)), env=epoch).returncode == 0
    with _tmpfs(tmp_path / "tmpfs") as fs:
        assert not extents.can_collapse(fs, ALIGNMENT)
        copied = fs / "copied.tar"
        done = run_luigi(*commit_args(root, fs / "w2", *args, "--output", str(copied)), env=epoch)
        assert done.returncode == 0, done.stderr[-3000:]
        assert CacheLayout(fs / "w2" / "cache").packs() == []
        assert copied.read_bytes() == in_place.read_bytes()

"""A full filesystem: a one-line error with the path and the space needed, nothing partial, then a clean re-run."""

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.demo import build_sample_storage
from tests.support.cli import commit_args, error_lines, run_luigi, tree_fingerprint

pytestmark = pytest.mark.root


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)], check=True)
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def _bytes_under(path: Path) -> int:
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file())


def test_full_cache_disk_fails_cleanly_and_rerun_succeeds_after_space_is_freed(
    tmp_path: Path, small_tmpfs: Path
) -> None:
    root = tmp_path / "storage"
    cid = build_sample_storage(root)
    (root / "overlay2" / cid / "diff" / "app" / "big.bin").write_bytes(os.urandom(3 << 20))
    before = tree_fingerprint(root)
    args = commit_args(root, small_tmpfs, "--id", cid, "--output", str(small_tmpfs / "out" / "img.tar"))

    result = run_luigi(*args)
    assert result.returncode != 0
    [line] = error_lines(result)
    assert str(small_tmpfs / "cache" / "blobs") in line and "no space left" in line and "needs about" in line
    assert _bytes_under(small_tmpfs) < 1 << 20
    assert not (small_tmpfs / "out" / "img.tar").exists()

    subprocess.run(["mount", "-o", "remount,size=64m", str(small_tmpfs)], check=True)
    assert run_luigi(*args).returncode == 0
    assert (small_tmpfs / "out" / "img.tar").stat().st_size > 3 << 20
    assert [p for p in small_tmpfs.rglob("*") if ".partial-" in p.name] == []
    assert tree_fingerprint(root) == before


def test_archive_that_cannot_fit_is_refused_before_writing(tmp_path: Path, small_tmpfs: Path) -> None:
    root = tmp_path / "storage"
    cid = build_sample_storage(root)
    (root / "overlay2" / cid / "diff" / "app" / "big.bin").write_bytes(os.urandom(3 << 20))
    result = run_luigi(*commit_args(root, tmp_path, "--id", cid, "--output", str(small_tmpfs / "img.tar")))
    assert result.returncode != 0
    [line] = error_lines(result)
    assert str(small_tmpfs / "img.tar") in line and "needs" in line and "free" in line
    assert list(small_tmpfs.iterdir()) == []

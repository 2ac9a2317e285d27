"""Two commit processes at once, each with its own local scheduler, sharing one cache."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.demo import build_sample_storage
from tests.cli import REPO, commit_args
from tests.imagecheck import read_archive_manifest


@pytest.fixture
def storage(tmp_path: Path) -> tuple[Path, str]:
    root = tmp_path / "storage"
    cid = build_sample_storage(root)
    base = Path((root / "overlay2" / cid / "lower").read_text().split("/")[0])
    # Large enough that both processes are packing the base layer at the same time.
    (root / "overlay2" / base / "diff" / "big.bin").write_bytes(os.urandom(48 << 20))
    return root, cid


def _start(args: list[str]) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "luigi", "--module", "pipeline", *args, "--local-scheduler"]
    return subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _finish(processes: list[subprocess.Popen[str]]) -> str:
    logs = []
    for process in processes:
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr
        logs.append(stderr)
    return "\n".join(logs)


def _assert_cache_consistent(cache: Path) -> None:
    for blob in (cache / "blobs" / "sha256").iterdir():
        assert not blob.name.startswith("."), f"temporary file left: {blob}"
        with open(blob, "rb") as f:
            assert hashlib.file_digest(f, "sha256").hexdigest() == blob.name


def _add_container(root: Path, cid: str, new_id: str) -> None:
    for part in ("containers", "overlay2"):
        subprocess.run(["cp", "-a", str(root / part / cid), str(root / part / new_id)], check=True)
    (root / "overlay2" / new_id / "diff" / "app" / "data.txt").write_text("the second container's own data\n")


def test_two_commits_of_one_container_at_once_both_succeed_and_pack_each_layer_once(
    storage: tuple[Path, str], tmp_path: Path
) -> None:
    root, cid = storage
    args = commit_args(root, tmp_path, "--id", cid, "--output", str(tmp_path / "img.tar"))
    log = _finish([_start(args), _start(args)])
    assert log.count("INFO pipeline.cache: packed ") == 2, log
    assert "waiting for another process" in log, "the two commits never overlapped"
    _assert_cache_consistent(tmp_path / "cache")
    assert len(read_archive_manifest(tmp_path / "img.tar")["Layers"]) == 2


def test_commits_of_two_containers_sharing_a_base_pack_the_base_once(storage: tuple[Path, str], tmp_path: Path) -> None:
    root, cid = storage
    other = "e" * 64
    _add_container(root, cid, other)
    first = commit_args(root, tmp_path, "--id", cid, "--output", str(tmp_path / "a.tar"))
    second = commit_args(root, tmp_path, "--id", other, "--output", str(tmp_path / "b.tar"))
    log = _finish([_start(first), _start(second)])
    assert log.count("INFO pipeline.cache: packed ") == 3, log
    _assert_cache_consistent(tmp_path / "cache")
    layers_a = read_archive_manifest(tmp_path / "a.tar")["Layers"]
    layers_b = read_archive_manifest(tmp_path / "b.tar")["Layers"]
    assert layers_a[0] == layers_b[0] and layers_a[1] != layers_b[1]

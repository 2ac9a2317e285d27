"""Two commit processes at once, each with its own local scheduler, sharing one cache."""

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

import pytest

from pipeline.demo import build_sample_storage
from tests.support.cachefiles import blob_bytes
from tests.support.cli import REPO, commit_args, resume
from tests.support.imagecheck import read_archive_manifest


@pytest.fixture
def storage(tmp_path: Path) -> tuple[Path, str]:
    root = tmp_path / "storage"
    cid = build_sample_storage(root)
    base = Path((root / "overlay2" / cid / "lower").read_text().split("/")[0])
    # Large enough that both processes are packing the base layer at the same time.
    (root / "overlay2" / base / "diff" / "big.bin").write_bytes(os.urandom(8 << 20))
    return root, cid


def _start(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "luigi", "--module", "pipeline", *args, "--local-scheduler"]
    return subprocess.Popen(
        command, cwd=REPO, env=os.environ | (env or {}), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )


def _wait_until_stopped(pid: int) -> None:
    deadline = time.monotonic() + 60
    while Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "T":
        assert time.monotonic() < deadline, "the first commit never reached its stop point"
        time.sleep(0.01)


def _read_until(stream: IO[str], needle: str) -> list[str]:
    lines = []
    for line in stream:
        lines.append(line)
        if needle in line:
            return lines
    raise AssertionError(f"never saw {needle!r}:\n{''.join(lines)}")


def _finish(processes: list[subprocess.Popen[str]]) -> str:
    logs = []
    for process in processes:
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr
        logs.append(stderr)
    return "\n".join(logs)


def _assert_cache_consistent(cache: Path) -> None:
    blob_dir = cache / "blobs" / "sha256"
    for blob in blob_dir.iterdir() if blob_dir.exists() else []:
        assert not blob.name.startswith("."), f"temporary file left: {blob}"
        with open(blob, "rb") as f:
            assert hashlib.file_digest(f, "sha256").hexdigest() == blob.name
    for record in (cache / "layers").glob("*.json"):  # each layer's blob, a file or in an archive (store.pack)
        diff_id = json.loads(record.read_bytes())["diff_id"]
        assert "sha256:" + hashlib.sha256(blob_bytes(cache, diff_id)).hexdigest() == diff_id


def _add_container(root: Path, cid: str, new_id: str) -> None:
    for part in ("containers", "overlay2"):
        subprocess.run(["cp", "-a", str(root / part / cid), str(root / part / new_id)], check=True)
    (root / "overlay2" / new_id / "diff" / "app" / "data.txt").write_text("the second container's own data\n")


def test_two_commits_of_one_container_at_once_both_succeed_and_pack_each_layer_once(
    storage: tuple[Path, str], tmp_path: Path
) -> None:
    root, cid = storage
    args = commit_args(root, tmp_path, "--id", cid, "--output", str(tmp_path / "img.tar"))
    # The first stops while it holds the base layer's lock; the second must wait for it, not pack alongside it.
    first = _start(args, {"PIPELINE_FAILPOINTS": "pack:started@1:stop"})
    second = None
    try:
        _wait_until_stopped(first.pid)
        second = _start(args)
        assert second.stderr is not None
        seen = _read_until(second.stderr, "waiting for another process")
    finally:
        resume(first.pid)
        if second is None:
            first.kill()
    log = _finish([first, second]) + "".join(seen)
    assert log.count("INFO pipeline.store.cache: packed ") == 2, log
    _assert_cache_consistent(tmp_path / "cache")
    assert len(read_archive_manifest(tmp_path / "img.tar")["Layers"]) == 2


def test_commits_of_two_containers_sharing_a_base_pack_the_base_once(storage: tuple[Path, str], tmp_path: Path) -> None:
    root, cid = storage
    other = "e" * 64
    _add_container(root, cid, other)
    first = commit_args(root, tmp_path, "--id", cid, "--output", str(tmp_path / "a.tar"))
    second = commit_args(root, tmp_path, "--id", other, "--output", str(tmp_path / "b.tar"))
    log = _finish([_start(first), _start(second)])
    assert log.count("INFO pipeline.store.cache: packed ") == 3, log
    _assert_cache_consistent(tmp_path / "cache")
    layers_a = read_archive_manifest(tmp_path / "a.tar")["Layers"]
    layers_b = read_archive_manifest(tmp_path / "b.tar")["Layers"]
    assert layers_a[0] == layers_b[0] and layers_a[1] != layers_b[1]

"""Issue 11, class 3: nothing a run writes may land inside the storage root, which is only ever read.

Each path a run writes (--output, --commit-cache-dir, --commit-output-dir, --iidfile; PushImage's cache;
SnapshotAll's output and cache dirs), pointed inside the storage root, inside the container's own diff/, or there
through a symlink, is refused before anything is packed: a non-zero exit, one ERROR line naming the path and the
storage root, nothing written (run_luigi also checks that the storage is unchanged).
"""

import subprocess
from pathlib import Path

import pytest

from pipeline.demo import build_sample_storage
from tests.support.cli import error_lines, run_luigi

FLAGS = ("--output", "--commit-cache-dir", "--commit-output-dir", "--iidfile")
PLACES = ("storage root", "diff/", "symlink into diff/")


@pytest.fixture(scope="module")
def storage(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    # One for all: every run_luigi checks that the run left it as it was.
    root = tmp_path_factory.mktemp("shared") / "storage"
    return root, build_sample_storage(root)


def _inside(root: Path, cid: str, tmp_path: Path, place: str) -> tuple[Path, Path]:
    """(the directory to write into as given, where it really is) for one of PLACES."""
    diff = root / "overlay2" / cid / "diff"
    if place == "storage root":
        return root, root
    if place == "diff/":
        return diff, diff
    link = tmp_path / "elsewhere"
    link.symlink_to(diff)
    return link, diff


def _assert_refused(result: subprocess.CompletedProcess[str], given: Path, root: Path) -> None:
    assert result.returncode != 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    [line] = error_lines(result)
    assert str(given) in line and f"storage root {root}" in line and "outside the storage root" in line, line


def _written(*dirs: Path) -> list[Path]:
    return [p for d in dirs if d.exists() for p in d.rglob("*")] + [d for d in dirs if d.exists()]


@pytest.mark.parametrize("place", PLACES)
@pytest.mark.parametrize("flag", FLAGS)
def test_commit_writing_into_the_storage_is_refused(
    storage: tuple[Path, str], tmp_path: Path, flag: str, place: str
) -> None:
    root, cid = storage
    into, real = _inside(root, cid, tmp_path, place)
    out, cache, iid = tmp_path / "out" / "image.tar", tmp_path / "cache", tmp_path / "iid"
    given = into / {"--output": "image.tar", "--iidfile": "iid"}.get(flag, "dir")
    paths: dict[str, Path] = {"--commit-cache-dir": cache, "--iidfile": iid, "--output": out}
    if flag == "--commit-output-dir":
        del paths["--output"]  # the archive then goes to its default place under output_dir
    paths[flag] = given
    args = [a for f, p in paths.items() for a in (f, str(p))]
    result = run_luigi("CommitImage", "--storage-root", str(root), "--id", cid, *args)
    _assert_refused(result, given, root)
    assert _written(tmp_path / "out", tmp_path / "cache", tmp_path / "iid", real / given.name) == []


# PushImage and SnapshotAll share CommitImage's check; through a symlink into diff/ is the case to miss.
def test_push_with_its_cache_in_the_storage_is_refused(storage: tuple[Path, str], tmp_path: Path) -> None:
    root, cid = storage
    into, real = _inside(root, cid, tmp_path, "symlink into diff/")
    cache = into / "cache"
    # Port 9 (discard) on loopback: were the cache accepted, the push would fail later, not with this line.
    image = "127.0.0.1:9/demo/web:1"
    result = run_luigi(
        "PushImage", "--storage-root", str(root), "--commit-cache-dir", str(cache), "--id", cid, "--image", image
    )
    _assert_refused(result, cache, root)
    assert _written(real / "cache") == []


@pytest.mark.parametrize("flag", ["--commit-output-dir", "--commit-cache-dir"])
def test_snapshot_writing_into_the_storage_is_refused(storage: tuple[Path, str], tmp_path: Path, flag: str) -> None:
    root, cid = storage
    into, real = _inside(root, cid, tmp_path, "symlink into diff/")
    dirs = {"--commit-output-dir": tmp_path / "out", "--commit-cache-dir": tmp_path / "cache"}
    dirs[flag] = given = into / "dir"
    args = [a for f, p in dirs.items() for a in (f, str(p))]
    result = run_luigi("SnapshotAll", "--storage-root", str(root), *args)
    _assert_refused(result, given, root)
    assert _written(tmp_path / "out", tmp_path / "cache", real / "dir") == []


def test_output_beside_the_storage_is_still_written(storage: tuple[Path, str], tmp_path: Path) -> None:
    # A sibling whose name merely starts like the root's is outside it.
    root, cid = storage
    beside = Path(f"{root}-images") / "image.tar"
    result = run_luigi(
        "CommitImage", "--storage-root", str(root), "--id", cid, "--output", str(beside),
        "--commit-cache-dir", str(tmp_path / "cache"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert beside.is_file()

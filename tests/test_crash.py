"""SIGKILL at many moments of a commit: only complete targets ever exist, and a re-run finishes byte-identically."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.demo import build_sample_storage
from pipeline.host import process
from pipeline.host.atomic import is_partial, remove_abandoned_partials
from pipeline.store.cache import LayerCache
from tests.support.cli import REPO, commit_args, run_luigi, tree_fingerprint

EPOCH = {"SOURCE_DATE_EPOCH": "1700000000"}

# Each kill happens on the state the previous one left, so together they walk through a whole commit.
KILL_POINTS = [
    "pack:started@1",  # during the first layer
    "pack:before-rename@1",  # first layer written and fsync'd, not yet renamed
    "pack:after-rename@1",  # blob in place, its record not yet written
    "atomic:before-rename@1",  # the record written, not yet renamed
    "task:layer-done@1",  # between layers
    "pack:started@1",  # during the container's layer
    "atomic:after-rename@1",  # the container layer's record renamed, its directory not yet fsync'd
    "atomic:before-rename@1",  # the image config written, not yet renamed
    "archive:collapsed@1",  # the archive assembled in place: its gaps collapsed, headers not yet written
    "atomic:before-rename@1",  # the archive complete, not yet renamed
]


def _sha256(path: Path, offset: int = 0, size: int = -1) -> str:
    with open(path, "rb") as f:
        f.seek(offset)
        return hashlib.sha256(f.read(size)).hexdigest()


def _assert_only_complete_targets(work: Path, reference: bytes) -> None:
    """Every target that exists is whole: blobs match their names, records their blobs, JSON parses."""
    blobs = work / "cache" / "blobs" / "sha256"
    for blob in blobs.iterdir() if blobs.exists() else []:
        if not blob.name.startswith("."):
            assert _sha256(blob) == blob.name, blob
    for record in (work / "cache").rglob("*.json"):
        if record.name.startswith("."):
            continue
        doc = json.loads(record.read_bytes())
        if "diff_id" in doc:
            # A blob file, or a region of an archive assembled in place (a pack) that its pointer names.
            source = LayerCache(work / "cache").locate(doc["diff_id"], doc["size"])
            assert source is not None, record
            if source.assembling:  # in the archive whose assembly this kill interrupted: the re-run finishes it
                continue
            assert _sha256(source.path, source.offset, source.size) == doc["diff_id"].removeprefix("sha256:")
    for name in ("manifest.json", "repositories"):
        for path in (work / "cache").rglob(name):
            json.loads(path.read_bytes())
    archive = work / "out" / "img.tar"
    if archive.exists():
        assert archive.read_bytes() == reference


def test_commit_killed_anywhere_resumes_to_the_same_bytes(tmp_path: Path) -> None:
    root = tmp_path / "storage"
    cid = build_sample_storage(root)
    before = tree_fingerprint(root)
    reference_work = tmp_path / "reference"
    args = commit_args(root, reference_work, "--id", cid, "--output", str(reference_work / "out" / "img.tar"))
    assert run_luigi(*args, env=EPOCH).returncode == 0
    reference = (reference_work / "out" / "img.tar").read_bytes()

    work = tmp_path / "work"
    args = commit_args(root, work, "--id", cid, "--output", str(work / "out" / "img.tar"))
    for point in KILL_POINTS:
        result = run_luigi(*args, env=EPOCH | {"PIPELINE_FAILPOINTS": point})
        assert result.returncode == -9, f"{point} was never reached:\n{result.stderr}"
        _assert_only_complete_targets(work, reference)

    final = run_luigi(*args, env=EPOCH)
    assert final.returncode == 0, final.stderr
    assert (work / "out" / "img.tar").read_bytes() == reference
    leftovers = [p for p in work.rglob("*") if ".partial-" in p.name]
    assert leftovers == [], "temporary files of killed runs were not cleaned up"
    assert tree_fingerprint(root) == before


@pytest.mark.parametrize("fraction", [0.2, 0.5, 0.8])
def test_kill_at_a_random_moment_never_leaves_a_partial_archive(tmp_path: Path, fraction: float) -> None:
    # A second, failpoint-free angle: SIGKILL the whole process group after a share of a normal run's time.
    root = tmp_path / "storage"
    cid = build_sample_storage(root)
    work = tmp_path / "work"
    args = commit_args(root, work, "--id", cid, "--output", str(work / "out" / "img.tar"))
    reference_work = tmp_path / "reference"
    ref_args = commit_args(root, reference_work, "--id", cid, "--output", str(reference_work / "out" / "img.tar"))
    start = time.monotonic()
    assert run_luigi(*ref_args, env=EPOCH).returncode == 0
    duration = time.monotonic() - start
    reference = (reference_work / "out" / "img.tar").read_bytes()
    env = {k: v for k, v in os.environ.items() if k != "SOURCE_DATE_EPOCH"} | EPOCH
    command = [sys.executable, "-m", "luigi", "--module", "pipeline", *args, "--local-scheduler"]
    process = subprocess.Popen(
        command, cwd=REPO, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    time.sleep(duration * fraction)
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()
    _assert_only_complete_targets(work, reference)
    assert run_luigi(*args, env=EPOCH).returncode == 0
    assert (work / "out" / "img.tar").read_bytes() == reference


def test_the_temporary_file_of_a_killed_writer_not_yet_reaped_is_removed(tmp_path: Path) -> None:
    """luigi's workers are forked: killed with their run, they stay zombies until init reaps them, and the next run
    must still take their temporary files for abandoned (a zombie's pid answers kill(pid, 0))."""
    script = (
        "import os, signal, sys; from pathlib import Path; from pipeline.host.atomic import partial_path\n"
        "partial_path(Path(sys.argv[1])).write_bytes(b'half'); os.kill(os.getpid(), signal.SIGKILL)"
    )
    writer = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "target")], cwd=REPO)
    try:
        deadline = time.monotonic() + 60
        while process.state(writer.pid) != b"Z":
            assert time.monotonic() < deadline, "the writer never died"
            time.sleep(0.01)
        [partial] = [p for p in tmp_path.iterdir() if is_partial(p)]
        assert remove_abandoned_partials(tmp_path) == [partial]
        assert not partial.exists()
    finally:
        assert writer.wait(timeout=60) == -signal.SIGKILL

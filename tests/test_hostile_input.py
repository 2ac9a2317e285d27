"""Hostile and broken input: each refused with one line naming the thing, a non-zero exit, nothing written."""

import hashlib
import json
import logging
import os
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest

from pipeline.demo import build_sample_storage
from pipeline.engines.container import check_id_text
from pipeline.errors import ContainerNotFound, SourceChanged
from pipeline.store.cache import LayerCache
from tests.support.cachefiles import blob_bytes, damage_blob
from tests.support.cli import REPO, commit_args, error_lines, run_luigi, tree_fingerprint


@pytest.fixture
def storage(tmp_path: Path) -> tuple[Path, str]:
    root = tmp_path / "storage"
    return root, build_sample_storage(root)


def _refused(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert result.returncode != 0, result.stderr
    [line] = error_lines(result)
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in line, line
    return line


@pytest.mark.parametrize("text", ["a\x00b", "a/b", "../x", "/abs", ".", "..", "", "x" * 300])
def test_ids_that_could_address_files_are_refused(text: str) -> None:
    with pytest.raises(ContainerNotFound, match="invalid container id"):
        check_id_text(text)


def test_diff_that_is_a_symlink_loop_is_refused(storage: tuple[Path, str], tmp_path: Path) -> None:
    root, cid = storage
    diff = root / "overlay2" / cid / "diff"
    subprocess.run(["rm", "-rf", str(diff)], check=True)
    os.symlink("diff", diff)
    _refused(run_luigi(*commit_args(root, tmp_path, "--id", cid)), f"{cid}/diff")
    assert not (tmp_path / "out").exists()


def test_symlink_loop_inside_a_layer_is_packed_as_a_symlink(storage: tuple[Path, str], tmp_path: Path) -> None:
    root, cid = storage
    os.symlink("loop", root / "overlay2" / cid / "diff" / "loop")
    assert run_luigi(*commit_args(root, tmp_path, "--id", cid)).returncode == 0


def test_malformed_image_config_is_refused_naming_the_file(storage: tuple[Path, str], tmp_path: Path) -> None:
    root, cid = storage
    [config] = (root / "image/overlay2/imagedb/content/sha256").iterdir()
    config.write_text("[1, 2")
    _refused(run_luigi(*commit_args(root, tmp_path, "--id", cid)), str(config), "malformed JSON")
    assert not (tmp_path / "out").exists()


def test_image_config_that_is_not_an_object_is_refused(storage: tuple[Path, str], tmp_path: Path) -> None:
    root, cid = storage
    [config] = (root / "image/overlay2/imagedb/content/sha256").iterdir()
    config.write_text('"just a string"')
    _refused(run_luigi(*commit_args(root, tmp_path, "--id", cid)), str(config), "JSON object")


@pytest.mark.root
def test_unreadable_file_is_refused_naming_it(storage: tuple[Path, str], tmp_path: Path) -> None:
    root, cid = storage
    secret = root / "overlay2" / cid / "diff" / "app" / "secret"
    secret.write_text("no one may read this")
    secret.chmod(0)
    before = tree_fingerprint(root)
    # Root reads anything; without CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH it meets EACCES like any user.
    command = [
        "setpriv", "--bounding-set", "-dac_override,-dac_read_search",
        sys.executable, "-m", "luigi", "--module", "pipeline",
        *commit_args(root, tmp_path, "--id", cid), "--local-scheduler",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    _refused(result, str(secret), "Permission denied")
    assert not (tmp_path / "out").exists()
    assert tree_fingerprint(root) == before


@pytest.mark.root
def test_commit_without_cap_sys_admin_is_refused_rather_than_losing_opaque_dirs(
    storage: tuple[Path, str], tmp_path: Path
) -> None:
    root, cid = storage
    # Without CAP_SYS_ADMIN the kernel silently hides trusted.overlay.opaque from listxattr.
    command = [
        "setpriv", "--bounding-set", "-sys_admin",
        sys.executable, "-m", "luigi", "--module", "pipeline",
        *commit_args(root, tmp_path, "--id", cid), "--local-scheduler",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    lines = error_lines(result)
    assert lines and all("lacks CAP_SYS_ADMIN" in line and "/overlay2/" in line for line in lines), lines
    assert not (tmp_path / "out").exists()


def test_file_growing_throughout_packing_fails_after_one_retry(tmp_path: Path) -> None:
    layer = tmp_path / "layer"
    layer.mkdir()
    log_file = layer / "app.log"
    log_file.write_bytes(os.urandom(8 << 20))
    stop = threading.Event()

    def keep_appending() -> None:
        with open(log_file, "ab") as f:
            while not stop.is_set():
                f.write(b"another line\n")
                f.flush()

    writer = threading.Thread(target=keep_appending)
    writer.start()
    try:
        with pytest.raises(SourceChanged, match=r"app\.log: .* \(twice\); pause the container"):
            LayerCache(tmp_path / "cache").pack_layer(layer)
    finally:
        stop.set()
        writer.join()
    assert [p for p in (tmp_path / "cache").rglob("*") if p.is_file()] == []


def test_file_changed_once_during_packing_is_packed_again(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    layer = tmp_path / "layer"
    layer.mkdir()
    big = layer / "big.bin"
    # Mostly hole: packing it takes about a second (hashing the zeros), on disk it is tiny, so the change
    # below lands mid-file however loaded the machine is.
    with open(big, "wb") as f:
        f.truncate(2 << 30)
        f.seek((2 << 30) - 4096)
        f.write(os.urandom(4096))
    blob_dir = tmp_path / "cache" / "blobs" / "sha256"

    def truncate_once_packing_started() -> None:
        # Only once the blob being written holds 16 MiB is big.bin surely being read (it was listed, and its
        # header written): truncating earlier would merely be a smaller file, consistently packed.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            partial = [p for p in blob_dir.iterdir() if ".partial-" in p.name] if blob_dir.exists() else []
            if any(_size(p) > 16 << 20 for p in partial):
                os.truncate(big, 1 << 20)
                return
            time.sleep(0.0005)

    changer = threading.Thread(target=truncate_once_packing_started)
    changer.start()
    with caplog.at_level(logging.WARNING, logger="pipeline.store.cache"):
        record = LayerCache(tmp_path / "cache").pack_layer(layer)
    changer.join()
    assert "packing the layer again" in caplog.text
    assert record.size < 2 << 20
    with open(blob_dir / record.hex, "rb") as f:
        assert "sha256:" + hashlib.file_digest(f, "sha256").hexdigest() == record.diff_id


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


@pytest.mark.parametrize("damage", ["truncate", "alter"])
def test_damaged_cache_blob_is_detected_and_rebuilt(storage: tuple[Path, str], tmp_path: Path, damage: str) -> None:
    root, cid = storage
    first = commit_args(root, tmp_path, "--id", cid, "--output", str(tmp_path / "a.tar"))
    assert run_luigi(*first).returncode == 0
    base_record = next((tmp_path / "cache" / "layers").glob("*.json"))
    diff_id = json.loads(base_record.read_text())["diff_id"]
    # Wherever the cache holds it: a file, or a region of the first archive, assembled in place (store.pack).
    damage_blob(tmp_path / "cache", diff_id, damage)
    second = run_luigi(*commit_args(root, tmp_path, "--id", cid, "--output", str(tmp_path / "b.tar")))
    assert second.returncode == 0, second.stderr
    assert "packing it again" in second.stderr
    assert "sha256:" + hashlib.sha256(blob_bytes(tmp_path / "cache", diff_id)).hexdigest() == diff_id
    with tarfile.open(tmp_path / "b.tar") as tar:
        member = tar.extractfile(f"blobs/sha256/{diff_id.removeprefix('sha256:')}")
        assert member is not None and "sha256:" + hashlib.sha256(member.read()).hexdigest() == diff_id

"""The layer cache: reassembly from tar-split with its fallback, and integrity checks of cached blobs."""

import hashlib
import logging
import os
import tarfile
from pathlib import Path

import pytest

from pipeline.engines.container import Layer
from pipeline.packing import pack_image_layer
from pipeline.store.cache import LayerCache
from tests.support.tarsplit_records import disassemble, write_tar_split


def _original(layer_dir: Path, tmp_path: Path) -> tuple[Path, str]:
    """A tar of layer_dir as an engine would have stored it, its tar-split records, and its diff_id."""
    tar_path = tmp_path / "original.tar"
    with tarfile.open(tar_path, "w", format=tarfile.GNU_FORMAT) as tar:  # not our PAX: a diff_id only it has
        tar.add(layer_dir, arcname=".")
    data = tar_path.read_bytes()
    return write_tar_split(tmp_path / "layer.tar-split.gz", disassemble(data)), "sha256:" + hashlib.sha256(
        data
    ).hexdigest()


@pytest.fixture
def layer_dir(tmp_path: Path) -> Path:
    layer_dir = tmp_path / "diff"
    (layer_dir / "etc").mkdir(parents=True)
    (layer_dir / "etc" / "os-release").write_text("NAME=base\n")
    (layer_dir / "data.bin").write_bytes(os.urandom(3 << 20))
    return layer_dir


def _report(done: int, total: int) -> None:
    pass


def test_image_layer_with_tar_split_keeps_its_original_diff_id(layer_dir: Path, tmp_path: Path) -> None:
    tar_split, diff_id = _original(layer_dir, tmp_path)
    cache = LayerCache(tmp_path / "cache")
    record = pack_image_layer(cache, Layer("base", layer_dir, tar_split, diff_id), clamp_mtime=None, report=_report)
    assert record.diff_id == diff_id
    assert cache.blob_path(diff_id).read_bytes() == (tmp_path / "original.tar").read_bytes()


def test_changed_files_fall_back_to_packing_with_a_warning(
    layer_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tar_split, diff_id = _original(layer_dir, tmp_path)
    (layer_dir / "etc" / "os-release").write_text("NAME=edit\n")  # same size, other bytes
    cache = LayerCache(tmp_path / "cache")
    with caplog.at_level(logging.WARNING, logger="pipeline.store.cache"):
        record = pack_image_layer(cache, Layer("base", layer_dir, tar_split, diff_id), clamp_mtime=None, report=_report)
    assert record.diff_id != diff_id and cache.has_blob(record)
    assert "packing the directory instead" in caplog.text and "os-release" in caplog.text
    assert sorted(p.name for p in cache.blob_path(record.diff_id).parent.iterdir()) == [record.hex]


def test_touched_blob_is_rehashed_and_an_altered_one_rejected(layer_dir: Path, tmp_path: Path) -> None:
    cache = LayerCache(tmp_path / "cache")
    record = cache.pack_layer(layer_dir)
    blob = cache.blob_path(record.diff_id)
    recorded_ns = blob.stat().st_ctime_ns
    assert cache.has_blob(record, recorded_ns=recorded_ns)
    os.utime(blob)  # moves ctime, content unchanged: verified by hashing, still good
    assert cache.has_blob(record, recorded_ns=recorded_ns)
    data = bytearray(blob.read_bytes())
    data[-2000] ^= 1
    blob.write_bytes(bytes(data))
    assert not cache.has_blob(record, recorded_ns=recorded_ns)

"""Zero-copy commits on filesystems that share extents (issue 14): on a loop-mounted XFS (reflink=1) and btrfs, a
container's large file is cloned into the cache's layer blob and the blob into the image archive, so the commit
writes almost nothing; the tars are byte-identical to the copying path's (the cache on another filesystem), and the
consumers load the archive as the container's merged view."""

from __future__ import annotations

import hashlib
import io
import os
import random
import resource
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.layer.tarheader import ALIGN_DATA_FROM, ALIGNMENT
from pipeline.layer.writer import HashingSink
from pipeline.store.cache import BlobSource
from tests.support.cachefiles import blob_source
from tests.support.cli import commit_args, run_luigi
from tests.support.fleet import add_container
from tests.support.imagecheck import check_image_archive, read_archive_manifest
from tests.support.loopfs import loop_filesystem, missing_tools, physical_blocks, shared
from tests.support.overlay_storage import build_rocker_storage, container_id_for

pytestmark = [pytest.mark.overlay, pytest.mark.tools("skopeo", "umoci", "podman")]

NAME = "model-1"
BIG = 24 * (1 << 20) + 1234  # not a whole number of blocks: the clone ends at the source's end of file
MODEL = "srv/model.bin"


def _written_by_children() -> int:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_oublock * 512


def _member_offsets(tar_path: Path) -> dict[str, tuple[int, int]]:
    """name -> (offset of its data in the tar, size) of every regular member."""
    with tarfile.open(tar_path) as tar:
        return {m.name: (m.offset_data, m.size) for m in tar if m.isreg()}


def _cached_blob(cache: Path, member: str, size: int) -> BlobSource:
    return blob_source(cache, "sha256:" + member.rsplit("/", 1)[1], size)


def _read(source: BlobSource) -> bytes:
    with open(source.path, "rb") as f:
        f.seek(source.offset)
        return f.read(source.size)


def _commit(root: Path, work: Path, archive: Path) -> tuple[int, str]:
    before = _written_by_children()
    done = run_luigi(
        *commit_args(root, work, "--id", container_id_for(NAME), "--image", "model:1", "--output", str(archive))
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return _written_by_children() - before, done.stderr


@pytest.fixture(params=["xfs", "btrfs"])
def fs(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    """A fresh filesystem that shares extents, loop-mounted for the test."""
    kind = request.param
    reason = missing_tools(kind)
    if reason:
        pytest.skip(reason)
    with loop_filesystem(kind, tmp_path / f"{kind}.img", tmp_path / "fs") as mounted:
        yield mounted


def test_a_large_file_is_shared_not_copied_into_the_blob_and_the_archive(fs: Path, tmp_path: Path) -> None:
    data = random.Random(7).randbytes(BIG)
    root = fs / "rocker"
    build_rocker_storage(root)
    view = add_container(root, NAME, {MODEL: data, "srv/small.txt": b"small\n"})
    upper_file = root / "overlay2" / container_id_for(NAME) / "diff" / MODEL

    # Cache and archive on the same filesystem: shared.
    cloned_written, _ = _commit(root, fs / "work", fs / "model.tar")
    # The same storage, cache and archive on the test's own filesystem: copied (the kernel refuses EXDEV).
    copied_written, _ = _commit(root, tmp_path / "copy", tmp_path / "copy.tar")

    manifest = read_archive_manifest(fs / "model.tar")
    assert manifest["Layers"] == read_archive_manifest(tmp_path / "copy.tar")["Layers"]
    upper_blob = manifest["Layers"][-1]  # blobs/sha256/<hex>: the container's own layer
    outer, outer_size = _member_offsets(fs / "model.tar")[upper_blob]
    # The blob as the cache holds it: a file of its own (btrfs), or its member of the archive, which was
    # assembled in place (XFS collapses ranges: store.pack) and is the same file as the cache's pack.
    blob = _cached_blob(fs / "work" / "cache", upper_blob, outer_size)
    copy_blob = _cached_blob(tmp_path / "copy" / "cache", upper_blob, outer_size)
    digest = upper_blob.rsplit("/", 1)[1]
    assert hashlib.sha256(_read(blob)).hexdigest() == digest  # the digest is of what the blob holds
    assert _read(blob) == _read(copy_blob)  # byte-identical on both paths

    # The model's data starts on a block boundary of the layer tar, and shares the container file's blocks.
    with tarfile.open(fileobj=io.BytesIO(_read(blob))) as inner:
        model = inner.getmember(MODEL)
    offset, size = model.offset_data, model.size
    assert size == BIG and offset % ALIGNMENT == 0
    source = physical_blocks(upper_file, 0, BIG)
    assert -1 not in source and physical_blocks(blob.path, blob.offset + offset, BIG) == source
    assert shared(upper_file) and shared(blob.path)
    # The blob's data shares the archive's (all but its last, partial block, which the archive's next member
    # was written into: that block was copied on write); in place, it is the archive's own.
    assert outer % ALIGNMENT == 0 and outer_size == blob.size
    assert physical_blocks(fs / "model.tar", outer, outer_size) == physical_blocks(blob.path, blob.offset, outer_size)

    # The model was written once on the test's own filesystem (ext4: into the archive, assembled in place), and
    # almost not at all where it was shared.
    assert BIG < copied_written < 1.5 * BIG, copied_written
    assert cloned_written < BIG // 10, cloned_written

    check_image_archive(fs / "model.tar", view, tmp_path / "check", ref="model:1")


def test_only_files_of_the_threshold_are_aligned_on_any_filesystem(tmp_path: Path) -> None:
    """The padding rule, on this test's own filesystem (no clones): every regular member of ALIGN_DATA_FROM bytes
    or more (the sample's sparse file) has its data on an ALIGNMENT boundary of its layer tar; no smaller one
    carries padding."""
    storage = build_rocker_storage(tmp_path / "rocker")
    archive = tmp_path / "a.tar"
    done = run_luigi(*commit_args(storage.root, tmp_path, "--id", storage.container_id, "--output", str(archive)))
    assert done.returncode == 0, done.stderr[-2000:]
    large = 0
    sizes = {name: size for name, (_, size) in _member_offsets(archive).items()}
    for layer in read_archive_manifest(archive)["Layers"]:
        blob = _cached_blob(tmp_path / "cache", layer, sizes[layer])
        with tarfile.open(fileobj=io.BytesIO(_read(blob))) as inner:
            for m in inner:
                if m.isreg() and m.size >= ALIGN_DATA_FROM:
                    large += 1
                    assert m.offset_data % ALIGNMENT == 0, (layer, m.name, m.offset_data)
                else:
                    assert "comment" not in m.pax_headers, (layer, m.name)
    assert large >= 1  # the sample holds one, so the rule was exercised


def test_a_file_is_shared_into_a_pack_that_already_holds_a_later_layer(fs: Path) -> None:
    """With two workers, a later slot of the commit's pack (store.pack) may be written before an earlier one: the
    kernel refuses to clone a range ending mid-block short of the file's end, so the whole blocks are shared and
    only the last partial one copied; the digest is still of the bytes the pack holds."""
    data = random.Random(11).randbytes(BIG)
    source = fs / "model.bin"
    source.write_bytes(data)
    with open(fs / "pack.tar", "w+b") as pack:
        os.pwrite(pack.fileno(), b"a later layer", 1 << 30)  # its slot, beyond this one: the pack's end
        pack.write(b"h" * ALIGNMENT)  # this layer's first header
        sink = HashingSink(pack)
        sink.write(b"h" * ALIGNMENT)
        with open(source, "rb") as src:
            assert sink.clone_from(src.fileno(), BIG, str(source))
        record = sink.record()
    assert record.size == ALIGNMENT + BIG
    assert record.diff_id == "sha256:" + hashlib.sha256(b"h" * ALIGNMENT + data).hexdigest()
    with open(fs / "pack.tar", "rb") as f:
        f.seek(2 * ALIGNMENT)
        assert f.read(BIG) == data
    whole = BIG - BIG % ALIGNMENT
    assert -1 not in physical_blocks(source, 0, whole)
    assert physical_blocks(fs / "pack.tar", 2 * ALIGNMENT, whole) == physical_blocks(source, 0, whole)

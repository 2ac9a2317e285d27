"""Compressed layer blobs: round trips, deterministic bytes, one compression per (diff_id, algorithm, level)."""

import errno
import gzip
import hashlib
import io
import json
import os
import random
import subprocess
import tarfile
from pathlib import Path
from typing import Any, BinaryIO

import pytest
import zstandard

from pipeline.errors import LayerError, OutputError, PipelineError
from pipeline.layer.writer import LayerRecord
from pipeline.store import compression
from pipeline.store.compression import StoredBlob, compress_blob, default_level, mapping_path, write_compressed

# gzip 0 is zlib's stored mode, 1-3 ISA-L's levels, 4-9 zlib's; each backend writes its own header.
SETTINGS = [("gzip", 0), ("gzip", 1), ("gzip", 3), ("gzip", 6), ("zstd", 1), ("zstd", 3)]


def build_tar(seed: int = 1, text_lines: int = 60_000, random_bytes: int = 1 << 20) -> bytes:
    """A layer tar with a compressible text file and an incompressible one, the same for the same seed."""
    rng = random.Random(seed)
    words = [rng.randbytes(rng.randint(2, 9)).hex() for _ in range(400)]
    text = "\n".join(" ".join(rng.choices(words, k=8)) for _ in range(text_lines)).encode()
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in (("etc/words.txt", text), ("opt/random.bin", rng.randbytes(random_bytes))):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 1_700_000_000, 0o644
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def cache_with_tar(cache: Path, data: bytes) -> LayerRecord:
    """A cache holding data as a packed layer blob, the way LayerCache.pack_layer leaves it."""
    record = LayerRecord(diff_id="sha256:" + hashlib.sha256(data).hexdigest(), size=len(data))
    blob_dir = cache / "blobs" / "sha256"
    blob_dir.mkdir(parents=True, exist_ok=True)
    (blob_dir / record.hex).write_bytes(data)
    return record


def blob_path(cache: Path, blob: StoredBlob) -> Path:
    return cache / "blobs" / "sha256" / blob.hex


def decompress(algorithm: str, data: bytes) -> bytes:
    if algorithm == "gzip":
        return gzip.decompress(data)
    return zstandard.ZstdDecompressor().decompressobj().decompress(data)


@pytest.fixture(scope="module")
def layer_tar() -> bytes:
    return build_tar()


@pytest.mark.parametrize(("algorithm", "level"), SETTINGS)
def test_compressed_blob_decompresses_to_the_cached_tar(tmp_path: Path, layer_tar: bytes, algorithm: str, level: int):
    record = cache_with_tar(tmp_path, layer_tar)
    blob = compress_blob(tmp_path, record, algorithm, level)
    stored = blob_path(tmp_path, blob).read_bytes()
    assert decompress(algorithm, stored) == layer_tar
    assert blob.digest == "sha256:" + hashlib.sha256(stored).hexdigest()
    assert (blob.size, blob.diff_id, blob.algorithm, blob.level) == (len(stored), record.diff_id, algorithm, level)
    if level > 0:
        assert blob.size < record.size * 0.8  # the text file compresses


@pytest.mark.parametrize(("algorithm", "level"), SETTINGS)
def test_same_tar_compresses_to_the_same_digest_in_another_cache(
    tmp_path: Path, layer_tar: bytes, algorithm: str, level: int
):
    first = compress_blob(tmp_path / "a", cache_with_tar(tmp_path / "a", layer_tar), algorithm, level)
    second = compress_blob(tmp_path / "b", cache_with_tar(tmp_path / "b", layer_tar), algorithm, level)
    assert first == second


@pytest.mark.parametrize("level", [1, 3])
def test_zstd_bytes_do_not_depend_on_the_thread_count(level: int):
    # Large enough for several multi-threaded jobs (2 MiB each at level 1).
    data = build_tar(seed=2, text_lines=150_000, random_bytes=2 << 20)
    record = LayerRecord("sha256:" + hashlib.sha256(data).hexdigest(), len(data))
    outputs = set()
    for threads in (1, 2, 4):
        out = io.BytesIO()
        write_compressed(io.BytesIO(data), out, record, "zstd", level, threads=threads)
        outputs.add(out.getvalue())
    assert len(outputs) == 1


def test_zstd_frame_records_content_size_and_checksum(tmp_path: Path, layer_tar: bytes):
    record = cache_with_tar(tmp_path, layer_tar)
    blob = compress_blob(tmp_path, record, "zstd", 3)
    params = zstandard.get_frame_parameters(blob_path(tmp_path, blob).read_bytes())
    assert (params.content_size, params.has_checksum, params.dict_id) == (record.size, True, 0)


@pytest.mark.parametrize("level", [0, 1, 2, 3, 6, 9])
def test_gzip_header_has_mtime_zero_and_no_file_name(tmp_path: Path, layer_tar: bytes, level: int):
    blob = compress_blob(tmp_path, cache_with_tar(tmp_path, layer_tar), "gzip", level)
    header = blob_path(tmp_path, blob).read_bytes()[:10]
    assert header[:3] == b"\x1f\x8b\x08"
    assert header[3] == 0  # FLG: no FTEXT, FHCRC, FEXTRA, FNAME or FCOMMENT (RFC 1952, 2.3.1)
    assert header[4:8] == b"\0\0\0\0"  # MTIME 0: no modification time


def test_second_call_returns_the_cached_blob_without_compressing(
    tmp_path: Path, layer_tar: bytes, monkeypatch: pytest.MonkeyPatch
):
    record = cache_with_tar(tmp_path, layer_tar)
    first = compress_blob(tmp_path, record, "zstd", 3)
    mapping = mapping_path(tmp_path, record.diff_id, "zstd", 3)
    before = [(p.stat().st_ino, p.stat().st_mtime_ns) for p in (blob_path(tmp_path, first), mapping)]

    def fail(*args: object, **kwargs: object) -> StoredBlob:
        raise AssertionError("compressed again")

    monkeypatch.setattr(compression, "write_compressed", fail)
    assert compress_blob(tmp_path, record, "zstd", 3) == first
    assert [(p.stat().st_ino, p.stat().st_mtime_ns) for p in (blob_path(tmp_path, first), mapping)] == before


def test_mapping_records_the_blob_and_its_library(tmp_path: Path, layer_tar: bytes):
    record = cache_with_tar(tmp_path, layer_tar)
    blob = compress_blob(tmp_path, record, "gzip", 1)
    doc = json.loads((tmp_path / "compressed" / f"{record.hex}-gzip-1.json").read_bytes())
    assert doc == {
        "digest": blob.digest,
        "size": blob.size,
        "diff_id": record.diff_id,
        "algorithm": "gzip",
        "level": 1,
        "media_type": "application/vnd.oci.image.layer.v1.tar+gzip",
        "library": doc["library"],
    }
    assert doc["library"].startswith("isal ")


def test_other_levels_are_separate_cache_entries(tmp_path: Path, layer_tar: bytes):
    record = cache_with_tar(tmp_path, layer_tar)
    fast, best = compress_blob(tmp_path, record, "zstd", 1), compress_blob(tmp_path, record, "zstd", 9)
    assert fast.digest != best.digest
    assert best.size < fast.size
    assert sorted(p.name for p in (tmp_path / "compressed").iterdir()) == [
        f"{record.hex}-zstd-1.json",
        f"{record.hex}-zstd-9.json",
    ]


def test_truncated_compressed_blob_is_compressed_again(tmp_path: Path, layer_tar: bytes):
    record = cache_with_tar(tmp_path, layer_tar)
    first = compress_blob(tmp_path, record, "gzip", 1)
    path = blob_path(tmp_path, first)
    os.truncate(path, first.size // 2)
    assert compress_blob(tmp_path, record, "gzip", 1) == first
    assert gzip.decompress(path.read_bytes()) == layer_tar


def test_missing_compressed_blob_is_compressed_again(tmp_path: Path, layer_tar: bytes):
    record = cache_with_tar(tmp_path, layer_tar)
    first = compress_blob(tmp_path, record, "zstd", 3)
    blob_path(tmp_path, first).unlink()
    assert compress_blob(tmp_path, record, "zstd", 3) == first
    assert blob_path(tmp_path, first).stat().st_size == first.size


def test_altered_compressed_blob_of_the_same_size_is_compressed_again(tmp_path: Path, layer_tar: bytes):
    record = cache_with_tar(tmp_path, layer_tar)
    first = compress_blob(tmp_path, record, "zstd", 3)
    path = blob_path(tmp_path, first)
    with open(path, "r+b") as f:
        f.seek(first.size // 2)
        byte = f.read(1)
        f.seek(first.size // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    # The mapping was written a while before the damage (within one clock tick the two times could be equal).
    mapping = mapping_path(tmp_path, record.diff_id, "zstd", 3)
    old = mapping.stat().st_mtime_ns - 10**9
    os.utime(mapping, ns=(old, old))
    assert compress_blob(tmp_path, record, "zstd", 3) == first
    assert hashlib.sha256(path.read_bytes()).hexdigest() == first.hex


@pytest.mark.parametrize("damage", [b"{not json", b'{"digest": "sha256:00"}', b"[]"])
def test_damaged_mapping_is_compressed_again(tmp_path: Path, layer_tar: bytes, damage: bytes):
    record = cache_with_tar(tmp_path, layer_tar)
    first = compress_blob(tmp_path, record, "gzip", 1)
    mapping = mapping_path(tmp_path, record.diff_id, "gzip", 1)
    mapping.write_bytes(damage)
    assert compress_blob(tmp_path, record, "gzip", 1) == first
    assert json.loads(mapping.read_bytes())["digest"] == first.digest


def test_media_types_name_the_compression(tmp_path: Path, layer_tar: bytes):
    record = cache_with_tar(tmp_path, layer_tar)
    types = {a: compress_blob(tmp_path, record, a, default_level(a)).media_type for a in compression.ALGORITHMS}
    assert types == {
        "none": "application/vnd.oci.image.layer.v1.tar",
        "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
        "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
    }


def test_none_is_the_cached_tar_itself(tmp_path: Path, layer_tar: bytes):
    record = cache_with_tar(tmp_path, layer_tar)
    blob = compress_blob(tmp_path, record, "none", 0)
    assert (blob.digest, blob.size, blob.diff_id) == (record.diff_id, record.size, record.diff_id)
    assert not (tmp_path / "compressed").exists()


def test_default_levels():
    assert [default_level(a) for a in compression.ALGORITHMS] == [0, 1, 3]


@pytest.mark.parametrize(
    ("algorithm", "level", "message"),
    [
        ("bzip2", 1, "unknown compression 'bzip2'; choose one of none, gzip, zstd"),
        ("gzip", 10, "compression level 10 is not valid for gzip; choose 0 to 9"),
        ("zstd", 0, "compression level 0 is not valid for zstd; choose 1 to 19"),
        ("none", 1, "compression level 1 is not valid for none; choose 0 to 0"),
    ],
)
def test_unknown_algorithm_or_level_is_refused(tmp_path: Path, algorithm: str, level: int, message: str):
    record = cache_with_tar(tmp_path, b"x" * 1024)
    with pytest.raises(PipelineError) as info:
        compress_blob(tmp_path, record, algorithm, level)
    assert str(info.value) == message


def test_missing_layer_blob_is_a_layer_error_naming_it(tmp_path: Path):
    record = LayerRecord("sha256:" + "ab" * 32, 2048)
    with pytest.raises(LayerError, match=rf"{tmp_path}/blobs/sha256/{'ab' * 32}: .* is missing; pack the layer again"):
        compress_blob(tmp_path, record, "zstd", 3)


def test_layer_blob_of_another_size_is_a_layer_error(tmp_path: Path, layer_tar: bytes):
    record = cache_with_tar(tmp_path, layer_tar)
    with open(tmp_path / "blobs" / "sha256" / record.hex, "ab") as f:
        f.write(b"\0" * 512)
    with pytest.raises(LayerError, match=f"has {len(layer_tar) + 512} bytes, {len(layer_tar)} recorded"):
        compress_blob(tmp_path, record, "gzip", 1)
    assert not (tmp_path / "compressed").exists()
    assert sorted(p.name for p in (tmp_path / "blobs" / "sha256").iterdir()) == [record.hex]


@pytest.mark.parametrize(("source", "message"), [(b"short", "ends after 5 of 10 bytes"), (b"x" * 11, "longer than")])
def test_stream_of_another_length_is_a_layer_error(source: bytes, message: str):
    record = LayerRecord("sha256:" + "00" * 32, 10)
    with pytest.raises(LayerError, match=message):
        write_compressed(io.BytesIO(source), io.BytesIO(), record, "zstd", 3)


class FullDisk(io.BytesIO):
    def write(self, data: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("algorithm", ["gzip", "zstd"])
def test_write_error_reaches_the_caller(layer_tar: bytes, algorithm: str):
    record = LayerRecord("sha256:" + hashlib.sha256(layer_tar).hexdigest(), len(layer_tar))
    with pytest.raises(OSError, match="No space left on device"):
        write_compressed(io.BytesIO(layer_tar), FullDisk(), record, algorithm, default_level(algorithm))


def test_full_disk_is_an_output_error_and_leaves_no_partial_file(
    tmp_path: Path, layer_tar: bytes, monkeypatch: pytest.MonkeyPatch
):
    record = cache_with_tar(tmp_path, layer_tar)
    real = compression.write_compressed

    def fill_disk(source: BinaryIO, out: BinaryIO, *args: Any, **kwargs: Any) -> StoredBlob:
        real(source, out, *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(compression, "write_compressed", fill_disk)
    with pytest.raises(OutputError, match=r"no space left on device \(needs about \d+ bytes, \d+ bytes free\)"):
        compress_blob(tmp_path, record, "gzip", 1)
    assert sorted(p.name for p in (tmp_path / "blobs" / "sha256").iterdir()) == [record.hex]
    assert not (tmp_path / "compressed").exists()


def write_oci_layout(dest: Path, cache: Path, record: LayerRecord, blob: StoredBlob) -> None:
    """A one-layer OCI layout tagged latest whose layer is blob, hardlinked from the cache."""
    blobs = dest / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(doc: dict[str, object]) -> dict[str, object]:
        data = json.dumps(doc).encode()
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return {"digest": f"sha256:{digest}", "size": len(data)}

    os.link(blob_path(cache, blob), blobs / blob.hex)
    config = {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": [record.diff_id]}}
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **put(config)},
        "layers": [{"mediaType": blob.media_type, "digest": blob.digest, "size": blob.size}],
    }
    entry = {"mediaType": "application/vnd.oci.image.manifest.v1+json", **put(manifest)}
    entry["annotations"] = {"org.opencontainers.image.ref.name": "latest"}
    (dest / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (dest / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [entry]}))


@pytest.mark.tools("skopeo")
@pytest.mark.parametrize("algorithm", ["gzip", "zstd"])
def test_skopeo_decompresses_the_layer_to_its_diff_id(tmp_path: Path, layer_tar: bytes, algorithm: str):
    cache = tmp_path / "cache"
    record = cache_with_tar(cache, layer_tar)
    blob = compress_blob(cache, record, algorithm, default_level(algorithm))
    write_oci_layout(tmp_path / "layout", cache, record, blob)
    out = tmp_path / "out"
    argv = ["skopeo", "copy", "--quiet", "--dest-decompress", f"oci:{tmp_path / 'layout'}:latest", f"dir:{out}"]
    subprocess.run(argv, check=True, capture_output=True)
    assert (out / record.hex).read_bytes() == layer_tar


@pytest.mark.tools("umoci")
def test_umoci_unpacks_a_gzip_layer(tmp_path: Path, layer_tar: bytes):
    # umoci checks each layer's uncompressed digest against the config's diff_ids (it has no zstd reader).
    cache = tmp_path / "cache"
    record = cache_with_tar(cache, layer_tar)
    blob = compress_blob(cache, record, "gzip", 1)
    write_oci_layout(tmp_path / "layout", cache, record, blob)
    argv = ["umoci", "unpack", "--rootless", "--image", f"{tmp_path / 'layout'}:latest", str(tmp_path / "bundle")]
    subprocess.run(argv, check=True, capture_output=True)
    with tarfile.open(fileobj=io.BytesIO(layer_tar)) as tar:
        expected = tar.extractfile("etc/words.txt")
        assert expected is not None
        assert (tmp_path / "bundle" / "rootfs" / "etc" / "words.txt").read_bytes() == expected.read()

"""Compresses cached layer tars into gzip or zstd blobs, deterministically and once per (diff_id, algorithm, level).

Specs: https://github.com/opencontainers/image-spec/blob/main/layer.md (the tar+gzip and tar+zstd media types),
https://www.rfc-editor.org/rfc/rfc1952 (gzip), https://www.rfc-editor.org/rfc/rfc8878 (zstd).
"""

import hashlib
import json
import logging
import os
import queue
import re
import threading
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

import isal
import zstandard
from isal import isal_zlib

from pipeline import jsoncheck
from pipeline.errors import LayerError, OutputError, PipelineError
from pipeline.host.atomic import write_bytes_atomic
from pipeline.layer.writer import LayerRecord
from pipeline.store.cache import LayerCache, blob_intact
from pipeline.store.layout import CacheLayout

log = logging.getLogger(__name__)

ALGORITHMS = ("none", "gzip", "zstd")
# Every docker load reads plain and gzip layers in a docker-archive; zstd goes only into OCI layouts (issue 7).
DOCKER_ARCHIVE_ALGORITHMS = ("none", "gzip")
MEDIA_TYPES = {
    "none": "application/vnd.oci.image.layer.v1.tar",
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
}
# gzip keeps the 0-9 scale of gzip and pigz. zstd stops at 19 as its CLI does without --ultra: levels 20-22 need
# 32-128 MiB windows in every decoder, and multi-threaded jobs of 4 windows each (19 already runs at ~2 MB/s per
# worker on a /usr tar).
LEVELS = {"none": range(0, 1), "gzip": range(0, 10), "zstd": range(1, 20)}
# ISA-L's levels 1-3 are 4-6x faster than zlib's level 1 at about its ratio (measured on a 386 MB tar of /usr/lib
# and /usr/share: ISA-L 1 ~430 MB/s at 0.476, ISA-L 3 ~250 MB/s at 0.466, zlib 1 ~83 MB/s at 0.473, zlib 6
# ~34 MB/s at 0.441), so gzip levels 1-3 are ISA-L's and the others zlib's: 0 stores, 4-9 trade speed for size
# the way gzip users expect.
_ISAL_LEVELS = range(1, 4)
_DEFAULT_LEVELS = {"none": 0, "gzip": 1, "zstd": 3}
# Multi-threaded zstd writes the same bytes for any number of workers >= 1 when fed as a stream, as here
# (https://github.com/facebook/zstd/issues/2238, #2327), but other bytes than single-threaded mode (workers = 0);
# so workers are always >= 1 and their count is free to follow the cores this process may use. Each worker holds
# about 25 MiB at level 3 and 320 MiB at level 19 (measured peak RSS), hence at most 4.
ZSTD_THREADS = max(1, min(4, len(os.sched_getaffinity(0))))

_CHUNK = 1 << 20
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
# zstd's workers are fed several jobs at a time (4 jobs of 1 MiB per call), so none waits on this thread.
_ZSTD_CHUNK = 4 << 20
_ZSTD_JOB = 1 << 20


@dataclass(frozen=True)
class StoredBlob:
    """A compressed layer blob: digest and size of the stored bytes, the diff_id of the tar they decompress to,
    how it was compressed, and its OCI media type."""

    digest: str
    size: int
    diff_id: str
    algorithm: str
    level: int
    media_type: str

    @property
    def hex(self) -> str:
        return self.digest.removeprefix("sha256:")


class _Compressor(Protocol):
    """What zlib, ISA-L and zstandard compression objects share."""

    def compress(self, data: memoryview, /) -> bytes: ...

    def flush(self) -> bytes: ...


def default_level(algorithm: str) -> int:
    """The level used when none is given: gzip 1 (ISA-L, fast at zlib 1's ratio), zstd 3 (zstd's own default)."""
    check_algorithm(algorithm)
    return _DEFAULT_LEVELS[algorithm]


def check_algorithm(algorithm: str) -> None:
    if algorithm not in ALGORITHMS:
        raise PipelineError(f"unknown compression {algorithm!r}; choose one of {', '.join(ALGORITHMS)}")


def check_level(algorithm: str, level: int) -> None:
    """Raise PipelineError unless algorithm is known and level is one of its levels."""
    check_algorithm(algorithm)
    levels = LEVELS[algorithm]
    if level not in levels:
        raise PipelineError(
            f"compression level {level} is not valid for {algorithm}; choose {levels.start} to {levels.stop - 1}"
        )


def library_version(algorithm: str, level: int) -> str:
    """The library that produces the bytes for (algorithm, level): identical inputs give identical outputs only
    under the same version, which is recorded next to each cached blob."""
    if algorithm == "zstd":
        return f"zstandard {zstandard.__version__} (libzstd {'.'.join(map(str, zstandard.ZSTD_VERSION))})"
    if algorithm == "gzip" and level in _ISAL_LEVELS:
        return f"isal {isal.__version__}"
    if algorithm == "gzip":
        return f"zlib {zlib.ZLIB_RUNTIME_VERSION}"
    return ""


def _compressor(algorithm: str, level: int, size: int, threads: int) -> _Compressor:
    if algorithm == "zstd":
        # Content size and checksum always on, dictionary id off: these flags are part of the bytes.
        # 1 MiB jobs keep both workers busy: with the level's default job size (several MiB) they took turns
        # (measured ~340 -> ~480 MB/s at level 3 on a 300 MB incompressible tar, noisy shared machine). The job
        # size is part of the bytes, so it is fixed here; the thread count still is not.
        params = zstandard.ZstdCompressionParameters.from_level(
            level,
            threads=max(1, threads),
            job_size=_ZSTD_JOB,
            write_checksum=True,
            write_content_size=True,
            write_dict_id=False,
        )
        return zstandard.ZstdCompressor(compression_params=params).compressobj(size=size)
    # wbits 31: a gzip wrapper whose header has mtime 0, no file name and no comment (ISA-L writes OS 255, zlib
    # OS 3), so the bytes depend only on the input.
    if level in _ISAL_LEVELS:
        return isal_zlib.compressobj(level, isal_zlib.DEFLATED, 31)
    return zlib.compressobj(level, zlib.DEFLATED, 31)


class _HashingWriter:
    """Hashes, counts and writes compressed chunks in a second thread.

    The sha256 of the output then overlaps compression instead of stalling the thread that feeds zstd's workers:
    on the incompressible benchmark tars the feeding thread's CPU time dropped from 0.5-1.0 s to ~0.25 s per
    300 MB (hashlib and file writes release the GIL). The queue bounds what waits in memory to a few chunks.
    """

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=4)
        self._error: BaseException | None = None
        self.hash = hashlib.sha256()
        self.size = 0
        self._thread = threading.Thread(target=self._run, name="compressed-blob-writer", daemon=True)
        self._thread.start()

    def write(self, data: bytes) -> None:
        if self._error is not None:
            raise self._error
        if data:
            self._queue.put(data)

    def close(self) -> None:
        """Wait until every chunk is written; re-raise the first error the thread met."""
        self.stop()
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        """End the thread once it has drained the queue, ignoring any error (the caller is failing already)."""
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        while (data := self._queue.get()) is not None:
            if self._error is not None:
                continue  # keep draining, so the producer never blocks on a full queue
            try:
                self.hash.update(data)
                self._out.write(data)
                self.size += len(data)
            except BaseException as e:  # handed to the producing thread by write() and close()
                self._error = e


def write_compressed(
    source: BinaryIO, out: BinaryIO, record: LayerRecord, algorithm: str, level: int, *, threads: int = ZSTD_THREADS
) -> StoredBlob:
    """Compress source, which holds record's layer tar, into out in chunks, hashing what is written.

    Exactly record.size bytes are read (LayerError if source holds more or fewer). They are not hashed again:
    the cache checked them against record.diff_id when it packed them (LayerCache.has_blob), and a second sha256
    pass would cost ~0.25 s of CPU per 300 MB, about half of what zstd -3 spends on incompressible data. zstd runs
    threads workers (the bytes do not depend on how many); gzip compresses in this thread.
    """
    check_level(algorithm, level)
    if algorithm == "none":
        raise PipelineError("write_compressed needs gzip or zstd; an uncompressed layer is its cached tar itself")
    compressor = _compressor(algorithm, level, record.size, threads)
    sink = _HashingWriter(out)
    try:
        chunk = _ZSTD_CHUNK if algorithm == "zstd" else _CHUNK
        view = memoryview(bytearray(chunk))
        left = record.size
        while left:
            n = source.readinto(view[: min(left, chunk)])  # type: ignore[attr-defined]
            if not n:
                raise LayerError(
                    f"{_name(source)}: ends after {record.size - left} of {record.size} bytes; pack the layer again"
                )
            # Every compressor copies what it keeps of its input, so the buffer is reused for the next chunk.
            sink.write(compressor.compress(view[:n]))
            left -= n
        if source.read(1):
            raise LayerError(f"{_name(source)}: longer than its recorded {record.size} bytes; pack the layer again")
        sink.write(compressor.flush())
    except BaseException:
        sink.stop()
        raise
    sink.close()
    return StoredBlob(
        digest="sha256:" + sink.hash.hexdigest(),
        size=sink.size,
        diff_id=record.diff_id,
        algorithm=algorithm,
        level=level,
        media_type=MEDIA_TYPES[algorithm],
    )


def _name(stream: BinaryIO) -> str:
    return str(getattr(stream, "name", "layer stream"))


def mapping_path(cache_root: Path, diff_id: str, algorithm: str, level: int) -> Path:
    return CacheLayout(cache_root).compressed_mapping(diff_id, algorithm, level)


def compress_blob(
    cache_root: Path, record: LayerRecord, algorithm: str, level: int, *, threads: int = ZSTD_THREADS
) -> StoredBlob:
    """The cached layer tar of record, compressed into the cache (blobs/sha256/<digest>) once: later calls, from
    any process, find the recorded blob and return it without compressing again.

    "none" returns the tar itself. A recorded blob that is missing, resized or (when touched since it was
    recorded) altered is compressed again. threads only sets how many zstd workers run, never the bytes.
    """
    check_level(algorithm, level)
    cache = LayerCache(cache_root)
    if algorithm == "none":
        if cache.locate(record.diff_id, record.size) is None:
            _check_source(cache.blob_path(record.diff_id), record)
        return StoredBlob(record.diff_id, record.size, record.diff_id, "none", 0, MEDIA_TYPES["none"])
    mapping = mapping_path(cache_root, record.diff_id, algorithm, level)
    found = _read_mapping(cache, mapping, record, algorithm, level)
    if found is not None:
        return found
    with cache.lock(f"compressed-{mapping.stem}"):
        # Another process may have compressed it while this one waited for the lock.
        found = _read_mapping(cache, mapping, record, algorithm, level)
        if found is not None:
            return found
        source = cache.blob_file(record.diff_id, record.size)  # out of its pack, where it is in one
        blob = _compress_into_cache(cache, source, record, algorithm, level, threads)
        doc = {**asdict(blob), "library": library_version(algorithm, level)}
        write_bytes_atomic(mapping, json.dumps(doc, sort_keys=True).encode())
    log.info("compressed %s (%s %d): %d -> %d bytes", record.diff_id, algorithm, level, record.size, blob.size)
    return blob


def find_blob(cache_root: Path, record: LayerRecord, algorithm: str, level: int) -> StoredBlob | None:
    """The blob compress_blob would return, if it is already in the cache intact; None otherwise (nothing is
    compressed)."""
    if algorithm == "none":
        return StoredBlob(record.diff_id, record.size, record.diff_id, "none", 0, MEDIA_TYPES["none"])
    mapping = mapping_path(cache_root, record.diff_id, algorithm, level)
    return _read_mapping(LayerCache(cache_root), mapping, record, algorithm, level)


def _check_source(source: Path, record: LayerRecord) -> None:
    try:
        size = source.stat().st_size
    except FileNotFoundError as e:
        raise LayerError(f"{source}: cached layer blob {record.diff_id} is missing; pack the layer again") from e
    if size != record.size:
        raise LayerError(f"{source}: cached layer blob has {size} bytes, {record.size} recorded; pack the layer again")


def _compress_into_cache(
    cache: LayerCache, source: Path, record: LayerRecord, algorithm: str, level: int, threads: int
) -> StoredBlob:
    _check_source(source, record)
    try:
        src = open(source, "rb", buffering=0)
    except OSError as e:
        raise LayerError(f"{source}: cannot open cached layer blob ({e.strerror}); pack the layer again") from e
    with src:
        try:
            return cache.write_blob(
                lambda out: write_compressed(src, out, record, algorithm, level, threads=threads),
                lambda blob: blob.digest,
                needed=lambda: record.size,
                step="compress",
            )
        except OSError as e:
            raise OutputError(f"{source}: cannot compress it ({e.strerror}); check the cache directory") from e


def _read_mapping(
    cache: LayerCache, mapping: Path, record: LayerRecord, algorithm: str, level: int
) -> StoredBlob | None:
    """The recorded blob if its mapping is readable and the blob intact; None (compress again) otherwise."""
    try:
        recorded_ns = mapping.stat().st_mtime_ns
        doc = jsoncheck.loads(mapping.read_bytes())
        if not isinstance(doc, dict):
            raise jsoncheck.FieldError("the record", "a JSON object", doc)
        blob = StoredBlob(
            digest=jsoncheck.string(doc["digest"], "digest"),
            size=jsoncheck.whole_number(doc["size"], "size", 0),
            diff_id=jsoncheck.string(doc["diff_id"], "diff_id"),
            algorithm=jsoncheck.string(doc["algorithm"], "algorithm"),
            level=jsoncheck.whole_number(doc["level"], "level"),
            media_type=jsoncheck.string(doc["media_type"], "media_type"),
        )
        # The digest names the blob's file in the cache: nothing but a sha256 digest may.
        if not _DIGEST.fullmatch(blob.digest):
            raise jsoncheck.FieldError("digest", "sha256:<64 hex digits>", blob.digest)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("%s: damaged compressed-blob record (%s); compressing again", mapping, e)
        return None
    # The media type goes into manifests as it is: it must be the one this algorithm's blobs have.
    expected = (record.diff_id, algorithm, level, MEDIA_TYPES.get(algorithm))
    if (blob.diff_id, blob.algorithm, blob.level, blob.media_type) != expected:
        log.warning("%s: records another layer or setting; compressing again", mapping)
        return None
    if not blob_intact(cache.blob_path(blob.digest), blob.digest, blob.size, recorded_ns, "compressing it"):
        return None
    return blob

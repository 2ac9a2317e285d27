"""Measures each performance lever of committing a container against its alternative, all in the same run.

The levers (from the performance issue), each measured as "the product's choice" (marked * in the table, ratio 1.00)
against the alternatives, on commit_benchmark's scale-1 storage (built by common.ensure_storage when missing). The
product's side is always its public API; where an alternative is not something the package can be asked to do, it
is written here, and checked to produce the same bytes.

1. The layer tar writer: pipeline.layer.writer.write_layer vs Python's tarfile (PAX_FORMAT, entries built from lstat
   with numeric ids, the same sorted walk, hashing its output stream) vs `tar --sort=name --numeric-owner -cf - . |
   sha256sum`, on the base layer (~11,000 files, ~300 MB) and on a tree of 1,500 small files made here. Output goes
   to /dev/null (ours and tarfile through the same 1 MiB buffered file the cache uses), so only packing and
   hashing are timed. A reference row ("ref:") shows GNU tar without any hashing (tar piped to cat).
2. Hash while writing (write_layer's single pass) vs a second pass over the written tar, on the base layer into a
   real file, fsync'd as pipeline.store.cache does; the re-read either hits the page cache (the best case for two
   passes) or, after posix_fadvise(DONTNEED), the disk (a layer larger than free memory). write_layer cannot write
   without hashing, so the two-pass variants hash in the first pass and re-read without hashing: the same work
   as writing, then re-reading and hashing (one write, one sha256, one extra read).
3. The copy buffer: the base layer's file data read with readinto into a 1 MiB buffer (the size
   pipeline.layer.writer reads with) vs 64 KiB vs 8 MiB, hashed and written through a 1 MiB buffered file into a
   real file. The writer's buffer is not a parameter, so this copy loop is written here and times file data
   alone, without the walk and the tar headers.
4. Per-entry user/group name lookups (pwd/grp, what tarfile's gettarinfo does) vs numeric ids only, with tarfile
   on the base layer (write_layer never looks names up).
5. Archive assembly of the three cached layer blobs (~512 MB): pipeline.image.archive.write_image_archive, which
   copies each blob with a readinto/write loop (1 MiB buffer), vs the same archive written here (headers from
   pipeline.layer.tarheader) copying with os.copy_file_range and with os.sendfile. Each variant's archive is hashed
   once before the timing and must match write_image_archive's.
6. A 2 GiB sparse file with 1% data: write_layer (SEEK_DATA/SEEK_HOLE: holes are hashed as zeros, never read) vs
   the same tar with every byte of the file read (written here: write_layer's header bytes, then the file through
   a 1 MiB readinto buffer); the bytes that went through read() and those fetched from storage come from
   /proc/self/io (rchar, read_bytes).
7. `luigi --module pipeline CommitImage` with --workers 1 vs --workers 2, cold cache each time.
8. Peak RSS (GNU time %M) of a cold CommitImage on the scale-1 storage vs one whose container layer is a single
   4 GiB sparse file holding 1.5 GiB of data (skipped, saying why, when the disk has no room for it).

Levers 3 and 5 write into the page cache without fsync (lever 2 fsyncs, as does CommitImage); every sample starts
after an untimed os.sync(), so none pays for another's writeback. Every variant runs once untimed first (except in
lever 8), then --repeat timed rounds in alternating order (A B C, C B A, ...). The table shows the median and
fastest sample, the spread ((max - min) / median), the ratio of medians to the product's choice (> 1: slower than
ours) and CPU s: user + system time of this process and of the children it waited for (GNU tar and sha256sum run
side by side on the 2 CPUs; on a shared machine CPU s moves less than wall time). Variants that must produce the
same bytes (levers 2, 3, 5, 6, 7) are checked against each other.

Usage: .venv/bin/python benchmarks/levers.py [--json FILE] [--repeat 3] [--levers 1,2,...] [--workdir DIR]
       [--profile FILE]
--profile FILE also runs one cold CommitImage under pyinstrument (pip install pyinstrument into the venv; it is not
a project dependency) and writes its text report to FILE.
"""

from __future__ import annotations

import argparse
import contextlib
import grp
import hashlib
import json
import os
import platform
import pwd
import random
import shutil
import stat
import statistics
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import IO, BinaryIO, cast

import common
from common import MB, BenchmarkError

from pipeline.image.archive import Member, write_image_archive
from pipeline.layer import tarheader
from pipeline.layer.tarheader import Header
from pipeline.layer.writer import write_layer
from pipeline.store.cache import LayerCache

MIB = 1 << 20
GIB = 1 << 30
BUFFER = 1 << 20  # the output buffering pipeline.store.cache uses for layer blobs
WRITER_CHUNK = 1 << 20  # the readinto size pipeline.layer.writer copies file data with (not a parameter)
WIN = 0.90  # an alternative at or below this ratio to the product's choice is reported as a win
REF = "ref: "  # a reference row (the cost without hashing), never counted as an alternative

SMALL_FILES = 1_500
SPARSE_SIZE = 2 * GIB
SPARSE_FILE = "var/lib/db/sparse.img"  # the sparse tree's one file
SPARSE_EXTENTS = 64  # 1% of the file as data, in 64 extents spread evenly
BIG_SIZE = 4 * GIB
BIG_DATA = 3 * GIB // 2
BIG_EXTENTS = 24
BIG_ID = hashlib.sha256(b"levers big-file container").hexdigest()
FORMAT_VERSION = 1  # bump when the trees generated here change, so old ones are rebuilt


# --------------------------------------------------------------------------------------------------------------
# The measuring harness
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What one run of a variant produced: a check value (digest) and what else the lever reports."""

    check: str = ""
    seconds: float | None = None  # set when the variant times itself (excluding its own checks)
    rchar: int | None = None  # bytes through read() and friends, from /proc/self/io
    disk_read: int | None = None  # bytes fetched from storage (read_bytes in /proc/self/io)
    disk_write: int | None = None  # bytes sent to storage (write_bytes less cancelled_write_bytes)
    maxrss_kib: int | None = None
    tar_bytes: int | None = None  # bytes packed, when only known after the run


@dataclass(frozen=True)
class Variant:
    name: str
    run: Callable[[], Outcome]
    nbytes: int = 0  # bytes of tar (or archive) the variant produces, for MB/s; 0: the outcome's tar_bytes


@dataclass
class Row:
    lever: str
    variant: str
    product: bool
    samples_s: list[float] = field(default_factory=list)
    cpu_samples_s: list[float] = field(default_factory=list)  # user + system, this process and its children
    outcomes: list[Outcome] = field(default_factory=list)
    median_s: float = 0.0
    cpu_s: float = 0.0
    spread_pct: float = 0.0
    ratio: float = 0.0
    mb_per_s: float = 0.0
    notes: str = ""


def run_lever(
    lever: str,
    variants: list[Variant],
    *,
    repeat: int,
    before_each: Callable[[], None] | None = None,
    warmup: bool = True,
    agree: bool = True,
    inner: int = 1,
) -> list[Row]:
    """Time each variant (the first is the product's choice) in alternating rounds; inner runs make one sample.
    before_each runs untimed before every run; common.measure then syncs and times it."""
    rows = [Row(lever, v.name, product=i == 0) for i, v in enumerate(variants)]
    checks: dict[str, str] = {}
    if warmup:
        for v in variants:
            if before_each:
                before_each()
            checks[v.name] = common.measure(v.run)[1].check
    for round_index, (v, row) in common.alternating(list(zip(variants, rows, strict=True)), repeat):
        total = cpu = 0.0
        for _ in range(inner):
            if before_each:
                before_each()
            sample, outcome = common.measure(v.run)
            outcome.rchar, outcome.disk_read, outcome.disk_write = sample.rchar, sample.read_bytes, sample.write_bytes
            cpu += sample.cpu_seconds
            total += outcome.seconds if outcome.seconds is not None else sample.seconds
            checks.setdefault(v.name, outcome.check)
        row.samples_s.append(total / inner)
        row.cpu_samples_s.append(cpu / inner)
        row.outcomes.append(outcome)
        print(f"  {lever}: {v.name}: run {round_index + 1}/{repeat}: {total / inner:.3f}s", flush=True)
    if agree and len(set(checks.values())) > 1:
        raise BenchmarkError(f"{lever}: variants disagree: {checks}")
    base = statistics.median(rows[0].samples_s)
    for v, row in zip(variants, rows, strict=True):
        row.median_s = statistics.median(row.samples_s)
        row.cpu_s = statistics.median(row.cpu_samples_s)
        row.spread_pct = (max(row.samples_s) - min(row.samples_s)) / row.median_s * 100
        row.ratio = row.median_s / base
        nbytes = v.nbytes or (row.outcomes[-1].tar_bytes or 0)
        row.mb_per_s = nbytes / MB / row.median_s
    return rows


def remover(*paths: Path) -> Callable[[], None]:
    """A before_each that deletes the previous sample's output."""

    def before() -> None:
        for path in paths:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)

    return before


def read_through(path: Path, chunk: int) -> Iterator[memoryview]:
    """path's bytes, in readinto reads of a buffer of min(chunk, its size) bytes (as pipeline.layer.writer sizes
    its buffer for each file); each view is valid until the next one."""
    with open(path, "rb", buffering=0) as f:
        buf = memoryview(bytearray(min(chunk, max(os.fstat(f.fileno()).st_size, 1))))
        while n := f.readinto(buf):
            yield buf[:n]


# --------------------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------------------


def ensure_tree(home: Path, what: str, build: Callable[[Path], None]) -> Path:
    """home/diff, built by build() unless a complete one of this FORMAT_VERSION is there."""
    marker = home / "COMPLETE.json"
    if marker.exists() and json.loads(marker.read_text()).get("version") == FORMAT_VERSION:
        return home / "diff"
    if home.exists():
        shutil.rmtree(home)
    print(f"building {what} in {home} ...", flush=True)
    (home / "diff").mkdir(parents=True)
    build(home / "diff")
    os.sync()
    marker.write_text(json.dumps({"version": FORMAT_VERSION}))
    return home / "diff"


def build_small_tree(diff: Path) -> None:
    """SMALL_FILES files of 1-16 KiB, 50 per directory (the shape of the issue's 1,500-file measurement)."""
    rng = random.Random(4)
    for i in range(SMALL_FILES):
        common.write_small_file(diff / f"usr/share/small{i // 50:02d}" / f"f{i:04d}.txt", rng)


def write_sparse(path: Path, size: int, data: int, extents: int, seed: int) -> None:
    """A size-byte file holding data bytes of random content in extents evenly spaced runs; the rest are holes."""
    rng = random.Random(seed)
    block = rng.randbytes(4 * MIB)
    stride = size // extents // MIB * MIB
    extent = data // extents // 4096 * 4096
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for i in range(extents):
            offset, left = i * stride, extent
            while left:
                n = os.pwrite(fd, block[: min(left, len(block))], offset)
                offset += n
                left -= n
        os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)


def build_sparse_tree(diff: Path) -> None:
    (diff / SPARSE_FILE).parent.mkdir(parents=True)
    write_sparse(diff / SPARSE_FILE, SPARSE_SIZE, SPARSE_SIZE // 100, SPARSE_EXTENTS, 6)


def ensure_big_storage(home: Path) -> tuple[Path | None, str]:
    """A rocker storage whose one container (no lower layers) holds a BIG_SIZE sparse file with BIG_DATA of data.

    Returns (root, "") or (None, why it was skipped): the commit needs the file, a BIG_SIZE cache blob and a
    BIG_SIZE archive on this filesystem, plus 2 GiB to spare.
    """
    marker = home / "COMPLETE.json"
    complete = marker.exists() and json.loads(marker.read_text()).get("version") == FORMAT_VERSION
    home.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(home.parent).free
    needed = 2 * BIG_SIZE + 2 * GIB + (0 if complete else BIG_DATA)
    if free < needed:
        return None, f"needs {needed / GIB:.1f} GiB free under {home.parent}, {free / GIB:.1f} GiB free"
    root = home / "root"
    if complete:
        return root, ""
    if home.exists():
        shutil.rmtree(home)
    print(f"building a {BIG_SIZE / GIB:g} GiB sparse file with {BIG_DATA / GIB:g} GiB of data in {home} ...")
    app = root / "overlay2" / BIG_ID / "diff" / "var/lib/app"
    app.mkdir(parents=True)
    write_sparse(app / "big.img", BIG_SIZE, BIG_DATA, BIG_EXTENTS, 7)
    common.write_container_config(root, BIG_ID, "levers-bigfile")
    os.sync()
    marker.write_text(json.dumps({"version": FORMAT_VERSION}))
    return root, ""


# --------------------------------------------------------------------------------------------------------------
# Writers: ours, tarfile, GNU tar; the copy loops written here
# --------------------------------------------------------------------------------------------------------------


def pack_ours(tree: Path, dest: Path) -> Outcome:
    with open(dest, "wb", buffering=BUFFER) as f:
        record = write_layer(tree, f)
    return Outcome(check=record.diff_id)


def pack_durably(tree: Path, dest: Path) -> Outcome:
    """write_layer into dest, flushed and fsync'd as pipeline.store.cache does."""
    with open(dest, "wb", buffering=BUFFER) as f:
        record = write_layer(tree, f)
        f.flush()
        os.fsync(f.fileno())
    return Outcome(check=record.diff_id)


def pack_two_passes(tree: Path, dest: Path, *, from_disk: bool) -> Outcome:
    """pack_durably, then dest read back whole; from_disk drops its cached pages first (as happens to a layer
    larger than the free memory, or once the page cache has moved on). The hash is write_layer's, taken in the
    first pass (it cannot be turned off), so the sha256 is counted once, as in write-then-hash."""
    outcome = pack_durably(tree, dest)
    if from_disk:
        fd = os.open(dest, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # clean pages after the fsync: all of them drop
        finally:
            os.close(fd)
    for _ in read_through(dest, MIB):
        pass
    return outcome


def regular_files(tree: Path) -> list[Path]:
    """The regular files under tree, in write_layer's order."""
    return [Path(path) for path, _ in sorted_walk(tree) if stat.S_ISREG(os.lstat(path).st_mode)]


def copy_file_data(files: list[Path], dest: Path, chunk: int) -> Outcome:
    """The data of files, read in chunk-byte readinto calls, hashed and written to dest through a BUFFER-byte
    buffered file: the inner loop of write_layer with its buffer size as a parameter."""
    digest = hashlib.sha256()
    copied = 0
    with open(dest, "wb", buffering=BUFFER) as out:
        for path in files:
            for data in read_through(path, chunk):
                digest.update(data)
                out.write(data)
                copied += len(data)
    return Outcome(check="sha256:" + digest.hexdigest(), tar_bytes=copied)


class HeadSink:
    """A write-only stream that keeps the first limit bytes written to it and counts all of them."""

    def __init__(self, limit: int) -> None:
        self.head = bytearray()
        self.limit = limit
        self.size = 0

    def write(self, data: bytes | memoryview) -> int:
        if len(self.head) < self.limit:
            self.head += data[: self.limit - len(self.head)]
        self.size += len(data)
        return len(data)


def tar_head(tree: Path, file: Path) -> bytes:
    """What write_layer writes for tree before the data of file, the tree's one regular file, which sorts last:
    the headers of its directories and its own header."""
    sink = HeadSink(64 * 1024)
    record = write_layer(tree, cast(BinaryIO, sink))
    size = file.stat().st_size
    head = record.size - size - len(tarheader.padding(size)) - len(tarheader.END_OF_ARCHIVE)
    if not 0 < head <= sink.limit:
        raise BenchmarkError(f"{tree}: not one regular file that sorts last; update tar_head() in this script")
    return bytes(sink.head[:head])


def pack_reading_holes(file: Path, head: bytes, dest: Path) -> Outcome:
    """The tar write_layer writes for a tree of directories and one file (head: everything before the file's
    data, from tar_head), with the file's holes read like data: every byte through a WRITER_CHUNK readinto buffer,
    hashed and written to dest through a BUFFER-byte buffered file, then the padding and the end of archive."""
    digest = hashlib.sha256(head)
    with open(dest, "wb", buffering=BUFFER) as out:
        out.write(head)
        size = 0
        for data in read_through(file, WRITER_CHUNK):
            digest.update(data)
            out.write(data)
            size += len(data)
        tail = tarheader.padding(size) + tarheader.END_OF_ARCHIVE
        digest.update(tail)
        out.write(tail)
    return Outcome(check="sha256:" + digest.hexdigest())


class HashingWriter:
    """A write-only stream that hashes what passes through (tarfile needs write and tell)."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._hash = hashlib.sha256()
        self._size = 0

    def write(self, data: bytes) -> int:
        self._hash.update(data)
        self._out.write(data)
        self._size += len(data)
        return len(data)

    def tell(self) -> int:
        return self._size

    def digest(self) -> str:
        return "sha256:" + self._hash.hexdigest()


def sorted_walk(tree: Path) -> Iterator[tuple[str, str]]:
    """(path, tar name) of every entry under tree in write_layer's order: by tar name, directories as "name/"."""
    stack: list[Iterator[tuple[bytes, str, str, bool]]] = []

    def listing(directory: str, prefix: str) -> Iterator[tuple[bytes, str, str, bool]]:
        items = []
        for entry in os.scandir(directory):
            is_dir = entry.is_dir(follow_symlinks=False)
            name = prefix + entry.name
            items.append((os.fsencode(name + ("/" if is_dir else "")), entry.path, name, is_dir))
        return iter(sorted(items))

    stack.append(listing(str(tree), ""))
    while stack:
        item = next(stack[-1], None)
        if item is None:
            stack.pop()
            continue
        _, path, name, is_dir = item
        yield path, name
        if is_dir:
            stack.append(listing(path, name + "/"))


def tar_info(path: str, name: str, *, name_lookups: bool) -> tarfile.TarInfo:
    """What tarfile's gettarinfo makes of path, but built from os.lstat here so that the user and group names are
    looked up (pwd/grp, as gettarinfo always does) only with name_lookups. No hardlink detection: the trees
    measured have none."""
    st = os.lstat(path)
    info = tarfile.TarInfo(name)
    info.mode = stat.S_IMODE(st.st_mode)
    info.uid, info.gid = st.st_uid, st.st_gid
    # Whole seconds, as write_layer stores them; a float mtime would add a pax record to every member.
    info.mtime = int(st.st_mtime)
    if stat.S_ISREG(st.st_mode):
        info.type, info.size = tarfile.REGTYPE, st.st_size
    elif stat.S_ISDIR(st.st_mode):
        info.type = tarfile.DIRTYPE
    elif stat.S_ISLNK(st.st_mode):
        info.type, info.linkname = tarfile.SYMTYPE, os.readlink(path)
    elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        info.type = tarfile.CHRTYPE if stat.S_ISCHR(st.st_mode) else tarfile.BLKTYPE
        info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
    elif stat.S_ISFIFO(st.st_mode):
        info.type = tarfile.FIFOTYPE
    else:
        raise BenchmarkError(f"{path}: a socket; tarfile cannot store it")
    if name_lookups:
        with contextlib.suppress(KeyError):
            info.uname = pwd.getpwuid(st.st_uid)[0]
        with contextlib.suppress(KeyError):
            info.gname = grp.getgrgid(st.st_gid)[0]
    return info


def pack_tarfile(tree: Path, dest: Path, *, name_lookups: bool) -> Outcome:
    """tarfile, PAX, entries from tar_info in write_layer's order, file data through tarfile's addfile."""
    with open(dest, "wb", buffering=BUFFER) as f:
        sink = HashingWriter(f)
        with tarfile.open(fileobj=cast(IO[bytes], sink), mode="w", format=tarfile.PAX_FORMAT) as tar:
            for path, name in sorted_walk(tree):
                info = tar_info(path, name, name_lookups=name_lookups)
                if info.isreg():
                    with open(path, "rb") as src:
                        tar.addfile(info, src)
                else:
                    tar.addfile(info)
    return Outcome(check=sink.digest())


def pack_gnu_tar(tree: Path, consumer: str = "sha256sum") -> Outcome:
    """`tar ... -cf - . | consumer`, never `-f /dev/null`: GNU tar then skips reading file contents."""
    argv = ["tar", "-C", str(tree), "--sort=name", "--numeric-owner", "-cf", "-", "."]
    tar = subprocess.Popen(argv, stdout=subprocess.PIPE)
    assert tar.stdout is not None
    with tar.stdout:
        hashing = consumer == "sha256sum"
        out = subprocess.PIPE if hashing else subprocess.DEVNULL
        done = subprocess.run([consumer], stdin=tar.stdout, stdout=out, check=True)
    if tar.wait() != 0:
        raise BenchmarkError(f"{' '.join(argv)} exited with {tar.returncode}")
    return Outcome(check="sha256:" + done.stdout.split()[0].decode() if hashing else "")


# --------------------------------------------------------------------------------------------------------------
# Archive assembly: write_image_archive, and the same archive written here with the kernel's copy calls
# --------------------------------------------------------------------------------------------------------------

Copy = Callable[[int, int, int], int]  # (out_fd, in_fd, count) -> bytes copied, from the file offsets


def copy_file_range(out_fd: int, in_fd: int, count: int) -> int:
    return os.copy_file_range(in_fd, out_fd, count)


def sendfile(out_fd: int, in_fd: int, count: int) -> int:
    return os.sendfile(out_fd, in_fd, None, count)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def archive_with(dest: Path, blobs: list[tuple[str, Path]], copy: Copy) -> Outcome:
    """The archive write_image_archive writes for blobs (their directories, then blobs/sha256/<hex> each, mtime 0),
    each blob's bytes moved by copy."""
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        for directory in (b"blobs/", b"blobs/sha256/"):
            write_all(fd, tarheader.build_header(Header(directory, tarheader.DIRECTORY, mode=0o755)))
        for hex_digest, path in blobs:
            size = path.stat().st_size
            name = f"blobs/sha256/{hex_digest}".encode()
            write_all(fd, tarheader.build_header(Header(name, tarheader.REGULAR, size=size)))
            in_fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                left = size
                while left:
                    n = copy(fd, in_fd, left)
                    if n == 0:
                        raise BenchmarkError(f"{path} shrank while it was copied")
                    left -= n
            finally:
                os.close(in_fd)
            write_all(fd, tarheader.padding(size))
        write_all(fd, tarheader.END_OF_ARCHIVE)
        size = os.lseek(fd, 0, os.SEEK_CUR)
    finally:
        os.close(fd)
    return Outcome(check=str(size))


def archive_ours(dest: Path, blobs: list[tuple[str, Path]]) -> Outcome:
    members = [Member(f"blobs/sha256/{hex_digest}", path=path) for hex_digest, path in blobs]
    return Outcome(check=str(write_image_archive(dest, members, mtime=0)))


# --------------------------------------------------------------------------------------------------------------
# CommitImage as a subprocess
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Place:
    workdir: Path  # <commit benchmark workdir>/levers
    root: Path  # the scale-1 storage
    luigi: Path

    @property
    def out(self) -> Path:
        return self.workdir / "out"

    @property
    def logs(self) -> Path:
        return self.workdir / "logs"


def commit_argv(place: Place, root: Path, container_id: str, out: Path, cache: Path, workers: int) -> list[str]:
    return [
        str(place.luigi),
        "--module",
        "pipeline",
        "CommitImage",
        "--id",
        container_id,
        "--output",
        str(out),
        "--storage-root",
        str(root),
        "--commit-cache-dir",
        str(cache),
        "--local-scheduler",
        "--workers",
        str(workers),
    ]


def commit_cold(place: Place, root: Path, container_id: str, workers: int, label: str) -> Outcome:
    """One CommitImage into an empty cache (the caller's before_each empties it), timed around the child only."""
    out, cache = place.out / "commit.tar", place.out / "commit-cache"
    usage = common.Usage()
    start = time.perf_counter()
    common.run_child(
        commit_argv(place, root, container_id, out, cache, workers),
        usage,
        cwd=common.REPO_ROOT,
        log=place.logs / f"{label}.log",
    )
    seconds = time.perf_counter() - start
    blobs = cache / "blobs" / "sha256"
    tar_bytes = sum(p.stat().st_size for p in blobs.iterdir() if not p.name.startswith("."))
    return Outcome(
        check=",".join(common.archive_layers(out)), seconds=seconds, maxrss_kib=usage.maxrss_kib, tar_bytes=tar_bytes
    )


def profile_commit(place: Place, report: Path) -> None:
    """One cold CommitImage (one worker: tasks run in this process's child, in its main thread) under pyinstrument."""
    out, cache = place.out / "profile.tar", place.out / "profile-cache"
    remover(out, cache)()
    argv = [sys.executable, "-m", "pyinstrument", "-r", "text", "-o", str(report)]
    argv += commit_argv(place, place.root, common.CONTAINER_ID, out, cache, 1)
    try:
        common.run_child(argv, common.Usage(), cwd=common.REPO_ROOT, log=place.logs / "profile.log")
    finally:
        remover(out, cache)()


# --------------------------------------------------------------------------------------------------------------
# The levers
# --------------------------------------------------------------------------------------------------------------


def lever_writers(place: Place, repeat: int, base: Path, small: Path, base_tar: int, small_tar: int) -> list[Row]:
    null = Path(os.devnull)
    rows = []
    for lever, tree, nbytes, inner in (
        ("1a writer: base layer", base, base_tar, 1),
        (f"1b writer: {SMALL_FILES:,} small files", small, small_tar, 10),
    ):
        variants = [
            Variant("pipeline.layer.writer.write_layer", partial(pack_ours, tree, null), nbytes),
            Variant("tarfile PAX, numeric, same walk", partial(pack_tarfile, tree, null, name_lookups=False), nbytes),
            Variant("GNU tar | sha256sum", partial(pack_gnu_tar, tree), nbytes),
            # A reference, not an alternative: what GNU tar costs without any hashing.
            Variant(f"{REF}GNU tar | cat", partial(pack_gnu_tar, tree, "cat"), nbytes),
        ]
        rows += run_lever(lever, variants, repeat=repeat, agree=False, inner=inner)
    return rows


def lever_one_pass(place: Place, repeat: int, base: Path, base_tar: int) -> list[Row]:
    dest = place.out / "layer.tar"
    variants = [
        Variant("one pass: hash while writing", partial(pack_durably, base, dest), base_tar),
        Variant("2 passes, re-read from page cache", partial(pack_two_passes, base, dest, from_disk=False), base_tar),
        Variant("2 passes, re-read from disk", partial(pack_two_passes, base, dest, from_disk=True), base_tar),
    ]
    rows = run_lever("2 hashing: base layer", variants, repeat=repeat, before_each=remover(dest))
    remover(dest)()
    for row in rows:
        row.notes = f"disk reads {statistics.median(o.disk_read or 0 for o in row.outcomes) / MB:,.0f} MB"
    return rows


def lever_buffer(place: Place, repeat: int, base: Path) -> list[Row]:
    dest = place.out / "data.bin"
    files = regular_files(base)
    variants = [
        Variant(
            f"readinto {size // 1024:,} KiB" if size < MIB else f"readinto {size // MIB} MiB",
            partial(copy_file_data, files, dest, size),
        )
        for size in (WRITER_CHUNK, 64 * 1024, 8 * MIB)
    ]
    rows = run_lever("3 buffer: base layer data", variants, repeat=repeat, before_each=remover(dest))
    remover(dest)()
    return rows


def lever_names(place: Place, repeat: int, base: Path, base_tar: int, entries: int) -> list[Row]:
    null = Path(os.devnull)
    variants = [
        Variant("tarfile, numeric ids only", lambda: pack_tarfile(base, null, name_lookups=False), base_tar),
        Variant("tarfile, pwd/grp lookup per entry", lambda: pack_tarfile(base, null, name_lookups=True), base_tar),
    ]
    rows = run_lever("4 names: base layer", variants, repeat=repeat, agree=False)
    per_entry = (rows[1].median_s - rows[0].median_s) / entries * 1e6
    rows[1].notes = f"{per_entry:+.1f} us/entry ({entries:,} entries)"
    return rows


def lever_archive(place: Place, repeat: int, blobs: list[tuple[str, Path]]) -> list[Row]:
    dest = place.out / "archive.tar"
    nbytes = sum(path.stat().st_size for _, path in blobs)
    variants = [
        Variant("write_image_archive: 1 MiB read loop", partial(archive_ours, dest, blobs), nbytes),
        Variant("os.copy_file_range", partial(archive_with, dest, blobs, copy_file_range), nbytes),
        Variant("os.sendfile", partial(archive_with, dest, blobs, sendfile), nbytes),
    ]
    # The timed runs compare sizes only; that the variants write the same bytes is checked once, here.
    digests = set()
    for v in variants:
        v.run()
        with open(dest, "rb") as f:
            digests.add(hashlib.file_digest(f, "sha256").hexdigest())
    if len(digests) > 1:
        raise BenchmarkError(f"5 archive: the variants' archives differ ({len(digests)} digests)")
    rows = run_lever("5 archive: 3 cached blobs", variants, repeat=repeat, before_each=remover(dest))
    remover(dest)()
    return rows


def lever_sparse(place: Place, repeat: int, tree: Path) -> list[Row]:
    null = Path(os.devnull)
    nbytes = SPARSE_SIZE + 4096  # the tar: the file's bytes plus a few header blocks
    file = tree / SPARSE_FILE
    head = tar_head(tree, file)
    variants = [
        Variant("write_layer: SEEK_DATA/SEEK_HOLE", partial(pack_ours, tree, null), nbytes),
        Variant("read every byte", partial(pack_reading_holes, file, head, null), nbytes),
    ]
    rows = run_lever("6 sparse: 2 GiB, 1% data", variants, repeat=repeat)
    for row in rows:
        rchar = statistics.median(o.rchar or 0 for o in row.outcomes)
        disk = statistics.median(o.disk_read or 0 for o in row.outcomes)
        row.notes = f"read() {rchar / MB:,.1f} MB, from disk {disk / MB:,.1f} MB"
    return rows


def lever_workers(place: Place, repeat: int) -> list[Row]:
    cache = place.out / "commit-cache"
    before = remover(place.out / "commit.tar", cache)
    variants = [
        Variant(
            f"CommitImage --workers {n}",
            partial(commit_cold, place, place.root, common.CONTAINER_ID, n, f"workers{n}"),
        )
        for n in (1, 2)
    ]
    rows = run_lever("7 parallel layers: cold", variants, repeat=repeat, before_each=before)
    before()
    for row in rows:
        row.notes = f"peak RSS {max(o.maxrss_kib or 0 for o in row.outcomes) / 1024:.0f} MiB"
    return rows


def lever_memory(place: Place, big_root: Path) -> list[Row]:
    cache = place.out / "commit-cache"
    before = remover(place.out / "commit.tar", cache)
    variants = [
        Variant(
            "scale-1 storage, 3 layers", lambda: commit_cold(place, place.root, common.CONTAINER_ID, 1, "rss-scale1")
        ),
        Variant(
            f"1 layer: {BIG_SIZE // GIB} GiB file, {BIG_DATA / GIB:g} GiB data",
            lambda: commit_cold(place, big_root, BIG_ID, 1, "rss-bigfile"),
        ),
    ]
    rows = run_lever("8 peak RSS: cold commit", variants, repeat=1, before_each=before, warmup=False, agree=False)
    before()
    base_rss = rows[0].outcomes[0].maxrss_kib or 1
    for row in rows:
        rss = row.outcomes[0].maxrss_kib or 0
        tar = row.outcomes[0].tar_bytes or 0
        row.notes = f"peak RSS {rss / 1024:.0f} MiB (x{rss / base_rss:.2f}), layer tars {tar / MB:,.0f} MB"
    return rows


# --------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------


def print_table(rows: list[Row]) -> None:
    columns = [
        ("lever", -29),
        ("variant (* = product)", -38),
        ("median s", 8),
        ("min s", 7),
        ("spread", 6),
        ("x ours", 6),
        ("CPU s", 6),
        ("MB/s", 5),
        (" notes", 0),  # free text, two spaces after MB/s
    ]
    cells = []
    previous = ""
    for r in rows:
        cells.append(
            [
                r.lever if r.lever != previous else "",
                ("* " if r.product else "  ") + r.variant,
                f"{r.median_s:.3f}",
                f"{min(r.samples_s):.3f}",
                f"{r.spread_pct:.0f}%",
                f"{r.ratio:.2f}",
                f"{r.cpu_s:.3f}",
                f"{r.mb_per_s:.0f}",
                f" {r.notes}",
            ]
        )
        previous = r.lever
    common.print_table(columns, cells)


def wins(rows: list[Row]) -> list[str]:
    """Alternatives whose median beats the product's choice by more than 1 - WIN (lever 8 compares sizes, not
    methods); "clear" when even their slowest sample beats the product's fastest, else "within noise"."""
    lines = []
    base: dict[str, Row] = {r.lever: r for r in rows if r.product}
    for r in rows:
        if not r.product and r.ratio <= WIN and not r.lever.startswith("8") and not r.variant.startswith(REF):
            b = base[r.lever]
            verdict = "clear" if max(r.samples_s) < min(b.samples_s) else "within noise: samples overlap"
            lines.append(
                f"{r.lever}: '{r.variant}' {r.median_s:.3f}s vs '{b.variant}' {b.median_s:.3f}s"
                f" ({(1 - r.ratio) * 100:.0f}% faster; {verdict})"
            )
    return lines


# --------------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = common.argument_parser(
        __doc__,
        "pipeline-commit-benchmark",
        "commit_benchmark's workdir: its scale-1 storage is reused; this script's files go to levers/",
        repeat="variant",
    )
    parser.add_argument("--levers", default="1,2,3,4,5,6,7,8", help="comma-separated lever numbers to run")
    parser.add_argument("--profile", type=Path, help="also profile one cold CommitImage (pyinstrument text report)")
    args = parser.parse_args(argv)
    args.levers = {int(n) for n in args.levers.split(",") if n.strip()}
    if args.repeat < 1 or not args.levers <= set(range(1, 9)):
        parser.error("--repeat must be >= 1 and --levers a subset of 1..8")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    luigi = common.find_luigi(("tar", "sha256sum"))
    if luigi is None:
        return 2
    root = common.ensure_storage(args.workdir, 1.0)
    place = Place(args.workdir / "levers", root, luigi)
    common.fresh_dir(place.out)
    common.fresh_dir(place.logs)
    try:
        return run(args, root, place)
    finally:
        shutil.rmtree(place.out, ignore_errors=True)  # the blob cache and outputs; the logs stay


def run(args: argparse.Namespace, root: Path, place: Place) -> int:
    layers = common.layer_dirs(root)
    base = layers[0][1]
    small = ensure_tree(place.workdir / "small-tree", f"{SMALL_FILES:,} small files", build_small_tree)
    sparse = ensure_tree(place.workdir / "sparse-tree", "a 2 GiB sparse file with 1% data", build_sparse_tree)
    # The three layers packed once into a cache: their sizes give MB/s, and lever 5 assembles them.
    cache = LayerCache(place.out / "blob-cache")
    records = [cache.pack_layer(diff) for _, diff in layers]
    blobs = [(r.hex, cache.blob_path(r.diff_id)) for r in records]
    base_tar = records[0].size
    with open(os.devnull, "wb") as null:
        small_tar = write_layer(small, null).size
    entries = sum(1 for _ in sorted_walk(base))

    rows: list[Row] = []
    skipped: dict[str, str] = {}
    try:
        if 1 in args.levers:
            rows += lever_writers(place, args.repeat, base, small, base_tar, small_tar)
        if 2 in args.levers:
            rows += lever_one_pass(place, args.repeat, base, base_tar)
        if 3 in args.levers:
            rows += lever_buffer(place, args.repeat, base)
        if 4 in args.levers:
            rows += lever_names(place, args.repeat, base, base_tar, entries)
        if 5 in args.levers:
            rows += lever_archive(place, args.repeat, blobs)
        if 6 in args.levers:
            rows += lever_sparse(place, args.repeat, sparse)
        if 7 in args.levers:
            rows += lever_workers(place, args.repeat)
        if 8 in args.levers:
            big_root, why = ensure_big_storage(place.workdir / "storage-bigfile")
            if big_root is None:
                skipped["8"] = why
            else:
                rows += lever_memory(place, big_root)
    except BenchmarkError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

    print()
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"repeat {args.repeat}, {os.cpu_count()} CPUs, load {load}, Python {platform.python_version()},"
        f" kernel {platform.release()}"
    )
    print(f"{common.tool_version(['tar', '--version'])}; {common.tool_version(['sha256sum', '--version'])}")
    print(f"storage {root}: base layer tar {base_tar / MB:.0f} MB in {entries:,} entries; layer tars")
    print(f"  {sum(r.size for r in records) / MB:.0f} MB; small tree tar {small_tar / MB:.1f} MB")
    print("x ours = median / the product's (*) median: > 1 is slower than the product. spread = (max - min) / median.")
    print()
    print_table(rows)
    for lever, why in skipped.items():
        print(f"{lever}: skipped ({why})")
    found = wins(rows)
    print()
    print(f"alternatives more than {(1 - WIN) * 100:.0f}% faster than the product's choice:")
    for line in found or ["none"]:
        print(f"  {line}")
    if args.json:
        doc = {
            "repeat": args.repeat,
            "cpus": os.cpu_count(),
            "storage_root": str(root),
            "base_tar_bytes": base_tar,
            "base_entries": entries,
            "small_tar_bytes": small_tar,
            "rows": [asdict(r) for r in rows],
            "skipped": skipped,
            "wins": found,
        }
        common.write_json(args.json, doc)
    if args.profile:
        print(f"\nprofiling one cold CommitImage into {args.profile} ...", flush=True)
        try:
            profile_commit(place, args.profile.resolve())
        except BenchmarkError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The entry index (pipeline.layer.index): recorded while a layer_dir is packed without changing a byte of the tar,
read back in the walk's order, and refused as a whole (a LayerError naming the file, never a crash or unbounded
memory) when it is damaged, forged, of another version or of another directory."""

from __future__ import annotations

import io
import os
import stat
import struct
import subprocess
import sys
import tarfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import zstandard

from pipeline.errors import LayerError
from pipeline.image.imageconfig import EMPTY_LAYER_DIFF_ID
from pipeline.layer import index
from pipeline.layer.delta import write_delta
from pipeline.layer.index import (
    MAGIC,
    OPAQUE,
    PLAIN,
    WHITEOUT,
    IndexDamaged,
    IndexEntry,
    IndexUnavailable,
    IndexWriter,
    read_index,
)
from pipeline.layer.walk import walk_entries
from pipeline.layer.writer import write_layer
from pipeline.store.layout import CacheLayout
from tests.support.overlay_storage import RockerStorage, build_rocker_storage

# The format as index.py's docstring states it, rebuilt here independently to forge indexes.
_HEADER = struct.Struct("<8sI")
_SOURCE = struct.Struct("<QQB")
_RECORD = struct.Struct("<BH")
_SIGNATURE = struct.Struct("<QIIIQqqQQ")


@pytest.fixture(scope="module")
def storage(tmp_path_factory: pytest.TempPathFactory) -> RockerStorage:
    """build_rocker_storage's layers: whiteouts, an opaque directory, hardlinks, devices, xattrs, long names."""
    return build_rocker_storage(tmp_path_factory.mktemp("index") / "storage")


def _layer_dirs(storage: RockerStorage) -> list[Path]:
    return [storage.root / "overlay2" / layer_id / "diff" for layer_id in storage.layer_ids]


def _upper(storage: RockerStorage) -> Path:
    return _layer_dirs(storage)[-1]


def _pack(layer_dir: Path, index_path: Path, **options: object) -> bytes:
    out = io.BytesIO()
    with open(index_path, "wb") as f:
        write_layer(layer_dir, out, index=IndexWriter(f), **options)  # type: ignore[arg-type]
    return out.getvalue()


# --- recording -----------------------------------------------------------------------------------------------------


@pytest.mark.overlay
@pytest.mark.parametrize("clamp", [None, 1_600_000_000])
def test_tar_is_byte_identical_with_and_without_an_index(
    storage: RockerStorage, tmp_path: Path, clamp: int | None
) -> None:
    for number, layer_dir in enumerate(_layer_dirs(storage)):
        plain = io.BytesIO()
        record = write_layer(layer_dir, plain, clamp_mtime=clamp)
        indexed = _pack(layer_dir, tmp_path / f"{number}.idx", clamp_mtime=clamp)
        assert indexed == plain.getvalue(), f"{layer_dir}: the index changed the tar"
        assert record.size == len(indexed)


@pytest.mark.overlay
def test_index_holds_every_walked_entry_in_the_walks_order(storage: RockerStorage, tmp_path: Path) -> None:
    upper = _upper(storage)
    _pack(upper, tmp_path / "upper.idx")
    fd = os.open(upper, os.O_RDONLY | os.O_DIRECTORY)
    try:
        walked = [(prefix, entry) for _, prefix, entry in walk_entries(fd, upper, "trusted")]
    finally:
        os.close(fd)
    indexed = list(read_index(tmp_path / "upper.idx"))
    assert [e.name for e in indexed] == [entry.tar_name for _, entry in walked]
    assert [e.name for e in indexed] == sorted(e.name for e in indexed)
    kinds: dict[str, set[int]] = {type(entry.conversion).__name__: set() for _, entry in walked}
    for got, (prefix, entry) in zip(indexed, walked, strict=True):
        kinds[type(entry.conversion).__name__].add(got.kind)
        st = os.lstat(os.path.join(os.fsencode(upper), prefix + entry.name))
        fields = got.fields
        assert (fields.ino, fields.mode, fields.uid, fields.gid, fields.size) == (
            st.st_ino,
            st.st_mode,
            st.st_uid,
            st.st_gid,
            st.st_size,
        )
        # A whiteout device's ctime and link count are left out: a remount changes them (the shared whiteout).
        device = stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
        assert (fields.mtime_ns, fields.ctime_ns, fields.nlink, fields.rdev) == (
            st.st_mtime_ns,
            0 if device else st.st_ctime_ns,
            0 if device else st.st_nlink,
            st.st_rdev,
        )
    # The container layer holds all three: .wh.hostname, the re-created opt/app, and plain entries.
    assert kinds == {"Whiteout": {WHITEOUT}, "OpaqueDirectory": {OPAQUE}, "Plain": {PLAIN}}
    assert b"etc/.wh.hostname" in {e.name for e in indexed}


@pytest.mark.overlay
def test_unchanged_upper_dir_gives_the_empty_layer(storage: RockerStorage, tmp_path: Path) -> None:
    upper = _upper(storage)
    _pack(upper, tmp_path / "upper.idx")
    out = io.BytesIO()
    with open(tmp_path / "next.idx", "wb") as f:
        record = write_delta(upper, tmp_path / "upper.idx", out, lower_has=_never, index=IndexWriter(f))
    # Only the end-of-archive blocks: the diff_id docker gives an empty layer, which packing already drops.
    assert out.getvalue() == bytes(1024)
    assert (record.diff_id, record.size) == (EMPTY_LAYER_DIFF_ID, 1024)
    assert (tmp_path / "next.idx").read_bytes() == (tmp_path / "upper.idx").read_bytes()


def test_rewrite_restoring_mtime_and_size_is_caught(tmp_path: Path) -> None:
    upper = tmp_path / "upper"
    (upper / "etc").mkdir(parents=True)
    (upper / "etc/app.conf").write_bytes(b"setting=1\n")
    (upper / "etc/other").write_bytes(b"other\n")
    _pack(upper, tmp_path / "before.idx", overlay_xattrs=None)
    before = os.stat(upper / "etc/app.conf")
    with open(upper / "etc/app.conf", "r+b") as f:
        f.write(b"setting=2\n")
    os.utime(upper / "etc/app.conf", ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(upper / "etc/app.conf")
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    out = io.BytesIO()
    progress: list[int] = []
    write_delta(upper, tmp_path / "before.idx", out, lower_has=_never, overlay_xattrs=None, progress=progress.append)
    members = _members(out.getvalue())
    assert members == {"etc/app.conf": b"setting=2\n"}, "only the rewritten file, with its new content"
    assert progress == [len(out.getvalue()) - 1024], "progress after each regular file, as write_layer reports it"


def test_index_path_is_built_by_the_cache_layout(tmp_path: Path) -> None:
    layout = CacheLayout(tmp_path)
    path = layout.entry_index("upper:abc:sha256:0")
    assert path.parent == layout.index_dir and path.suffix == ".idx"
    assert path == layout.entry_index("upper:abc:sha256:0") != layout.entry_index("upper:abc:sha256:1")


# --- refusing indexes ----------------------------------------------------------------------------------------------


@pytest.fixture
def small_index(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """(layer_dir, its index): a few entries of every kind but opaque (no root needed)."""
    upper = tmp_path / "upper"
    (upper / "dir/sub").mkdir(parents=True)
    (upper / "dir/file").write_bytes(b"content")
    (upper / "dir/sub/deeper").write_bytes(b"")
    os.symlink("dir/file", upper / "link")
    os.mkfifo(upper / "fifo")
    _pack(upper, tmp_path / "small.idx", overlay_xattrs=None)
    yield upper, tmp_path / "small.idx"


def _entries(path: Path) -> list[IndexEntry]:
    return list(read_index(path))


def _refused(path: Path, kind: type[LayerError] = IndexDamaged) -> str:
    with pytest.raises(kind) as caught:
        _entries(path)
    assert str(caught.value).startswith(f"{path}: "), "the error must name the index file"
    return str(caught.value)


def test_truncated_index_is_refused_at_every_length(small_index: tuple[Path, Path], tmp_path: Path) -> None:
    data = small_index[1].read_bytes()
    cut = tmp_path / "cut.idx"
    for length in range(len(data) - 4):  # the last 4 bytes are zstd's checksum of data already read in full
        cut.write_bytes(data[:length])
        _refused(cut)


def test_every_flipped_bit_is_refused_or_changes_nothing(small_index: tuple[Path, Path], tmp_path: Path) -> None:
    data = small_index[1].read_bytes()
    original = _entries(small_index[1])
    flipped = tmp_path / "flipped.idx"
    refused = 0
    for position in range(len(data)):
        for bit in range(8):
            damaged = bytearray(data)
            damaged[position] ^= 1 << bit
            flipped.write_bytes(damaged)
            try:
                entries = _entries(flipped)
            except IndexUnavailable as e:  # IndexDamaged, or a version changed by the flip
                assert str(e).startswith(f"{flipped}: ")
                refused += 1
                continue
            # zstd's frame header has bits that change nothing read (as the checksum says): the same entries.
            assert entries == original, f"bit {bit} of byte {position} flipped gives other entries"
    assert refused > 0.95 * 8 * len(data)


def test_index_of_another_version_is_unavailable(small_index: tuple[Path, Path], tmp_path: Path) -> None:
    data = small_index[1].read_bytes()
    other = tmp_path / "v2.idx"
    other.write_bytes(_HEADER.pack(MAGIC, index.FORMAT_VERSION + 1) + data[_HEADER.size :])
    message = _refused(other, IndexUnavailable)
    assert "format version 2" in message
    assert not isinstance(_raised(other), IndexDamaged)


def test_missing_index_is_unavailable(tmp_path: Path) -> None:
    _refused(tmp_path / "absent.idx", IndexUnavailable)


def _raised(path: Path) -> LayerError:
    try:
        _entries(path)
    except LayerError as e:
        return e
    raise AssertionError(f"{path} was read")


def _forge(path: Path, body: bytes, *, source: bytes = _SOURCE.pack(1, 2, 0)) -> Path:
    frame = zstandard.ZstdCompressor(write_checksum=True).compress(source + body)
    path.write_bytes(_HEADER.pack(MAGIC, index.FORMAT_VERSION) + frame)
    return path


def _record(name: bytes, mode: int, kind: int = PLAIN) -> bytes:
    return _RECORD.pack(kind, len(name)) + _SIGNATURE.pack(1, mode, 0, 0, 0, 0, 0, 1, 0) + name


def _listing(*records: bytes, count: int | None = None) -> bytes:
    return b"L" + struct.pack("<I", len(records) if count is None else count) + b"".join(records)


_FILE, _DIR = stat.S_IFREG | 0o644, stat.S_IFDIR | 0o755
_END = b"E" + struct.pack("<QQ", 1, 1)


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (_listing(count=2**32 - 1), "more than"),  # a count that would fill memory
        (_listing(count=index.MAX_LISTING), "truncated"),  # under the cap, but the records are not there
        (_listing(_RECORD.pack(PLAIN, 0xFFFF) + bytes(60)) + _END, "a name of 65535 bytes"),
        (_listing(_record(b"a/b", _FILE)) + _END, "the name"),
        (_listing(_record(b"..", _FILE)) + _END, "the name"),
        (_listing(_record(b"a\0", _FILE)) + _END, "the name"),
        (_listing(_record(b"dir", _DIR)) + _END, "of mode"),  # a directory's name ends in "/"
        (_listing(_record(b"file/", _FILE)) + _END, "of mode"),
        (_listing(_record(b".wh.x", _FILE)) + _END, "of kind"),  # a plain entry the converter refuses
        (_listing(_record(b"x", _FILE, WHITEOUT)) + _END, "of kind"),
        (_listing(_record(b"x", _FILE, OPAQUE)) + _END, "of kind"),
        (_listing(_record(b"x", _FILE, 7)) + _END, "of kind"),
        (_listing(_record(b"b", _FILE), _record(b"a", _FILE)) + b"E" + struct.pack("<QQ", 2, 1), "out of order"),
        (_listing(_record(b"a", _FILE), _record(b"a", _FILE)) + b"E" + struct.pack("<QQ", 2, 1), "out of order"),
        (_listing(_record(b"a", _FILE), _record(b"a/", _DIR)) + b"E" + struct.pack("<QQ", 2, 1), "a second entry"),
        (_listing(_record(b".wh.a", _FILE, WHITEOUT), _record(b"a", _FILE)) + _END, "a second entry"),
        (_listing(_record(b"a", _FILE)) + b"E" + struct.pack("<QQ", 5, 1), "end counts"),
        (_listing(_record(b"a", _FILE)), "truncated"),
        (_listing(_record(b"a", _FILE)) + _END + b"more", "data after its end"),
        (_listing(_record(b"d/", _DIR)) + _END, "listing 2 expected"),  # d's own listing is missing
        (b"Q", "listing 1 expected"),
    ],
)
def test_forged_index_is_refused_naming_it(tmp_path: Path, body: bytes, why: str) -> None:
    assert why in _refused(_forge(tmp_path / "forged.idx", body))


def test_forged_marker_namespace_is_refused(tmp_path: Path) -> None:
    path = _forge(tmp_path / "forged.idx", _listing() + b"E" + bytes(16), source=_SOURCE.pack(1, 2, 9))
    assert "namespace" in _refused(path)


def test_well_formed_forgery_reads_back(tmp_path: Path) -> None:
    """The forgeries above differ from this one in one field each."""
    body = _listing(_record(b"a", _FILE), _record(b"d/", _DIR)) + _listing() + b"E" + struct.pack("<QQ", 2, 2)
    assert [e.name for e in _entries(_forge(tmp_path / "good.idx", body))] == [b"a", b"d/"]


def test_delta_refuses_a_damaged_index_naming_it(small_index: tuple[Path, Path], tmp_path: Path) -> None:
    upper, good = small_index
    damaged = tmp_path / "damaged.idx"
    damaged.write_bytes(good.read_bytes()[:-8])
    with pytest.raises(IndexDamaged, match=f"^{damaged}: damaged entry index"):
        write_delta(upper, damaged, io.BytesIO(), lower_has=_never, overlay_xattrs=None)


def test_index_of_another_directory_is_unavailable(small_index: tuple[Path, Path], tmp_path: Path) -> None:
    upper, recorded = small_index
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(IndexUnavailable, match="recorded for another directory"):
        write_delta(other, recorded, io.BytesIO(), lower_has=_never, overlay_xattrs=None)
    with pytest.raises(IndexUnavailable, match="recorded for another directory"):  # other markers
        write_delta(upper, recorded, io.BytesIO(), lower_has=_never, overlay_xattrs="user")


def test_oversized_listing_is_not_indexed(
    small_index: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    upper, _ = small_index
    monkeypatch.setattr(index, "MAX_LISTING", 2)
    _pack(upper, tmp_path / "big.idx", overlay_xattrs=None)
    message = _refused(tmp_path / "big.idx", IndexUnavailable)
    assert "more than 2 entries was not indexed" in message


# --- memory -----------------------------------------------------------------------------------------------------------

# VmHWM, the peak RSS of this process image: getrusage's ru_maxrss survives execve on Linux, so in a child of pytest
# it starts at pytest's own peak.
_MEMORY_SCRIPT = textwrap.dedent(
    """
    import os, re, sys, time
    from pathlib import Path
    from pipeline.layer.delta import write_delta
    from pipeline.layer.index import IndexWriter

    def peak_kib():
        with open("/proc/self/status") as f:
            return int(re.search(r"VmHWM:\\s*(\\d+) kB", f.read()).group(1))

    upper, previous, following = (Path(a) for a in sys.argv[1:4])
    before = peak_kib()
    start = time.perf_counter()
    with open(os.devnull, "wb") as out, open(following, "wb") as f:
        record = write_delta(upper, previous, out, lower_has=lambda p: False, index=IndexWriter(f), overlay_xattrs=None)
    print(before, peak_kib(), record.size, time.perf_counter() - start)
    """
)


@pytest.fixture
def scratch(tmp_path: Path) -> Iterator[Path]:
    """A directory for a tree of many entries: as root, a tmpfs of its own (creating and deleting 200,000 entries on
    this disk takes seconds each way), unmounted afterwards; otherwise a plain directory."""
    path = tmp_path / "scratch"
    path.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=1g,mode=0755", "pipeline-test", str(path)]
    mounted = os.geteuid() == 0 and subprocess.run(mount, capture_output=True).returncode == 0
    try:
        yield path
    finally:
        if mounted:
            subprocess.run(["umount", str(path)], check=True)


def test_delta_over_200k_entries_keeps_peak_rss_low(scratch: Path) -> None:
    upper = scratch / "upper"
    upper.mkdir()
    # Symlinks rather than files: the walk and the delta treat both alike, and packing the first index skips
    # opening 200,000 files. Memory grows with the depth and the largest directory, not with the tree.
    directories, links = 400, 500
    fd = os.open(upper, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for d in range(directories):
            os.mkdir(b"d%03d" % d, dir_fd=fd)
            sub = os.open(b"d%03d" % d, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            for n in range(links):
                os.symlink(b"target", b"l%03d" % n, dir_fd=sub)
            os.close(sub)
    finally:
        os.close(fd)
    with open(os.devnull, "wb") as out, open(scratch / "before.idx", "wb") as f:
        write_layer(upper, out, index=IndexWriter(f), overlay_xattrs=None)
    for d in range(0, directories, 7):  # changes all over the tree: replaced, gone, new
        (upper / f"d{d:03d}/l000").unlink()
        (upper / f"d{d:03d}/l000").write_bytes(b"now a file")
        (upper / f"d{d:03d}/l001").unlink()
        (upper / f"d{d:03d}/new").write_bytes(b"")
    repo = Path(__file__).resolve().parent.parent
    argv = [sys.executable, "-c", _MEMORY_SCRIPT, str(upper), str(scratch / "before.idx"), str(scratch / "after.idx")]
    done = subprocess.run(argv, capture_output=True, text=True, check=False, cwd=repo)
    assert done.returncode == 0, done.stderr
    before, peak, written, seconds = done.stdout.split()
    before_kib, peak_kib, size = int(before), int(peak), int(written)
    mib = f"{peak_kib / 1024:.1f} MiB ({before_kib / 1024:.1f} MiB after imports)"
    print(f"peak RSS {mib}, delta of {size} bytes in {float(seconds):.1f} s")
    assert peak_kib < 100 * 1024, f"peak RSS {peak_kib} KiB"
    assert size > 58 * 3 * 512
    assert sum(1 for _ in read_index(scratch / "after.idx")) == directories * (links + 1)


def _never(path: bytes) -> bool:
    return False


def _members(tar: bytes) -> dict[str, bytes | None]:
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        return {m.name: t.extractfile(m).read() if m.isreg() else None for m in t}  # type: ignore[union-attr]

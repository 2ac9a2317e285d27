"""Issue 11, class 4: directory trees as deep as the kernel allows are packed, with a bounded number of open fds.

Python 3.11's os.walk recurses (RecursionError near 1,000 levels), path strings stop at PATH_MAX, and a walk that
keeps one fd per level meets EMFILE: the walks over container content (walk.walk_metadata for fingerprints and
size estimates, walk.walk_entries for the tar, tarsplit's _LayerFiles) use none of those. The chains are built with
mkdir relative to directory fds, as a path string would hit ENAMETOOLONG.
"""

import hashlib
import io
import json
import os
import stat
import subprocess
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pipeline.demo import build_sample_storage
from pipeline.errors import LayerError, SourceChanged
from pipeline.layer import walk
from pipeline.layer.tarsplit import write_layer_from_tarsplit
from pipeline.layer.writer import MAX_DIR_FDS, scan_layer, write_layer
from tests.support.cli import commit_args, run_luigi
from tests.support.tarsplit_records import disassemble, write_tar_split

NOFILE = 64  # the commit's whole open-files limit: luigi and Python need about a dozen fds of it


MakeChain = Callable[..., None]


@pytest.fixture
def make_chain() -> Iterator[MakeChain]:
    """_make_chain, and every chain made removed afterwards: pytest's own clean-up (shutil.rmtree, recursive) would
    fail on them with RecursionError in a later session."""
    made: list[Path] = []

    def make(top: Path, depth: int, *, name: bytes = b"d", files: tuple[bytes, ...] = ()) -> None:
        made.append(top / os.fsdecode(name))
        _make_chain(top, depth, name=name, files=files)

    yield make
    for chain in made:
        if chain.exists():
            remove_tree(chain)


@pytest.fixture
def scratch(tmp_path: Path) -> Iterator[Path]:
    """A directory for storage holding deep trees: as root, a tmpfs of its own, unmounted afterwards (on a disk
    mounted with discard, as here, creating and deleting 5,000 nested directories takes seconds each way);
    otherwise a plain directory."""
    path = tmp_path / "scratch"
    path.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=1g,mode=0755", "pipeline-test", str(path)]
    mounted = os.geteuid() == 0 and subprocess.run(mount, capture_output=True).returncode == 0
    yield path
    if mounted:
        subprocess.run(["umount", str(path)], check=True)


def remove_tree(path: Path) -> None:
    """rm -rf at any depth: a loop, one directory fd at a time (a child opened by name, the parent as "..")."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(path, flags)
    names: list[str] = []
    try:
        while True:
            subdir = None
            for name in os.listdir(fd):
                if stat.S_ISDIR(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode):
                    subdir = name
                else:
                    os.unlink(name, dir_fd=fd)
            if subdir is None and not names:
                break
            child = os.open(subdir if subdir is not None else "..", flags, dir_fd=fd)
            os.close(fd)
            fd = child
            if subdir is not None:
                names.append(subdir)
            else:
                os.rmdir(names.pop(), dir_fd=fd)
    finally:
        os.close(fd)
    path.rmdir()


def _make_chain(top: Path, depth: int, *, name: bytes = b"d", files: tuple[bytes, ...] = ()) -> None:
    """depth nested directories name/name/... under top, with files (content: their level) at every level and
    a file "deepest" at the bottom; each made relative to its parent's fd, never by path."""
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for level in range(depth + 1):
            for file_name in files if level < depth else (b"deepest",):
                out = os.open(file_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=fd)
                os.write(out, b"%d\n" % level)
                os.close(out)
            if level < depth:
                os.mkdir(name, dir_fd=fd)
                child = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
                os.close(fd)
                fd = child
    finally:
        os.close(fd)


def _layer_members(archive: Path) -> dict[str, bytes | None]:
    """The container layer's members in the archive: name -> content (None for all but regular files)."""
    with tarfile.open(archive) as outer:
        manifest = json.loads(outer.extractfile("manifest.json").read())  # type: ignore[union-attr]
        blob = outer.extractfile(manifest[0]["Layers"][-1])
        assert blob is not None
        with tarfile.open(fileobj=io.BytesIO(blob.read())) as tar:
            return {m.name: tar.extractfile(m).read() if m.isreg() else None for m in tar}  # type: ignore[union-attr]


@pytest.mark.parametrize("depth", [1_000, 5_000])
def test_deep_chain_in_a_container_commits_under_a_small_fd_limit(
    scratch: Path, make_chain: MakeChain, depth: int
) -> None:
    root = scratch / "storage"
    cid = build_sample_storage(root)
    make_chain(root / "overlay2" / cid / "diff", depth)
    archive = scratch / "image.tar"
    # run_luigi also fingerprints the storage, this chain included, before and after.
    result = run_luigi(*commit_args(root, scratch, "--id", cid, "--output", str(archive)), nofile=NOFILE)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _layer_members(archive)["d/" * depth + "deepest"] == b"%d\n" % depth


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class _FdCountingSink(io.BytesIO):
    """Keeps what is written and the most fds this process had open at any write."""

    def __init__(self) -> None:
        super().__init__()
        self.most_fds = _fds()

    def write(self, data: object) -> int:
        self.most_fds = max(self.most_fds, _fds())
        return super().write(data)  # type: ignore[arg-type]


BRANCHING_DEPTH = MAX_DIR_FDS * 6


@pytest.fixture
def branching(tmp_path: Path, make_chain: MakeChain) -> Path:
    """Levels well past MAX_DIR_FDS, with a file before and after the subdirectory at each level: packing "z" of a
    level more than MAX_DIR_FDS above the bottom needs that level's fd after the walk climbed back to it."""
    top = tmp_path / "branching"
    top.mkdir()
    make_chain(top, BRANCHING_DEPTH, files=(b"a", b"z"))
    return top


def test_branching_deep_tree_is_packed_in_order_with_bounded_fds(branching: Path) -> None:
    before = _fds()
    sink = _FdCountingSink()
    write_layer(branching, sink)
    # The root, MAX_DIR_FDS directories, a file being read, a directory being listed (listdir dups its fd).
    assert sink.most_fds <= before + MAX_DIR_FDS + 3
    with tarfile.open(fileobj=io.BytesIO(sink.getvalue())) as tar:
        members = {m.name: tar.extractfile(m).read() if m.isreg() else None for m in tar}  # type: ignore[union-attr]
    expected: dict[str, bytes | None] = {}
    for level in range(BRANCHING_DEPTH):
        prefix = "d/" * level
        expected |= {prefix + "a": b"%d\n" % level, prefix + "d": None, prefix + "z": b"%d\n" % level}
    expected["d/" * BRANCHING_DEPTH + "deepest"] = b"%d\n" % BRANCHING_DEPTH
    assert members == expected
    assert list(members) == sorted(members, key=lambda n: n.encode() + (b"/" if members[n] is None else b""))


def _os_walk_fingerprint(layer_dir: Path) -> tuple[str, int, int]:
    """scan_layer as it was, with os.walk (fine at this depth)."""
    digest = hashlib.sha256()
    entries = file_bytes = 0
    for dirpath, dirnames, filenames in os.walk(os.fsencode(layer_dir)):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            digest.update(
                b"%s\0%d %d %d %d %d\n" % (path, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_mode)
            )
            entries += 1
            file_bytes += st.st_size if stat.S_ISREG(st.st_mode) else 0
    return "sha256:" + digest.hexdigest(), entries, file_bytes


def test_fingerprints_are_those_os_walk_gave(branching: Path) -> None:
    # Cache records and snapshot records are keyed by fingerprints: a new walk must not change them.
    (branching / "d" / "link").symlink_to("../a")
    os.mkfifo(branching / "fifo")
    scan = scan_layer(branching)
    assert (scan.fingerprint, scan.entries, scan.file_bytes) == _os_walk_fingerprint(branching)


def test_ancestor_moved_while_the_walk_is_below_it_is_a_source_change(tmp_path: Path, make_chain: MakeChain) -> None:
    top = tmp_path / "layer"
    top.mkdir()
    make_chain(top, MAX_DIR_FDS * 3, files=(b"a", b"z"))
    (top / "elsewhere").mkdir()
    files_packed = 0

    def move_an_ancestor(_done: int) -> None:
        # Once the deepest file is packed (after every level's "a"), level 2 goes elsewhere: climbing back to
        # level 1, whose fd was closed, finds another parent through "..".
        nonlocal files_packed
        files_packed += 1
        if files_packed == MAX_DIR_FDS * 3 + 1:
            os.rename(top / "d" / "d", top / "elsewhere" / "d")

    with pytest.raises(SourceChanged, match=r"replaced or moved while the layer was packed"):
        write_layer(top, io.BytesIO(), progress=move_an_ancestor)
    assert files_packed > MAX_DIR_FDS * 3 + 1  # the walk went on, and climbed as far as it could


def test_path_longer_than_loaders_read_is_refused_naming_it(
    tmp_path: Path, make_chain: MakeChain, monkeypatch: pytest.MonkeyPatch
) -> None:
    top = tmp_path / "layer"
    top.mkdir()
    make_chain(top, 40, name=b"n" * 255)
    monkeypatch.setattr(walk, "MAX_TAR_NAME", 8192)  # the real one, 256 KiB, takes ~1,000 such levels
    with pytest.raises(LayerError, match=r"a path of \d+ bytes, longer than image loaders read") as caught:
        write_layer(top, io.BytesIO())
    assert str(caught.value).startswith(f"{top}/{'n' * 100}")


def test_deep_layer_is_reassembled_from_tar_split_with_bounded_fds(branching: Path, tmp_path: Path) -> None:
    out = io.BytesIO()
    write_layer(branching, out)
    tar = out.getvalue()
    records = write_tar_split(tmp_path / "records.gz", disassemble(tar))
    before = _fds()
    sink = _FdCountingSink()
    write_layer_from_tarsplit(branching, records, sink)
    assert sink.getvalue() == tar
    # The root, MAX_DIR_FDS directories, the file being read, the records file.
    assert sink.most_fds <= before + MAX_DIR_FDS + 3

"""Snapshots into the snapshot store (`--format store`, SnapshotAll's default; issue 13) through the real command
line. Containers are changed through the kernel's overlay merged view between runs; each changed container's snapshot
must be its previous snapshot's layers plus one delta layer (full again every [snapshot] full_every deltas, or when
its image or settings changed), and every snapshot in the store, read back by umoci, skopeo, podman and docker, must
equal the merged view recorded at its run. Also: retention in the middle of a chain, runs killed while the store is
written, containers that cannot be snapshotted, and runs in which nothing changed.

PIPELINE_STORE_EXAMPLES sets the examples of the random chain (default 2), PIPELINE_STORE_SHRINK=1 lets hypothesis
shrink a failing one; PIPELINE_STORE_KILL_SWEEP=1 kills a run at every atomic write, rerunning after each, rather than
stopping once the index.json write that adds the delta snapshot has been hit.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, note, settings
from hypothesis import strategies as st

from pipeline.snapshots.catalog import SnapshotRecord, read_record, read_records
from pipeline.snapshots.store import REF_NAME
from tests.support.cli import REPO, error_lines, run_luigi
from tests.support.dockerd import Dockerd
from tests.support.fleet import add_container
from tests.support.imagecheck import check_image_archive, compare_trees, podman_command
from tests.support.overlay_storage import (
    BASE_LAYER_ID,
    MID_LAYER_ID,
    TreeView,
    build_rocker_storage,
    container_id_for,
    overlay_mount,
    read_tree,
    stat_tree,
)

pytestmark = [pytest.mark.overlay, pytest.mark.tools("skopeo", "umoci")]

Completed = subprocess.CompletedProcess[str]

WEB, DB = "web-1", "db-1"  # web-1: build_rocker_storage's rich container; db-1 shares its image
FIRST_STAMP = datetime(2026, 11, 30, 0, 0)
_EXAMPLES = int(os.environ.get("PIPELINE_STORE_EXAMPLES", "2"))
_KILL_SWEEP = os.environ.get("PIPELINE_STORE_KILL_SWEEP", "") not in ("", "0")
# Shrinking a failing chain re-runs it dozens of times (minutes); the notes already list every change of every run.
_PHASES = [p for p in Phase if p != Phase.shrink or os.environ.get("PIPELINE_STORE_SHRINK", "") not in ("", "0")]
TOTALS = re.compile(
    r"snapshot (?P<stamp>\S+): (?P<containers>\d+) container\(s\) \((?P<new>\d+) new, (?P<unchanged>\d+) unchanged\),"
    r" (?P<bytes>\d+) new bytes written"
)
# What one changed entry may add to a delta besides its data: its tar header and PAX records (long names, xattrs),
# and the headers of the directories above it that the change touched or copied up.
ENTRY_OVERHEAD = 16 << 10
# Per snapshot: the config and manifest blobs, and the tar's end-of-archive blocks.
SNAPSHOT_OVERHEAD = 16 << 10


def stamp_of(number: int) -> str:
    """The number-th snapshot stamp: one hour apart, so each run is its own period."""
    return (FIRST_STAMP + timedelta(hours=number)).strftime("%Y-%m-%dT%H%M")


# --- storage, runs and the store --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pristine:
    """web-1 and db-1 on one two-layer image, and each one's merged view as built."""

    root: Path
    views: dict[str, TreeView]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Pristine:
    root = tmp_path_factory.mktemp("pristine") / "rocker"
    web = build_rocker_storage(root, name=WEB)
    db = add_container(root, DB, {"srv/db/data.sql": b"create table t (x int);\n"}, delete=("etc/app.conf",))
    for name in (WEB, DB):
        settle(root, name)
    return Pristine(root, {WEB: web.merged, DB: db})


def copy_storage(pristine: Pristine, dest: Path) -> Path:
    """A private copy of the pristine storage (cp -a keeps whiteout devices and trusted.* xattrs)."""
    subprocess.run(["cp", "-a", str(pristine.root), str(dest)], check=True)
    return dest


def settle(root: Path, name: str) -> None:
    """Mount and unmount the container once. A whiteout the kernel made in a mount is a hardlink of a shared one in
    the work dir, which the next mount removes: that changes the whiteout's link count and ctime, so the container
    would look changed to a snapshot taken before its next mount
    (test_a_container_only_mounted_again_since_its_snapshot_is_unchanged)."""
    with changing(root, name):
        pass


@contextlib.contextmanager
def changing(root: Path, name: str) -> Iterator[Path]:
    """The container's merged view, mounted by the kernel over its layer's diff/ as its engine would mount it."""
    layer = root / "overlay2" / container_id_for(name)
    lowers = [root / "overlay2" / MID_LAYER_ID / "diff", root / "overlay2" / BASE_LAYER_ID / "diff"]
    with overlay_mount(lowers, layer / "diff", layer / "work", layer / "merged") as merged:
        yield merged


def snapshot_all(root: Path, work: Path, stamp: str, *extra: str, env: dict[str, str] | None = None) -> Completed:
    """`luigi --module pipeline SnapshotAll` as a user types it, the format left at its default (the store)."""
    args = ["SnapshotAll", "--snapshot", stamp, "--storage-root", str(root)]
    args += ["--commit-output-dir", str(work / "out"), "--commit-cache-dir", str(work / "cache"), *extra]
    return run_luigi(*args, env=env)


def succeeded(result: Completed) -> Completed:
    assert result.returncode == 0, result.stderr[-6000:]
    assert "Traceback" not in result.stderr, result.stderr[-6000:]
    return result


def totals(result: Completed) -> dict[str, str]:
    match = TOTALS.search(result.stderr)
    assert match, f"no totals line:\n{result.stderr[-3000:]}"
    return match.groupdict()


def store_index(out: Path) -> dict[str, str]:
    """index.json of the store under out, checked: an OCI index whose entries each carry a distinct reference;
    reference -> manifest digest, in index order."""
    index = json.loads((out / "store" / "index.json").read_bytes())
    assert index["schemaVersion"] == 2 and index["mediaType"] == "application/vnd.oci.image.index.v1+json"
    refs = [m["annotations"][REF_NAME] for m in index["manifests"]]
    assert len(refs) == len(set(refs)), f"a reference named twice: {refs}"
    return {m["annotations"][REF_NAME]: m["digest"] for m in index["manifests"]}


def blob_sizes(out: Path) -> dict[str, int]:
    blob_dir = out / "store" / "blobs" / "sha256"
    return {p.name: p.stat().st_size for p in blob_dir.iterdir()} if blob_dir.is_dir() else {}


def needed_blobs(out: Path) -> set[str]:
    """Every blob the store's index names, through manifests to configs and layers (hex digests)."""
    blob_dir = out / "store" / "blobs" / "sha256"
    needed = set()
    for digest in set(store_index(out).values()):
        needed.add(digest.removeprefix("sha256:"))
        manifest = json.loads((blob_dir / digest.removeprefix("sha256:")).read_bytes())
        needed |= {d["digest"].removeprefix("sha256:") for d in [manifest["config"], *manifest["layers"]]}
    return needed


def partial_files(*dirs: Path) -> list[Path]:
    return sorted(p for d in dirs if d.exists() for p in d.rglob("*") if ".partial-" in p.name)


def record(out: Path, name: str, stamp: str) -> SnapshotRecord:
    return read_record(out, container_id_for(name), stamp)


def run_tool(*argv: str, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, env=env, check=False, timeout=300)
    assert done.returncode == 0, f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}"
    return done.stdout


def umoci_view(store: Path, ref: str, work: Path) -> TreeView:
    """The snapshot unpacked by umoci straight from the store."""
    bundle = Path(tempfile.mkdtemp(prefix="bundle-", dir=work)) / "b"
    run_tool("umoci", "unpack", "--image", f"{store}:{ref}", str(bundle))
    try:
        return read_tree(bundle / "rootfs")
    finally:
        shutil.rmtree(bundle.parent)


def skopeo_umoci_view(store: Path, ref: str, work: Path) -> TreeView:
    """The snapshot copied out of the store by skopeo into a layout of its own, then unpacked by umoci."""
    scratch = Path(tempfile.mkdtemp(prefix="copy-", dir=work))
    try:
        run_tool("skopeo", "--insecure-policy", "copy", "--quiet", f"oci:{store}:{ref}", f"oci:{scratch / 'oci'}:x")
        run_tool("umoci", "unpack", "--image", f"{scratch / 'oci'}:x", str(scratch / "bundle"))
        return read_tree(scratch / "bundle" / "rootfs")
    finally:
        shutil.rmtree(scratch)


def check_every_snapshot(out: Path, views: dict[str, TreeView], work: Path) -> None:
    """The store holds exactly the snapshots of views, and each (unpacked once per image) equals its view."""
    index = store_index(out)
    assert sorted(index) == sorted(views)
    by_image: dict[str, list[str]] = {}
    for ref, digest in index.items():
        by_image.setdefault(digest, []).append(ref)
    for refs in by_image.values():
        unpacked = umoci_view(out / "store", refs[0], work)
        for ref in refs:
            compare_trees(views[ref], unpacked, label=f"umoci unpack --image store:{ref}")


# --- changes through the merged view ----------------------------------------------------------------------------------

# Lower files hardlinked to each other: a copy-up (write, chmod, setfattr) breaks the link, yet overlay still reports
# the lower inode number for the copy, so the merged view would show two different files as one inode.
LOWER_HARDLINKED = {b"data/hello.txt", b"data/hello-hardlink.txt", b"usr/lib/libx.so.1", b"usr/lib/libx-hardlink.so.1"}
# umoci unpack resolves the image's User ("0:0") through rootfs/etc/passwd and etc/group to write the bundle's
# config.json, and fails when one is a directory or etc is not a directory: these keep their kind.
KEEP_KIND = {b"etc", b"etc/passwd", b"etc/group"}
SMALL = 64 << 10  # files rewritten, linked or chmod'ed stay this small, so a delta's size bound stays tight
NEW_NAMES = [b"new", b"-early", b"zz", "é".encode(), b"bad-\xfe", b".hidden", b"long-" + b"n" * 120]
MODES = [0o600, 0o644, 0o755, 0o700, 0o4755, 0o1777, 0o000]


def lower_paths(root: Path) -> set[bytes]:
    """Every path the image layers hold (whiteouts included): a merged path among them may be a lower file."""
    paths = set()
    for layer in (BASE_LAYER_ID, MID_LAYER_ID):
        paths |= set(stat_tree(root / "overlay2" / layer / "diff"))
    return paths


def remove(path: bytes) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def write(path: bytes, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def rewrite_in_place(path: bytes) -> None:
    """New content of the same length, and the old mtime put back: only ctime tells."""
    before = os.lstat(path)
    with open(path, "r+b") as f:
        old = f.read()
        f.seek(0)
        f.write(bytes((b + 1) % 256 for b in old))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.lstat(path)
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)


def fresh(data: st.DataObject, parent: bytes, tree: dict[bytes, os.stat_result]) -> bytes:
    name = data.draw(st.sampled_from(NEW_NAMES), label="name")
    path = os.path.join(parent, name) if parent else name
    while path in tree:
        path += b"_"
    return path


def change(data: st.DataObject, merged: Path, lower: set[bytes]) -> int:
    """One change through the merged view, of a kind and at a path hypothesis draws; the most data it may add to a
    delta layer."""
    tree = stat_tree(merged)
    base = os.fsencode(merged)

    def size(p: bytes) -> int:
        return tree[p].st_size

    regular = [p for p, s in tree.items() if stat.S_ISREG(s.st_mode)]
    small = [p for p in regular if size(p) <= SMALL and p not in LOWER_HARDLINKED]
    own = [p for p in small if p not in lower]
    dirs = [p for p, s in tree.items() if stat.S_ISDIR(s.st_mode)]
    symlinks = [p for p, s in tree.items() if stat.S_ISLNK(s.st_mode)]
    non_dirs = [p for p, s in tree.items() if not stat.S_ISDIR(s.st_mode)]
    choices = {
        "add file": [b"", *dirs],
        "rewrite in place, size and mtime restored": [p for p in small if size(p) > 0],
        "delete": non_dirs,
        "rm -rf and mkdir": dirs,
        "to directory": [p for p in non_dirs if p not in KEEP_KIND],
        "to file": [p for p in dirs + symlinks if p not in KEEP_KIND],
        "to symlink": [p for p in tree if p not in symlinks and p not in KEEP_KIND],
        "hardlink": own,
        "unlink a hardlink": [p for p in own if tree[p].st_nlink > 1],
        "setfattr user.*": small + dirs,
        "chmod": small + dirs,
    }
    kind = data.draw(st.sampled_from([k for k, paths in choices.items() if paths]), label="change")
    rel = data.draw(st.sampled_from(sorted(choices[kind])), label="path")
    path = os.path.join(base, rel) if rel else base
    note(f"{kind}: {rel!r}")
    if kind == "add file":
        content = data.draw(st.binary(max_size=200), label="content")
        write(os.path.join(base, fresh(data, rel, tree)), content)
        return len(content)
    if kind.startswith("rewrite"):
        rewrite_in_place(path)
        return size(rel)
    if kind == "delete":
        os.unlink(path)
    elif kind == "rm -rf and mkdir":
        remove(path)
        os.mkdir(path)
        write(os.path.join(path, b"recreated"), b"recreated\n")
    elif kind == "to directory":
        remove(path)
        os.mkdir(path)
        write(os.path.join(path, b"was-not-a-directory"), b"")
    elif kind == "to file":
        remove(path)
        write(path, b"was a directory or a symlink\n")
    elif kind == "to symlink":
        remove(path)
        os.symlink(data.draw(st.sampled_from([b"busybox", b"../etc/passwd", b"/bin/busybox", b"nowhere"])), path)
    elif kind == "hardlink":
        parent = data.draw(st.sampled_from(sorted([b"", *dirs])), label="into")
        os.link(path, os.path.join(base, fresh(data, parent, tree)))
        return size(rel)
    elif kind == "unlink a hardlink":
        os.unlink(path)
        return size(rel)  # the other names' inode changed: written whole
    elif kind == "setfattr user.*":
        value = data.draw(st.binary(min_size=1, max_size=40), label="value")  # Go's tar drops empty PAX values
        os.setxattr(path, data.draw(st.sampled_from(["user.a", "user.b"]), label="xattr"), value)
        return size(rel) if rel in regular else 0
    else:
        os.chmod(path, data.draw(st.sampled_from(MODES), label="mode"))
        return size(rel) if rel in regular else 0
    return 0


# --- a: a random chain of snapshots -----------------------------------------------------------------------------------


def check_chain_step(out: Path, stamp: str, previous: SnapshotRecord | None, full_every: int) -> SnapshotRecord:
    """web-1's record of stamp extends previous by one delta layer, or is full again after full_every deltas."""
    now = record(out, WEB, stamp)
    assert now.status == "new" and now.format == "store"
    if previous is None or previous.deltas == full_every:
        assert now.deltas == 0, f"{stamp}: expected a full snapshot, got {now.deltas} deltas"
        assert len(now.diff_ids) == 3  # the image's two layers and the container's own, whole
        return now
    assert now.deltas == previous.deltas + 1, f"{stamp}: {previous.deltas} deltas before, now {now.deltas}"
    assert now.diff_ids[: len(previous.diff_ids)] == previous.diff_ids, "a delta must keep every earlier layer"
    assert len(now.diff_ids) - len(previous.diff_ids) in (0, 1)  # an empty delta adds no layer
    return now


@settings(
    deadline=None,
    max_examples=_EXAMPLES,
    phases=_PHASES,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_every_snapshot_of_a_random_chain_equals_the_merged_view_of_its_run(
    pristine: Pristine, data: st.DataObject
) -> None:
    full_every = 3
    with tempfile.TemporaryDirectory(prefix="store-chain-") as tmp:
        work = Path(tmp)
        root = copy_storage(pristine, work / "rocker")
        lower = lower_paths(root)
        views = {f"{name}:{stamp_of(0)}": view for name, view in pristine.views.items()}
        succeeded(snapshot_all(root, work, stamp_of(0), "--schedule-full-every", str(full_every)))
        previous = check_chain_step(work / "out", stamp_of(0), None, full_every)
        runs = data.draw(st.integers(12, 14), label="runs")
        for number in range(1, runs):
            stamp = stamp_of(number)
            note(f"run {number} ({stamp})")
            bound = SNAPSHOT_OVERHEAD
            with changing(root, WEB) as merged:
                for _ in range(data.draw(st.integers(1, 3), label="changes")):
                    bound += change(data, merged, lower) + ENTRY_OVERHEAD
                views[f"{WEB}:{stamp}"] = read_tree(merged)
            db_changes = data.draw(st.booleans(), label="db-1 changes")
            with changing(root, DB) as merged:
                if db_changes:
                    write(os.fsencode(merged / "srv/db/data.sql"), f"insert {number};\n".encode())
                views[f"{DB}:{stamp}"] = read_tree(merged)
            blobs = blob_sizes(work / "out")

            result = succeeded(snapshot_all(root, work, stamp, "--schedule-full-every", str(full_every)))

            previous = check_chain_step(work / "out", stamp, previous, full_every)
            db = record(work / "out", DB, stamp)
            assert db.status == ("new" if db_changes else "reused"), db
            assert totals(result)["new"] == str(1 + db_changes)
            index = store_index(work / "out")
            if not db_changes:  # one more index entry for the same image
                assert index[f"{DB}:{stamp}"] == index[f"{DB}:{stamp_of(number - 1)}"]
            grown = {k: v for k, v in blob_sizes(work / "out").items() if k not in blobs}
            if previous.deltas:  # a delta stores about what changed, not the container's whole layer again
                bound += SNAPSHOT_OVERHEAD if db_changes else 0
                assert sum(grown.values()) <= bound, f"{stamp}: {sum(grown.values())} new bytes, at most {bound}"
            if number in (4, 9):  # read back now, before later runs add to the chain
                ref = f"{WEB}:{stamp}"
                compare_trees(views[ref], skopeo_umoci_view(work / "out" / "store", ref, work), label=f"skopeo {ref}")
        check_every_snapshot(work / "out", views, work)
        assert needed_blobs(work / "out") == set(blob_sizes(work / "out")), "the store holds blobs nothing names"
        assert partial_files(work / "out", work / "cache") == []


# --- a scripted chain: every kind of change once, full_every = 3 from a config file -----------------------------------


@dataclass
class Chain:
    """A store filled run by run from one storage: each run's merged views, results and stored bytes."""

    root: Path
    work: Path
    views: dict[str, TreeView] = field(default_factory=dict)  # "<name>:<stamp>" -> merged view at that run
    results: dict[str, Completed] = field(default_factory=dict)  # stamp -> the run
    grown: dict[str, int] = field(default_factory=dict)  # stamp -> bytes of the store's new blob files

    @property
    def out(self) -> Path:
        return self.work / "out"

    @property
    def store(self) -> Path:
        return self.work / "out" / "store"

    def run(self, number: int, env: dict[str, str] | None = None, *extra: str) -> str:
        """Record both containers' merged views (a mount, as a restart would), then snapshot them."""
        stamp = stamp_of(number)
        for name in (WEB, DB):
            with changing(self.root, name) as merged:
                self.views[f"{name}:{stamp}"] = read_tree(merged)
        before = blob_sizes(self.out)
        self.results[stamp] = succeeded(snapshot_all(self.root, self.work, stamp, *extra, env=env))
        self.grown[stamp] = sum(v for k, v in blob_sizes(self.out).items() if k not in before)
        return stamp


SCRIPT = [  # what each run changes through web-1's merged view; the bytes of data it writes; web-1's deltas after
    ("nothing: the first snapshot, full", 0, 0),
    ("a lower file deleted (a whiteout), a file added", 40, 1),
    ("rm -rf and mkdir over a lower directory (opaque)", 40, 2),
    ("file -> directory, directory -> file, file -> symlink, symlink -> directory", 80, 3),
    ("a hardlink gained, a hardlinked file rewritten with its size and mtime restored (full: full_every)", 20, 0),
    ("a hardlink lost, an xattr-only change", 20, 1),
    ("mode-only changes, on a lower file and on its own; a lower file rewritten, size and mtime restored", 2000, 2),
    ("nothing, in either container", 0, 2),
    ("a file added after the cache's entry indexes were damaged (full: no index to start from)", 100, 0),
]
DB_CHANGED, NOTHING, DAMAGED = 6, 7, 8  # the runs in which db-1 changes, nothing does, web-1's indexes are damaged


def change_web(merged: Path, step: int) -> None:
    if step == 1:
        (merged / "etc/passwd").unlink()
        (merged / "srv/added.txt").write_bytes(b"added in the second snapshot\n")
    elif step == 2:
        shutil.rmtree(merged / "lib")
        (merged / "lib").mkdir()
        (merged / "lib/only.so").write_bytes(b"the only library left\n")
    elif step == 3:
        (merged / "etc/app.conf").unlink()
        (merged / "etc/app.conf").mkdir()
        (merged / "etc/app.conf/part.conf").write_bytes(b"setting=3\n")
        shutil.rmtree(merged / "opt/app/lib")
        (merged / "opt/app/lib").write_bytes(b"a file now\n")
        (merged / "srv/tagged.txt").unlink()
        (merged / "srv/tagged.txt").symlink_to("www/index.html")
        (merged / "bin/sh").unlink()
        (merged / "bin/sh").mkdir()
        (merged / "bin/sh/inside").write_bytes(b"")
    elif step == 4:
        os.link(merged / "srv/empty.txt", merged / "srv/empty-link.txt")
        rewrite_in_place(os.fsencode(merged / "srv/www/index.html"))  # linked with index-hardlink.html
    elif step == 5:
        (merged / "srv/www/index-hardlink.html").unlink()
        os.setxattr(merged / "home/user", "user.note", b"xattr only")
    elif step == 6:
        os.chmod(merged / "bin/busybox", 0o700)  # a lower file: copied up for its mode alone
        os.chmod(merged / "srv/empty.txt", 0o600)
        rewrite_in_place(os.fsencode(merged / "usr/share/zoneinfo/UTC"))
    elif step == DAMAGED:
        (merged / "srv/after-damage.txt").write_bytes(b"written after the cache's indexes were damaged\n")


@pytest.fixture(scope="module")
def chain(pristine: Pristine, tmp_path_factory: pytest.TempPathFactory) -> Chain:
    """web-1 through SCRIPT, [snapshot] full_every = 3 from a LUIGI_CONFIG_PATH file; db-1 changed in run DB_CHANGED
    (its first delta) and its settings in run DAMAGED (full again); the last run with --schedule-full-every 10."""
    work = tmp_path_factory.mktemp("chain")
    chain = Chain(copy_storage(pristine, work / "rocker"), work)
    config = work / "full-every-3.cfg"
    config.write_text("[snapshot]\nfull_every = 3\n")
    env = {"LUIGI_CONFIG_PATH": str(config)}
    for step in range(len(SCRIPT)):
        with changing(chain.root, WEB) as merged:
            change_web(merged, step)
        extra: tuple[str, ...] = ()
        if step == DB_CHANGED:
            with changing(chain.root, DB) as merged:
                (merged / "srv/db/data.sql").write_bytes(b"create table t (x int, y int);\n")
        if step == DAMAGED:
            db_config = chain.root / "containers" / container_id_for(DB) / "config.json"
            doc = json.loads(db_config.read_text())
            doc["Config"]["Env"].append("ADDED=after the first snapshots")
            db_config.write_text(json.dumps(doc))
            for index in (work / "cache").rglob("*.idx"):
                index.write_bytes(b"\0" * 64)  # damaged: no delta can start from it
            # The flag beats the config file: web-1's 2 deltas could become 3 either way; 10 leaves no doubt.
            extra = ("--schedule-full-every", "10")
        chain.run(step, env, *extra)
    return chain


def test_every_snapshot_of_the_scripted_chain_equals_its_merged_view(chain: Chain, tmp_path: Path) -> None:
    check_every_snapshot(chain.out, chain.views, tmp_path)
    assert needed_blobs(chain.out) == set(blob_sizes(chain.out))
    ref = f"{WEB}:{stamp_of(3)}"
    compare_trees(chain.views[ref], skopeo_umoci_view(chain.store, ref, tmp_path), label=f"skopeo copy {ref}")


def test_each_changed_run_adds_one_delta_and_full_every_starts_the_chain_again(chain: Chain) -> None:
    web = [record(chain.out, WEB, stamp_of(n)) for n in range(len(SCRIPT))]
    assert [r.deltas for r in web] == [deltas for _, _, deltas in SCRIPT]
    assert [r.status for r in web] == ["reused" if n == NOTHING else "new" for n in range(len(SCRIPT))]
    for before, after in zip(web, web[1:], strict=False):
        if after.status == "new" and after.deltas:
            assert after.diff_ids[:-1] == before.diff_ids and len(after.diff_ids) == len(before.diff_ids) + 1
    assert len(web[3].diff_ids) == 6  # base, mid, the full container layer and three deltas
    db = [record(chain.out, DB, stamp_of(n)) for n in range(len(SCRIPT))]
    assert [r.deltas for r in db] == [0] * DB_CHANGED + [1, 1, 0]  # a delta, then full: its settings changed
    assert [r.status for r in db] == ["new"] + ["reused"] * (DB_CHANGED - 1) + ["new", "reused", "new"]


def test_a_delta_stores_about_the_change_not_the_whole_layer(chain: Chain) -> None:
    full = record(chain.out, WEB, stamp_of(0)).layer_sizes[-1]
    assert full > 10 << 20  # web-1's own layer: 3 MiB of random data and an 8 MiB sparse file
    for number, (what, data, deltas) in enumerate(SCRIPT):
        if deltas and number != NOTHING:
            bound = data + 4 * ENTRY_OVERHEAD + SNAPSHOT_OVERHEAD * (2 if number == DB_CHANGED else 1)
            assert chain.grown[stamp_of(number)] <= bound, f"{what}: {chain.grown[stamp_of(number)]} bytes stored"
    assert chain.grown[stamp_of(4)] > full  # full again: the whole layer is stored once more


def test_a_run_with_nothing_changed_adds_only_index_entries(chain: Chain) -> None:
    stamp, earlier = stamp_of(NOTHING), stamp_of(NOTHING - 1)
    assert chain.grown[stamp] == 0
    result = chain.results[stamp]
    assert totals(result) == {"stamp": stamp, "containers": "2", "new": "0", "unchanged": "2", "bytes": "0"}
    index = store_index(chain.out)
    for name in (WEB, DB):
        assert index[f"{name}:{stamp}"] == index[f"{name}:{earlier}"]
        assert record(chain.out, name, stamp).status == "reused"
    assert " packed " not in result.stderr


def test_changed_settings_or_a_damaged_entry_index_give_a_full_snapshot_equal_to_the_merged_view(
    chain: Chain, tmp_path: Path
) -> None:
    stamp = stamp_of(DAMAGED)
    config = json.loads(run_tool("skopeo", "inspect", "--config", f"oci:{chain.store}:{DB}:{stamp}"))
    assert "ADDED=after the first snapshots" in config["config"]["Env"]
    assert "packing the container's layer whole" in chain.results[stamp].stderr
    ref = f"{WEB}:{stamp}"
    compare_trees(chain.views[ref], umoci_view(chain.store, ref, tmp_path), label=ref)


def test_the_totals_count_about_what_the_run_wrote(chain: Chain) -> None:
    stamp = stamp_of(DB_CHANGED)  # two small deltas
    written = int(totals(chain.results[stamp])["bytes"])
    index_size = (chain.store / "index.json").stat().st_size
    assert written <= chain.grown[stamp] + index_size + 1024, (written, chain.grown[stamp])


def test_podman_pulls_a_delta_snapshot_straight_from_the_store(chain: Chain, tmp_path: Path) -> None:
    ref = f"{WEB}:{stamp_of(5)}"  # a hardlink lost and an xattr-only change, on a full layer
    assert record(chain.out, WEB, stamp_of(5)).deltas == 1
    podman, env, runroot = podman_command(tmp_path.resolve())
    try:
        image_id = run_tool(*podman, "pull", "--quiet", f"oci:{chain.store}:{ref}", env=env).strip()
        mounted = Path(run_tool(*podman, "image", "mount", image_id, env=env).strip())
        compare_trees(chain.views[ref], read_tree(mounted), label=f"podman pull oci:store:{ref}")
        run_tool(*podman, "image", "unmount", image_id, env=env)
    finally:
        subprocess.run([*podman, "rmi", "--all", "--force"], capture_output=True, env=env, check=False)
        shutil.rmtree(runroot, ignore_errors=True)


def export(store: Path, ref: str, output: Path, *extra: str) -> Completed:
    command = [sys.executable, "-m", "pipeline", "export", ref, "-o", str(output), "--store", str(store), *extra]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False, timeout=120)


@pytest.mark.tools("skopeo", "umoci", "podman")
def test_an_exported_delta_snapshot_is_an_archive_every_tool_reads_as_the_merged_view(
    chain: Chain, tmp_path: Path
) -> None:
    stamp = stamp_of(3)  # three deltas: a whiteout, an opaque directory, and files turned into other kinds
    ref = f"{WEB}:{stamp}"
    both, oci = tmp_path / "both.tar", tmp_path / "oci.tar"
    done = export(chain.store, ref, both)
    assert done.returncode == 0, done.stderr
    check_image_archive(both, chain.views[ref], tmp_path / "as-docker-archive", ref=ref)
    done = export(chain.store, ref, oci, "--format", "oci")
    assert done.returncode == 0, done.stderr
    inspected = json.loads(run_tool("skopeo", "inspect", f"oci-archive:{oci}"))
    stored = json.loads(run_tool("skopeo", "inspect", f"oci:{chain.store}:{ref}"))
    assert inspected["Layers"] == stored["Layers"] and len(inspected["Layers"]) == 6
    assert inspected["Digest"] == stored["Digest"]  # the same manifest, byte for byte


def test_export_of_a_snapshot_the_store_lacks_is_one_error_line_naming_what_it_holds(
    chain: Chain, tmp_path: Path
) -> None:
    output = tmp_path / "missing.tar"
    done = export(chain.store, f"{WEB}:1999-01-01T0000", output)
    assert done.returncode == 1 and not output.exists()
    [line] = [line for line in done.stderr.splitlines() if line.startswith("ERROR: ")]
    assert done.stderr.strip() == line and f"{WEB}:{stamp_of(DAMAGED)}" in line


@pytest.mark.docker
def test_docker_loads_an_exported_delta_snapshot_as_the_merged_view(
    chain: Chain, dockerd: Dockerd, tmp_path: Path
) -> None:
    from tests.test_docker_engine import DOCKER_INJECTED, DOCKER_MOUNT_POINTS, export_view

    stamp = stamp_of(3)
    ref = f"{WEB}:{stamp}"
    archive = tmp_path / "web.tar"
    assert export(chain.store, ref, archive).returncode == 0
    assert f"Loaded image: {ref}" in dockerd.run("load", "--input", str(archive))
    container = f"store-delta-{stamp.lower()}"
    try:
        dockerd.run("create", "--network", "none", "--name", container, ref)
        [image] = json.loads(dockerd.run("image", "inspect", ref))
        assert image["RootFS"]["Layers"] == list(record(chain.out, WEB, stamp).diff_ids)
        loaded = export_view(dockerd, container, tmp_path / "export")
    finally:
        dockerd.attempt("rm", "--force", container)
        dockerd.attempt("rmi", ref)

    # docker export leaves out user.* xattrs, and what docker adds to every container.
    def docker_sees(path: bytes) -> bool:
        return path not in DOCKER_INJECTED and path.split(b"/")[0] not in DOCKER_MOUNT_POINTS

    view = chain.views[ref]
    expected = TreeView(
        entries={
            p: replace(e, xattrs=tuple(x for x in e.xattrs if not x[0].startswith("user.")))
            for p, e in view.entries.items()
            if docker_sees(p)
        },
        hardlinks=frozenset(g for g in view.hardlinks if all(docker_sees(p) for p in g)),
    )
    compare_trees(expected, loaded, label=f"docker load + export of {ref}")


# --- b: retention in the middle of a chain ----------------------------------------------------------------------------


def test_retention_in_the_middle_of_a_chain_keeps_deltas_loadable_and_collects_only_unneeded_blobs(
    pristine: Pristine, tmp_path: Path
) -> None:
    chain = Chain(copy_storage(pristine, tmp_path / "rocker"), tmp_path)
    every = ("--schedule-full-every", "2")
    for number in range(5):  # web-1: full, delta, delta, full, delta
        with changing(chain.root, WEB) as merged:
            (merged / f"srv/run-{number}.txt").write_bytes(f"run {number}\n".encode())
            if number == 3:
                shutil.rmtree(merged / "opt/app")  # an opaque directory deleted, in the part of the chain pruned
        chain.run(number, None, *every)
    assert [record(chain.out, WEB, stamp_of(n)).deltas for n in range(5)] == [0, 1, 2, 0, 1]
    before_blobs, before_index = set(blob_sizes(chain.out)), store_index(chain.out)

    dry = chain.results[chain.run(5, None, *every, "--keep", "2", "--prune-dry-run")]
    assert "retention would keep" in dry.stdout, dry.stdout
    for number in range(4):
        for name in (WEB, DB):
            assert f"drop {name}:{stamp_of(number)} from the store" in dry.stdout, dry.stdout
    would_go = {Path(line.split(" ", 3)[-1]) for line in dry.stdout.splitlines() if line.startswith("  delete ")}
    blob_dir = chain.store / "blobs" / "sha256"
    assert len([p for p in would_go if p.parent == blob_dir]) == 3 + 2 * 4, dry.stdout
    assert all(p.exists() for p in would_go), "a dry run deleted something"
    assert set(blob_sizes(chain.out)) == before_blobs  # nothing changed since run 4: no blob written either
    assert before_index.items() <= store_index(chain.out).items()
    assert len(read_records(chain.out)) == 2 * 6

    with changing(chain.root, WEB) as merged:
        (merged / "srv/run-6.txt").write_bytes(b"the first snapshot after retention\n")
    chain.run(6, None, *every, "--keep", "2")

    kept = {f"{name}:{stamp_of(n)}" for name in (WEB, DB) for n in (5, 6)}
    assert set(store_index(chain.out)) == kept
    assert {f"{r.name}:{r.stamp}" for r in read_records(chain.out)} == kept
    newest = record(chain.out, WEB, stamp_of(6))
    assert newest.deltas == 2 and len(newest.diff_ids) == 5  # base, mid, run 3's full layer (pruned), 4's, its own
    assert set(blob_sizes(chain.out)) == needed_blobs(chain.out), "blobs no kept snapshot needs remain"
    gone = before_blobs - set(blob_sizes(chain.out))
    assert len(gone) == 3 + 2 * 4  # runs 0-2's own layers, the configs and manifests of runs 0-3
    for ref in sorted(kept):
        compare_trees(chain.views[ref], umoci_view(chain.store, ref, tmp_path), label=f"kept {ref}")


# --- c: a run killed while it writes ----------------------------------------------------------------------------------


def test_a_run_killed_at_any_atomic_write_leaves_a_readable_store_and_the_rerun_completes(
    pristine: Pristine, tmp_path: Path
) -> None:
    root = copy_storage(pristine, tmp_path / "rocker")
    work = tmp_path / "run"
    succeeded(snapshot_all(root, work, stamp_of(0)))
    with changing(root, WEB) as merged:
        (merged / "srv/www/index.html").write_bytes(b"<h1>changed</h1>\n")
        (merged / "etc/hostname").mkdir()  # over the lower file's whiteout: an opaque directory
        view = read_tree(merged)
    saved = tmp_path / "saved"
    saved.mkdir()
    for part in ("out", "cache"):
        subprocess.run(["cp", "-a", str(work / part), str(saved / part)], check=True)

    ref = f"{WEB}:{stamp_of(1)}"
    index_writes: list[set[str]] = []  # the references of each index.json a kill left half-replaced
    for number in range(1, 60):
        for part in ("out", "cache"):
            shutil.rmtree(work / part)
            subprocess.run(["cp", "-a", str(saved / part), str(work / part)], check=True)
        killed = snapshot_all(root, work, stamp_of(1), env={"PIPELINE_FAILPOINTS": f"atomic:before-rename@{number}"})
        if killed.returncode == 0:
            break  # past the run's last atomic write
        assert killed.returncode == -9, killed.stderr[-3000:]
        left = partial_files(work / "out", work / "cache")
        assert left, f"killed at atomic write {number} without a temporary file"
        pending = [p for p in left if p.name.startswith(".index.json.partial-")]
        for partial in pending:  # written whole and fsync'd, killed before its rename
            manifests = json.loads(partial.read_bytes())["manifests"]
            index_writes.append({m["annotations"][REF_NAME] for m in manifests})
        # Whatever the kill hit, the store's index names only whole images every tool reads.
        for stored in store_index(work / "out"):
            run_tool("skopeo", "inspect", "--raw", f"oci:{work / 'out' / 'store'}:{stored}")
        if not (pending or _KILL_SWEEP):
            continue
        rerun = succeeded(snapshot_all(root, work, stamp_of(1)))
        after = f"after a kill at atomic write {number} ({', '.join(p.name for p in left)})"
        assert totals(rerun)["stamp"] == stamp_of(1)
        assert partial_files(work / "out", work / "cache") == [], after
        assert {ref, f"{DB}:{stamp_of(1)}"} <= set(store_index(work / "out"))
        warnings = [line for line in rerun.stderr.splitlines() if " WARNING " in line]
        assert record(work / "out", WEB, stamp_of(1)).deltas == 1, f"{after}: full again: {warnings}"
        compare_trees(view, umoci_view(work / "out" / "store", ref, tmp_path), label=f"{ref} after kill {number}")
        if any(ref in refs for refs in index_writes) and not _KILL_SWEEP:
            break  # the index write that adds the delta snapshot was hit
    assert any(ref in refs for refs in index_writes), "no kill hit the index.json write adding the delta snapshot"


# --- d: one container that cannot be snapshotted ----------------------------------------------------------------------


FLEET = (WEB, DB, "api-1", "queue-1")


@pytest.mark.parametrize("damage", ["malformed config.json", "a file named like a whiteout"])
def test_a_container_that_cannot_be_snapshotted_fails_alone_and_the_rerun_takes_it(
    pristine: Pristine, tmp_path: Path, damage: str
) -> None:
    root = copy_storage(pristine, tmp_path / "rocker")
    views = dict(pristine.views)
    for name in FLEET[2:]:
        views[name] = add_container(root, name, {f"srv/{name}.txt": name.encode()})
    broken = "api-1"
    broken_id = container_id_for(broken)
    config = root / "containers" / broken_id / "config.json"
    original = config.read_bytes()
    if damage == "malformed config.json":
        config.write_bytes(original[: len(original) // 2])
    else:
        with changing(root, broken) as merged:
            (merged / "srv/.wh.evil").write_bytes(b"a container's own file, named like an OCI whiteout\n")
    out = tmp_path / "out"

    failed = snapshot_all(root, tmp_path, stamp_of(0))

    assert failed.returncode == 30, failed.stderr[-3000:]  # luigi.cfg's [retcode] task_failed
    assert "Traceback" not in failed.stderr, failed.stderr[-6000:]
    errors = error_lines(failed)
    assert errors and all(broken_id in line for line in errors), failed.stderr[-3000:]
    healthy = [name for name in FLEET if name != broken]
    assert sorted(r.name for r in read_records(out)) == sorted(healthy)
    assert set(store_index(out)) == {f"{name}:{stamp_of(0)}" for name in healthy}
    lines = (out / "catalog" / "catalog.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["name"] for line in lines) == sorted(healthy)
    prom = (out / "catalog" / "pipeline.prom").read_text()
    assert 'pipeline_snapshot_run_containers{status="failed"} 1' in prom, prom
    assert f'pipeline_snapshot_last_failure_timestamp_seconds{{container_id="{broken_id}"' in prom, prom

    if damage == "malformed config.json":
        config.write_bytes(original)
    else:
        with changing(root, broken) as merged:
            (merged / "srv/.wh.evil").unlink()
            views[broken] = read_tree(merged)
    again = succeeded(snapshot_all(root, tmp_path, stamp_of(0)))

    assert totals(again)["containers"] == str(len(FLEET))
    assert sorted(r.name for r in read_records(out)) == sorted(FLEET)
    assert len((out / "catalog" / "catalog.jsonl").read_text().splitlines()) == len(FLEET)
    prom = (out / "catalog" / "pipeline.prom").read_text()
    assert 'pipeline_snapshot_run_containers{status="failed"} 0' in prom, prom
    ref = f"{broken}:{stamp_of(0)}"
    compare_trees(views[broken], umoci_view(out / "store", ref, tmp_path), label=ref)


# --- containers whose names give one reference ------------------------------------------------------------------------


def test_containers_whose_names_differ_only_in_case_keep_their_own_snapshots(
    pristine: Pristine, tmp_path: Path
) -> None:
    root = copy_storage(pristine, tmp_path / "rocker")
    shutil.rmtree(root / "overlay2" / container_id_for(DB))
    shutil.rmtree(root / "containers" / container_id_for(DB))
    views = {WEB: pristine.views[WEB], "WEB-1": add_container(root, "WEB-1", {"srv/other.txt": b"the other one\n"})}
    succeeded(snapshot_all(root, tmp_path, stamp_of(0)))
    with changing(root, "WEB-1") as merged:
        (merged / "srv/added.txt").write_bytes(b"added\n")
        views["WEB-1"] = read_tree(merged)
    succeeded(snapshot_all(root, tmp_path, stamp_of(1)))
    out = tmp_path / "out"
    for name, view in views.items():
        ref = record(out, name, stamp_of(1)).reference
        compare_trees(view, umoci_view(out / "store", ref, tmp_path), label=f"{name} as {ref}")
    assert len(store_index(out)) == 4


def test_the_metrics_of_a_run_with_a_failed_container_count_every_snapshot_it_took(
    pristine: Pristine, tmp_path: Path
) -> None:
    root = copy_storage(pristine, tmp_path / "rocker")
    (root / "containers" / container_id_for(DB) / "config.json").write_text("{")
    failed = snapshot_all(root, tmp_path, stamp_of(0))
    assert failed.returncode == 30, failed.stderr[-3000:]
    assert record(tmp_path / "out", WEB, stamp_of(0)).status == "new"
    prom = (tmp_path / "out" / "catalog" / "pipeline.prom").read_text()
    assert 'pipeline_snapshot_run_containers{status="failed"} 1' in prom, prom
    assert 'pipeline_snapshot_run_containers{status="new"} 1' in prom, prom
    assert f'pipeline_snapshot_last_success_timestamp_seconds{{container_id="{container_id_for(WEB)}"' in prom, prom
    [written] = re.findall(r"^pipeline_snapshot_run_written_bytes (\S+)$", prom, re.MULTILINE)
    assert float(written) >= record(tmp_path / "out", WEB, stamp_of(0)).layer_sizes[-1], prom


def test_a_container_only_mounted_again_since_its_snapshot_is_unchanged(pristine: Pristine, tmp_path: Path) -> None:
    root = copy_storage(pristine, tmp_path / "rocker")
    with changing(root, WEB) as merged:
        (merged / "etc/passwd").unlink()  # a whiteout, linked to the kernel's shared one in the work dir
    succeeded(snapshot_all(root, tmp_path, stamp_of(0)))
    settle(root, WEB)  # the container restarted: nothing in it changed
    again = succeeded(snapshot_all(root, tmp_path, stamp_of(1)))
    assert totals(again)["unchanged"] == "2", again.stderr[-2000:]
    assert record(tmp_path / "out", WEB, stamp_of(1)).status == "reused"


def test_export_refuses_to_write_over_the_store_it_reads(chain: Chain, tmp_path: Path) -> None:
    store = tmp_path / "store"
    shutil.copytree(chain.store, store)
    index = (store / "index.json").read_bytes()
    done = export(store, f"{WEB}:{stamp_of(3)}", store / "index.json")
    assert (store / "index.json").read_bytes() == index
    assert done.returncode == 1 and [done.stderr.strip()] == error_lines(done), done.stderr


def test_a_snapshot_whose_previous_one_lost_a_layer_blob_is_taken_full(pristine: Pristine, tmp_path: Path) -> None:
    root = copy_storage(pristine, tmp_path / "rocker")
    out = tmp_path / "out"
    succeeded(snapshot_all(root, tmp_path, stamp_of(0)))
    lost = record(out, WEB, stamp_of(0)).diff_ids[-1]  # uncompressed: the blob's digest is its diff_id
    (out / "store" / "blobs" / "sha256" / lost.removeprefix("sha256:")).unlink()
    with changing(root, WEB) as merged:
        (merged / "srv/after-loss.txt").write_bytes(b"written after the store lost a blob\n")
        view = read_tree(merged)
    for stamp in (stamp_of(1), stamp_of(2)):  # and the run after: it must not stay stuck on the lost blob
        result = snapshot_all(root, tmp_path, stamp)
        assert result.returncode == 0, error_lines(result)
    assert record(out, WEB, stamp_of(1)).deltas == 0
    ref = f"{WEB}:{stamp_of(1)}"
    compare_trees(view, umoci_view(out / "store", ref, tmp_path), label=ref)


def test_a_snapshot_redone_after_its_record_was_lost_is_still_a_delta(pristine: Pristine, tmp_path: Path) -> None:
    root = copy_storage(pristine, tmp_path / "rocker")
    out = tmp_path / "out"
    succeeded(snapshot_all(root, tmp_path, stamp_of(0)))
    with changing(root, WEB) as merged:
        (merged / "srv/small.txt").write_bytes(b"a small change\n")
    succeeded(snapshot_all(root, tmp_path, stamp_of(1)))
    assert record(out, WEB, stamp_of(1)).deltas == 1
    # As a run killed after the store took the snapshot and before its record was written leaves it.
    (out / "catalog" / "records" / container_id_for(WEB) / f"{stamp_of(1)}.json").unlink()
    for summary in (out / "catalog" / "runs").glob(f"{stamp_of(1)}-*.json"):
        summary.unlink()
    blobs = blob_sizes(out)
    succeeded(snapshot_all(root, tmp_path, stamp_of(1)))
    assert record(out, WEB, stamp_of(1)).deltas == 1
    assert sum(v for k, v in blob_sizes(out).items() if k not in blobs) <= SNAPSHOT_OVERHEAD

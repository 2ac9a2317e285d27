"""Measures snapshotting a fleet of containers on one image: the original's commit per container vs SnapshotAll.

The storage: commit_benchmark's two-layer image (base ~300 MB in ~11,000 files, middle ~120 MB, both x --scale,
built by common.build_image_layers) and --containers containers on top, each with its own small change (a 1 MB
file, 50 small files and one whiteout deleting a base file; the same at every scale).

Compared, all in the same run, on a warm page cache, each after a sync so no method pays for another's writeback:

- "original (made loadable)": the seed's method (seed/commit.go) once per container, nothing shared: GNU
  `tar -cf` of every layer of the container, `sha256sum` of each layer tar, a minimal config and manifest.json
  (as in commit_benchmark), a final `tar -cf`, and its temporary directory removed. Each container's archive is
  deleted after it is measured (outside the timing) to bound disk use.
- "ours cold": `luigi --module pipeline SnapshotAll --workers N` with empty output and cache dirs.
- "ours unchanged": SnapshotAll again with a new --snapshot stamp and nothing changed. It must write no archive
  or layer bytes; if it does, the files are listed and the script exits 1.
- "ours 1 changed" (unless --skip-changed): one container gets a new file, then SnapshotAll with a third stamp.
  The file is removed afterwards.

SnapshotAll's output and cache dirs are removed at the end (unless --keep-outputs or it misbehaved); the logs
stay in <workdir>/run/logs.

"archive+layer bytes" are the bytes of the files created or rewritten (new inode, size, mtime or ctime) under
OUT/snapshots and CACHE/blobs for ours, and of the layer tars and final archives for the original; "other bytes"
is everything else written (catalog records, layer records, config/manifest JSON). Peak RSS is the largest
ru_maxrss of any one process of the method, read through GNU time as in common.run_child; luigi's
worker processes are forked from it and waited for, so they are included. Below the table: SnapshotAll's own
summary line of each run, and a note where the catalog's packed_layers disagree with the pack tasks luigi ran.

Targets (from the issue): ours cold per container <= 0.1x the original's per container; ours unchanged < 3 s in
total with 0 new archive/layer bytes; ours peak RSS < 150 MiB. A missed target is marked MISSED and the exit code
stays 0; a failed or misbehaving SnapshotAll run (non-zero exit, wrong catalog records, bytes written when
nothing changed) exits 1 with the evidence.

Usage: .venv/bin/python benchmarks/snapshot_benchmark.py [--scale 1.0] [--containers 20] [--workers 2]
       [--json FILE] [--workdir DIR] [--skip-changed] [--keep-outputs]
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import random
import shutil
import stat
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import common
from common import MB, BenchmarkError

FORMAT_VERSION = 1  # bump when the generated fleet changes, so an old one is rebuilt
STAMP_COLD = "2026-11-28T0400"
STAMP_UNCHANGED = "2026-11-28T0500"
STAMP_CHANGED = "2026-11-28T0600"

ORIGINAL = "original (made loadable)"
OURS_COLD = "ours cold"
OURS_UNCHANGED = "ours unchanged"
OURS_CHANGED = "ours 1 changed"

COLD_MAX_RATIO = 0.1
UNCHANGED_MAX_SECONDS = 3.0
MAX_RSS_MIB = 150.0


# --------------------------------------------------------------------------------------------------------------
# Storage generation
# --------------------------------------------------------------------------------------------------------------


def fleet_ids(count: int) -> list[str]:
    """Fixed 64-hex container ids, the same on every machine and every run."""
    return [hashlib.sha256(f"snapshot-benchmark container {i}".encode()).hexdigest() for i in range(count)]


def build_fleet_layer(diff: Path, index: int) -> tuple[int, int]:
    """A 1 MB file, 50 small files and a whiteout deleting one of the base's WHITEOUT_DIR files. (files, bytes)"""
    rng = random.Random(1000 + index)
    app = diff / "var/lib/app"
    app.mkdir(parents=True)
    common.write_random_file(app / "data.bin", MB, rng)
    written = MB
    for i in range(50):
        written += common.write_small_file(diff / "home/app/cache" / f"f{i:02d}.dat", rng)
    # The image's base puts its first 100 small files in WHITEOUT_DIR as file00000.bin, file00001.bin, ...
    doc = diff / common.WHITEOUT_DIR
    doc.mkdir(parents=True)
    os.mknod(doc / f"file{index % 100:05d}.bin", stat.S_IFCHR | 0o000, os.makedev(0, 0))
    return 52, written


def ensure_fleet(workdir: Path, scale: float, count: int) -> Path:
    """The fleet's storage root under workdir: reused when complete, else (re)built; returns the root."""
    home = workdir / f"fleet-scale{scale:g}-n{count}"
    wanted: dict[str, object] = {
        "version": FORMAT_VERSION,
        "commit_benchmark_version": common.STORAGE_VERSION,
        "scale": scale,
        "n": count,
    }
    if common.reuse_built(home, wanted):
        return home / "root"
    print(f"storage: building {home / 'root'} at scale {scale:g} with {count} containers ...", flush=True)
    start = time.perf_counter()
    root = home / "root"
    files, written = common.build_image_layers(root, scale)
    for index, container_id in enumerate(fleet_ids(count)):
        layer = root / "overlay2" / container_id
        (layer / "diff").mkdir(parents=True)
        n, size = build_fleet_layer(layer / "diff", index)
        files += n
        written += size
        # rocker's order: bottom first
        (layer / "lower").write_text(f"{common.BASE_ID}/diff:{common.MID_ID}/diff")
        common.write_container_config(root, container_id, f"snap-bench-{index:02d}")
    common.mark_built(home, wanted, files, written, start)
    return root


def warm_page_cache(root: Path) -> None:
    """Read every file of the storage once, so neither method is the one that pays for the first read."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = os.path.join(dirpath, name)
            if os.path.isfile(path) and not os.path.islink(path):
                with open(path, "rb") as f:
                    while f.read(1 << 20):
                        pass


# --------------------------------------------------------------------------------------------------------------
# What a method wrote
# --------------------------------------------------------------------------------------------------------------

FileState = tuple[int, int, int, int]  # inode, size, mtime_ns, ctime_ns


def read_files(dirs: list[Path]) -> dict[str, FileState]:
    """Every regular file under dirs with what changes when it is written."""
    files: dict[str, FileState] = {}
    for directory in dirs:
        for dirpath, _, filenames in os.walk(directory):
            for name in filenames:
                path = os.path.join(dirpath, name)
                st = os.lstat(path)
                if stat.S_ISREG(st.st_mode):
                    files[path] = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    return files


@dataclass(frozen=True)
class Writes:
    """Files created or rewritten between two read_files() calls, and their bytes."""

    files: list[tuple[str, int]]
    removed: int

    @property
    def bytes(self) -> int:
        return sum(size for _, size in self.files)


def find_writes(before: dict[str, FileState], after: dict[str, FileState]) -> Writes:
    """New or rewritten files; a new hardlink to data already counted (oci-dir's cached layers) adds no bytes."""
    changed: list[tuple[str, int]] = []
    seen_inodes = {state[0] for state in before.values()}
    for path, state in sorted(after.items()):
        if before.get(path) == state:
            continue
        changed.append((path, 0 if state[0] in seen_inodes else state[1]))
        seen_inodes.add(state[0])
    return Writes(changed, sum(1 for path in before if path not in after))


# --------------------------------------------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Result:
    method: str
    containers: int
    total_s: float = 0.0
    per_container_s: float = 0.0
    ratio_to_original: float | None = None
    archive_layer_bytes: int = 0
    other_bytes: int = 0
    peak_rss_mib: float = 0.0
    missed: list[str] = field(default_factory=list)


def run_original(root: Path, ids: list[str], run_dir: Path) -> Result:
    """The seed's method for every container, one after another; the sum of the per-container times."""
    result = Result(ORIGINAL, len(ids))
    usage = common.Usage()
    out_dir = run_dir / "original"
    out_dir.mkdir()
    log = run_dir / "logs" / "original.log"
    for container_id in ids:
        out = out_dir / f"{container_id[:12]}.tar"
        # No sync between containers: the caller syncs once before the fleet, which is timed as one run.
        commit = functools.partial(common.original_commit, root, container_id, out, log, usage)
        sample, (archive_bytes, json_bytes) = common.measure(commit, sync=False)
        result.total_s += sample.seconds
        result.archive_layer_bytes += archive_bytes
        result.other_bytes += json_bytes
        out.unlink()
    result.peak_rss_mib = usage.maxrss_kib / 1024
    return result


@dataclass
class Ours:
    """Where SnapshotAll reads and writes in this run."""

    luigi: Path
    root: Path
    out: Path
    cache: Path
    logs: Path
    workers: int
    image_format: str

    def heavy_dirs(self) -> list[Path]:
        return [self.out / "snapshots", self.cache / "blobs"]

    def all_dirs(self) -> list[Path]:
        return [self.out, self.cache]


def run_snapshot_all(ours: Ours, method: str, stamp: str, count: int) -> tuple[Result, Writes]:
    """One timed SnapshotAll; returns the result row and the archive/layer files it wrote."""
    heavy_before, all_before = read_files(ours.heavy_dirs()), read_files(ours.all_dirs())
    argv = [
        str(ours.luigi),
        "--module",
        "pipeline",
        "SnapshotAll",
        "--snapshot",
        stamp,
        "--storage-root",
        str(ours.root),
        "--commit-output-dir",
        str(ours.out),
        "--commit-cache-dir",
        str(ours.cache),
        "--workers",
        str(ours.workers),
        "--format",
        ours.image_format,
        "--local-scheduler",
    ]
    usage = common.Usage()
    log = ours.logs / f"snapshot-{stamp}.log"
    sample, _ = common.measure(lambda: common.run_child(argv, usage, cwd=common.REPO_ROOT, log=log))
    heavy = find_writes(heavy_before, read_files(ours.heavy_dirs()))
    everything = find_writes(all_before, read_files(ours.all_dirs()))
    result = Result(
        method,
        count,
        total_s=sample.seconds,
        archive_layer_bytes=heavy.bytes,
        other_bytes=everything.bytes - heavy.bytes,
        peak_rss_mib=usage.maxrss_kib / 1024,
    )
    return result, heavy


# --------------------------------------------------------------------------------------------------------------
# Checks of SnapshotAll's catalog
# --------------------------------------------------------------------------------------------------------------


def read_run_records(out: Path, ids: list[str], stamp: str) -> tuple[list[dict[str, object]], list[str]]:
    """This stamp's catalog record of every container, and a problem line for each one missing."""
    records, problems = [], []
    for container_id in ids:
        path = out / "catalog" / "records" / container_id / f"{stamp}.json"
        try:
            records.append(json.loads(path.read_bytes()))
        except (OSError, ValueError) as e:
            problems.append(f"{stamp}: no readable catalog record {path} ({e})")
    return records, problems


def count_runs(log: Path, family: str) -> int:
    """How many times luigi ran a task of this family, from its "running   Family(...)" log lines."""
    return log.read_text(errors="replace").count(f"running   {family}(")


def check_run(out: Path, ids: list[str], stamp: str, *, new: set[str], image_packs: int, log: Path) -> list[str]:
    """Problems with one run: a record's status, a missing archive, layers packed other than expected."""
    records, problems = read_run_records(out, ids, stamp)
    for record in records:
        cid = str(record.get("container_id"))
        want = "new" if cid in new else "reused"
        if record.get("status") != want:
            problems.append(f"{stamp}: container {cid[:12]} has status {record.get('status')!r}, expected {want!r}")
        archive = Path(str(record.get("archive")))
        if not archive.exists():
            problems.append(f"{stamp}: container {cid[:12]}'s archive {archive} does not exist")
    for family, want_runs in (("PackImageLayer", image_packs), ("PackContainerLayer", len(new))):
        runs = count_runs(log, family)
        if runs != want_runs:
            problems.append(f"{stamp}: {log} shows {runs} {family} run(s), expected {want_runs}")
    return problems


def read_summary(log: Path, stamp: str) -> str:
    """SnapshotAll's closing line of totals ("snapshot STAMP: N container(s) ..."), or "" if absent."""
    lines = [line for line in log.read_text(errors="replace").splitlines() if f"snapshot {stamp}:" in line]
    return lines[-1][lines[-1].index(f"snapshot {stamp}:") :] if lines else ""


def check_archive(out: Path, container_id: str, stamp: str) -> list[str]:
    """skopeo inspect of one container's new archive, and its layer count (the image's two + its own)."""
    records, problems = read_run_records(out, [container_id], stamp)
    if problems:
        return problems
    archive = Path(str(records[0]["archive"]))
    try:
        if archive.is_dir():  # --format oci-dir: an OCI layout directory tagged with the stamp
            done = subprocess.run(
                ["skopeo", "inspect", f"oci:{archive}:{stamp}"], capture_output=True, text=True, check=False
            )
            if done.returncode != 0:
                raise BenchmarkError(f"skopeo inspect oci:{archive}:{stamp} failed: {done.stderr.strip()}")
            layers = json.loads(done.stdout)["Layers"]
        else:
            common.skopeo_check(archive)
            layers = common.archive_layers(archive)
    except (BenchmarkError, OSError, KeyError, ValueError) as e:
        return [f"{stamp}: {archive}: {e}"]
    return [] if len(layers) == 3 else [f"{stamp}: {archive} has {len(layers)} layers, expected 3"]


# --------------------------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------------------------


def apply_targets(results: list[Result]) -> None:
    for r in results:
        r.per_container_s = r.total_s / r.containers
    base = results[0].per_container_s  # the original's
    for r in results:
        r.ratio_to_original = r.per_container_s / base if base else None
        if r.method == ORIGINAL:
            continue
        if r.peak_rss_mib >= MAX_RSS_MIB:
            r.missed.append("peak_rss_mib")
        if r.method == OURS_COLD and (r.ratio_to_original is None or r.ratio_to_original > COLD_MAX_RATIO):
            r.missed.append("ratio_to_original")
        if r.method == OURS_UNCHANGED:
            if r.total_s >= UNCHANGED_MAX_SECONDS:
                r.missed.append("total_s")
            if r.archive_layer_bytes != 0:
                r.missed.append("archive_layer_bytes")


def format_bytes(n: int) -> str:
    if n == 0:
        return "0"
    return f"{n / 1000:.1f} kB" if n < MB else f"{n / MB:.1f} MB"


def mark(r: Result, value: str, name: str) -> str:
    return f"{value} MISSED" if name in r.missed else value


def print_table(results: list[Result]) -> None:
    columns = [
        ("method", -25),
        ("total s", 14),
        ("s/container", 11),
        ("x original", 16),
        ("archive+layer bytes", 26),
        ("other bytes", 11),
        ("peak RSS MiB", 19),
    ]
    rows = [
        [
            r.method,
            mark(r, f"{r.total_s:.2f}", "total_s"),
            f"{r.per_container_s:.3f}",
            mark(r, f"{r.ratio_to_original:.3f}" if r.ratio_to_original is not None else "-", "ratio_to_original"),
            mark(r, format_bytes(r.archive_layer_bytes), "archive_layer_bytes"),
            format_bytes(r.other_bytes),
            mark(r, f"{r.peak_rss_mib:.1f}", "peak_rss_mib"),
        ]
        for r in results
    ]
    common.print_table(columns, rows)


# --------------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = common.argument_parser(
        __doc__, "pipeline-snapshot-benchmark", "generated storage (reused), outputs and logs"
    )
    parser.add_argument("--scale", type=float, default=1.0, help="image size factor (1.0: ~420 MB in two layers)")
    parser.add_argument("--containers", type=int, default=20, help="containers on the shared image")
    parser.add_argument("--workers", type=int, default=2, help="luigi --workers for SnapshotAll")
    parser.add_argument(
        "--format",
        default="both",
        choices=["both", "docker", "oci", "oci-dir"],
        help="SnapshotAll --format: tar archives copy the shared layers into every snapshot; oci-dir hardlinks them",
    )
    parser.add_argument("--skip-changed", action="store_true", help="do not time the run with 1 container changed")
    parser.add_argument("--keep-outputs", action="store_true", help="keep SnapshotAll's output and cache dirs")
    args = parser.parse_args(argv)
    if args.scale <= 0 or args.containers < 1 or args.workers < 1:
        parser.error("--scale must be > 0, --containers and --workers >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    luigi = common.find_luigi(("tar", "sha256sum", "skopeo"))
    if luigi is None:
        return 2
    workdir: Path = args.workdir
    root = ensure_fleet(workdir, args.scale, args.containers)
    ids = fleet_ids(args.containers)

    run_dir = workdir / "run"
    (common.fresh_dir(run_dir) / "logs").mkdir()
    ours = Ours(luigi, root, run_dir / "out", run_dir / "cache", run_dir / "logs", args.workers, args.format)
    changed_file = root / "overlay2" / ids[0] / "diff" / "home/app/changed-by-benchmark.txt"
    changed_file.unlink(missing_ok=True)  # left by an interrupted earlier run

    results: list[Result] = []
    problems: list[str] = []
    notes: list[str] = []

    def time_ours(method: str, stamp: str, new: set[str], image_packs: int) -> Writes:
        """Time one SnapshotAll run and check what it did: its records, its pack tasks, one new archive."""
        print(f"timing: {method} ...", flush=True)
        result, writes = run_snapshot_all(ours, method, stamp, len(ids))
        results.append(result)
        log = ours.logs / f"snapshot-{stamp}.log"
        problems.extend(check_run(ours.out, ids, stamp, new=new, image_packs=image_packs, log=log))
        if new:
            problems.extend(check_archive(ours.out, sorted(new)[0], stamp))
        notes.append(f"{method}: {read_summary(log, stamp) or '(no summary line in ' + str(log) + ')'}")
        return writes

    try:
        print("warming the page cache ...", flush=True)
        warm_page_cache(root)
        os.sync()
        print(f"timing: {ORIGINAL} x {len(ids)} ...", flush=True)
        results.append(run_original(root, ids, run_dir))

        time_ours(OURS_COLD, STAMP_COLD, set(ids), image_packs=2)
        writes = time_ours(OURS_UNCHANGED, STAMP_UNCHANGED, set(), image_packs=0)
        if writes.files or writes.removed:
            problems.append(
                f"{STAMP_UNCHANGED}: nothing changed, yet {writes.bytes} archive/layer bytes were written in"
                f" {len(writes.files)} file(s), and {writes.removed} file(s) were removed, under"
                f" {ours.out / 'snapshots'} and {ours.cache / 'blobs'}:"
            )
            problems.extend(f"  {path} ({size} bytes)" for path, size in writes.files[:20])

        if not args.skip_changed:
            changed_file.write_text("changed by snapshot_benchmark\n")
            try:
                time_ours(OURS_CHANGED, STAMP_CHANGED, {ids[0]}, image_packs=0)
            finally:
                changed_file.unlink(missing_ok=True)
    except (BenchmarkError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        print(f"outputs and logs kept in {run_dir}", file=sys.stderr)
        return 1

    apply_targets(results)
    rss_source = common.peak_rss_source()
    print()
    print(
        f"scale {args.scale:g}, {len(ids)} containers, SnapshotAll --workers {args.workers}, {os.cpu_count()} CPUs,"
        f" storage {root}"
    )
    print(f"peak RSS read from: {rss_source}")
    print_table(results)
    print(
        f"targets: {OURS_COLD} x original <= {COLD_MAX_RATIO}; {OURS_UNCHANGED} total < {UNCHANGED_MAX_SECONDS:g} s"
        f" with 0 archive+layer bytes; ours peak RSS < {MAX_RSS_MIB:g} MiB"
    )
    for line in notes:
        print(line)
    if args.json:
        doc = {
            "scale": args.scale,
            "containers": len(ids),
            "workers": args.workers,
            "cpus": os.cpu_count(),
            "peak_rss_source": rss_source,
            "storage_root": str(root),
            "stamps": {OURS_COLD: STAMP_COLD, OURS_UNCHANGED: STAMP_UNCHANGED, OURS_CHANGED: STAMP_CHANGED},
            "targets": {
                "cold_max_ratio": COLD_MAX_RATIO,
                "unchanged_max_seconds": UNCHANGED_MAX_SECONDS,
                "max_rss_mib": MAX_RSS_MIB,
            },
            "results": [asdict(r) for r in results],
            "notes": notes,
            "problems": problems,
        }
        common.write_json(args.json, doc)
    if problems:
        print("\nSnapshotAll MISBEHAVED:", file=sys.stderr)
        for line in problems:
            print(f"  {line}", file=sys.stderr)
        print(f"outputs and logs kept in {run_dir}", file=sys.stderr)
        return 1
    if not args.keep_outputs:
        shutil.rmtree(ours.out, ignore_errors=True)  # ~ one image per container; the logs stay in run/logs
        shutil.rmtree(ours.cache, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

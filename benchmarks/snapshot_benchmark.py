"""Measures snapshotting a fleet of containers on one image: the original's commit per container vs SnapshotAll in
each --format (the snapshot store, the default; standalone archives; OCI layout directories), cold, unchanged and
with one container changed.

The storage: commit_benchmark's two-layer image (base ~300 MB in ~11,000 files, middle ~120 MB, both x --scale,
built by common.build_image_layers) and --containers containers on top, each with its own small change (a 1 MB
file, 50 small files and one whiteout deleting a base file; the same at every scale).

Compared in the same run, on a warm page cache, over --repeat rounds in alternating order (original, then each
--formats entry; the next round reversed), every timed run after a sync so that none pays for another's writeback;
medians are reported with the min-max spread of the total time:

- "original (made loadable)": the seed's method (seed/commit.go) once per container, nothing shared: GNU
  `tar -cf` of every layer of the container, `sha256sum` of each layer tar, a minimal config and manifest.json
  (as in commit_benchmark), a final `tar -cf`, and its temporary directory removed. Each container's archive is
  deleted after it is measured (outside the timing) to bound disk use. One sync before the fleet, none between
  its containers. --original-containers K times it on the first K containers only (its per-container time is
  what the ratios use).
- "F cold": `pipeline-run SnapshotAll --format F --workers N` (luigi's command line with --module pipeline, as the
  systemd unit runs it) with empty output and cache dirs.
- "F unchanged": SnapshotAll again with the next period's stamp and nothing changed. It must write no layer or
  archive bytes; if it does, the files are listed and the script exits 1.
- "F 1 changed" (unless --skip-changed): one container gets a new file, then SnapshotAll with a third stamp (in
  the store: one delta layer on its previous snapshot). The file is removed afterwards.

Columns: "total s" and its "spread" (min-max over the rounds); "x original", the per-container time against the
original's; "disk writes", write_bytes of the whole process tree (/proc/self/io, common.measure: what the run sent
or will send to storage); "new blob bytes", the bytes of files created or rewritten under the store's blobs/,
snapshots/ and the cache's blobs/ (a hardlink to data already counted adds nothing), or the original's layer tars
and archives; "other bytes", the rest of the files written (index.json, catalog, records, JSON); "tasks run", from
luigi's execution summary; peak RSS, the largest ru_maxrss of any one process of the method, read through GNU
time as in common.run_child (luigi's worker processes included).

A second table gives the disk use after the cold run: du of the output dir (for the store format, <out>/store),
of the cache, and of both together (a blob hardlinked from the cache into the store or an oci-dir counted once),
against one copy of the image's layers plus each container's own layer (the layer sizes of the catalog records).

Targets (issue 13, the store format): cold <= 0.05x the original per container (moonshot 0.03x); unchanged < 1 s
in total with 0 new blob bytes. The other formats keep the earlier targets: cold <= 0.1x, unchanged < 3 s with 0
new blob bytes. Every run: peak RSS < 150 MiB. Each is printed met or MISSED and the exit code stays 0; a failed
or misbehaving SnapshotAll run (non-zero exit, wrong catalog records or luigi tasks, an image skopeo refuses,
blob bytes written when nothing changed) exits 1 with the evidence.

SnapshotAll's output and cache dirs are removed after each round (unless --keep-outputs keeps the last round's);
the logs stay in <workdir>/run/logs.

Usage: .venv/bin/python benchmarks/snapshot_benchmark.py [--scale 1.0] [--containers 20] [--workers 2]
       [--repeat 3] [--formats store,both,oci-dir] [--original-containers K] [--skip-changed] [--keep-outputs]
       [--json FILE] [--workdir DIR]
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
from common import MB, BenchmarkError, SnapshotPlace

FORMAT_VERSION = 1  # bump when the generated fleet changes, so an old one is rebuilt
STAMP_COLD = "2026-11-28T0400"
STAMP_UNCHANGED = "2026-11-28T0500"
STAMP_CHANGED = "2026-11-28T0600"
FORMATS = ("store", "both", "docker", "oci", "oci-dir")

ORIGINAL = "original (made loadable)"
COLD, UNCHANGED, CHANGED = "cold", "unchanged", "1 changed"


@dataclass(frozen=True)
class Targets:
    cold_max_ratio: float
    unchanged_max_seconds: float
    cold_moonshot_ratio: float | None = None


STORE_TARGETS = Targets(cold_max_ratio=0.05, unchanged_max_seconds=1.0, cold_moonshot_ratio=0.03)
ARCHIVE_TARGETS = Targets(cold_max_ratio=0.1, unchanged_max_seconds=3.0)
MAX_RSS_MIB = 150.0


def targets_of(image_format: str) -> Targets:
    return STORE_TARGETS if image_format == "store" else ARCHIVE_TARGETS


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
# Measurements
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Measured:
    """One timed run of a method."""

    seconds: float
    disk_writes: int  # write_bytes of the process tree
    blob_bytes: int
    other_bytes: int
    tasks_run: int | None  # luigi's count; None for the original
    peak_rss_mib: float


@dataclass
class Row:
    """Every sample of one method (one line of the table), its medians and the targets it met or missed."""

    method: str
    image_format: str  # "" for the original
    kind: str  # COLD, UNCHANGED, CHANGED, or "" for the original
    containers: int  # what the time is divided by
    samples: list[Measured] = field(default_factory=list)
    ratio_to_original: float | None = None
    verdicts: list[tuple[str, bool]] = field(default_factory=list)  # (target, met)

    def median(self, name: str) -> float:
        return common.median(float(getattr(s, name)) for s in self.samples)

    @property
    def per_container_s(self) -> float:
        return self.median("seconds") / self.containers

    def missed(self, name: str) -> bool:
        return any(name in target and not ok for target, ok in self.verdicts)


@dataclass(frozen=True)
class DiskUse:
    """du after a cold run, and what one copy of the image plus each container's own layer would take."""

    output: int
    cache: int
    together: int
    image_layers: int
    container_layers: int

    @property
    def expected(self) -> int:
        return self.image_layers + self.container_layers


def run_original(root: Path, ids: list[str], run_dir: Path, log: Path) -> Measured:
    """The seed's method for every container, one after another; sums of the per-container samples."""
    usage = common.Usage()
    out_dir = common.fresh_dir(run_dir / "original")
    seconds = 0.0
    disk_writes = blob_bytes = other_bytes = 0
    os.sync()  # once before the fleet, which is timed as one run
    for container_id in ids:
        out = out_dir / f"{container_id[:12]}.tar"
        commit = functools.partial(common.original_commit, root, container_id, out, log, usage)
        sample, (archive_bytes, json_bytes) = common.measure(commit, sync=False)
        seconds += sample.seconds
        disk_writes += sample.write_bytes
        blob_bytes += archive_bytes
        other_bytes += json_bytes
        out.unlink()
    return Measured(seconds, disk_writes, blob_bytes, other_bytes, None, usage.maxrss_kib / 1024)


def time_snapshot_all(place: SnapshotPlace, stamp: str, log: Path) -> tuple[Measured, common.Writes]:
    """One timed SnapshotAll; the measurement and the layer/archive files it wrote."""
    blobs_before, all_before = common.read_files(place.blob_dirs()), common.read_files([place.out, place.cache])
    sample, usage, summary = common.run_snapshot_all(place, stamp, log)
    blobs = common.find_writes(blobs_before, common.read_files(place.blob_dirs()))
    everything = common.find_writes(all_before, common.read_files([place.out, place.cache]))
    measured = Measured(
        sample.seconds,
        sample.write_bytes,
        blobs.bytes,
        everything.bytes - blobs.bytes,
        summary.ran,
        usage.maxrss_kib / 1024,
    )
    return measured, blobs


def measure_disk_use(place: SnapshotPlace, ids: list[str], stamp: str) -> DiskUse:
    """du of the output (the store alone for --format store) and the cache, against the catalog's layer sizes."""
    output = place.store if place.image_format == "store" else place.out / "snapshots"
    image_layers = container_layers = 0
    for index, container_id in enumerate(ids):
        sizes = common.record_layer_sizes(common.read_catalog_record(place.out, container_id, stamp))
        if index == 0:
            image_layers = sum(sizes[:-1])
        container_layers += sizes[-1]
    return DiskUse(
        common.disk_usage([output]),
        common.disk_usage([place.cache]),
        common.disk_usage([output, place.cache]),
        image_layers,
        container_layers,
    )


# --------------------------------------------------------------------------------------------------------------
# Checks of SnapshotAll's catalog, luigi's tasks and the images
# --------------------------------------------------------------------------------------------------------------


def check_run(
    place: SnapshotPlace, ids: list[str], stamp: str, *, new: set[str], image_packs: int, log: Path
) -> list[str]:
    """Problems with one run: a record's status, a missing archive, tasks run other than expected."""
    problems = []
    for container_id in ids:
        try:
            record = common.read_catalog_record(place.out, container_id, stamp)
        except BenchmarkError as e:
            problems.append(str(e))
            continue
        want = "new" if container_id in new else "reused"
        if record.get("status") != want:
            problems.append(f"{stamp}: container {container_id[:12]} has status {record.get('status')!r}, not {want!r}")
        if not Path(str(record.get("archive"))).exists():
            problems.append(f"{stamp}: container {container_id[:12]}'s archive {record.get('archive')} is missing")
    # The store packs a changed container's own layer inside its SnapshotContainer; the archive formats pack it as
    # a PackContainerLayer task. The unchanged containers of a run are one ReuseSnapshots task.
    # A store snapshot's task that packed its own layer before the image layers were packed is handed back to the
    # scheduler and runs again (a luigi dynamic dependency): luigi counts both runs.
    reused = 1 if len(new) < len(ids) else 0
    expected: dict[str, tuple[int, int]] = {
        "PackImageLayer": (image_packs, image_packs),
        "ReuseSnapshots": (reused, reused),
    }
    if place.image_format == "store":
        expected["SnapshotContainer"] = (len(new), 2 * len(new))
    else:
        expected["PackContainerLayer"] = (len(new), len(new))
    ran = common.read_luigi_summary(log).ran_by_family
    for family, (least, most) in expected.items():
        if not least <= ran.get(family, 0) <= most:
            want = least if least == most else f"{least} to {most}"
            problems.append(f"{stamp}: {log} shows {ran.get(family, 0)} {family} run(s), expected {want}")
    return problems


def check_image(place: SnapshotPlace, container_id: str, stamp: str, layers: int) -> list[str]:
    """skopeo inspect of one container's new snapshot, and its layer count."""
    try:
        record = common.read_catalog_record(place.out, container_id, stamp)
        archive = Path(str(record["archive"]))
        if place.image_format == "store":
            source = f"oci:{archive}:{record['reference']}"
        elif archive.is_dir():  # --format oci-dir: an OCI layout directory tagged with the stamp
            source = f"oci:{archive}:{stamp}"
        else:
            source = f"docker-archive:{archive}"
        done = subprocess.run(["skopeo", "inspect", source], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise BenchmarkError(f"skopeo inspect {source} failed: {done.stderr.strip()}")
        found = len(json.loads(done.stdout)["Layers"])
    except (BenchmarkError, OSError, KeyError, ValueError) as e:
        return [f"{stamp}: {e}"]
    return [] if found == layers else [f"{stamp}: {source} has {found} layers, expected {layers}"]


def read_summary(log: Path, stamp: str) -> str:
    """SnapshotAll's closing line of totals ("snapshot STAMP: N container(s) ..."), or "" if absent."""
    lines = [line for line in log.read_text(errors="replace").splitlines() if f"snapshot {stamp}:" in line]
    return lines[-1][lines[-1].index(f"snapshot {stamp}:") :] if lines else ""


# --------------------------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------------------------


def apply_targets(rows: list[Row]) -> None:
    base = rows[0].per_container_s  # the original's
    for row in rows:
        row.ratio_to_original = row.per_container_s / base if base else None
        if not row.image_format:
            continue
        targets = targets_of(row.image_format)
        row.verdicts.append((f"peak RSS < {MAX_RSS_MIB:g} MiB", row.median("peak_rss_mib") < MAX_RSS_MIB))
        ratio = row.ratio_to_original
        if row.kind == COLD:
            row.verdicts.append(
                (f"x original <= {targets.cold_max_ratio}", ratio is not None and ratio <= targets.cold_max_ratio)
            )
            if targets.cold_moonshot_ratio is not None:
                moonshot = ratio is not None and ratio <= targets.cold_moonshot_ratio
                row.verdicts.append((f"x original <= {targets.cold_moonshot_ratio} (moonshot)", moonshot))
        if row.kind == UNCHANGED:
            seconds = row.median("seconds")
            row.verdicts.append(
                (f"total s < {targets.unchanged_max_seconds:g}", seconds < targets.unchanged_max_seconds)
            )
            row.verdicts.append(("new blob bytes = 0", all(s.blob_bytes == 0 for s in row.samples)))


def print_table(rows: list[Row]) -> None:
    columns = [
        ("method", -25),
        ("total s", 14),
        ("spread", 11),
        ("s/container", 11),
        ("x original", 16),
        ("disk writes", 11),
        ("new blob bytes", 21),
        ("other bytes", 11),
        ("tasks run", 9),
        ("peak RSS MiB", 19),
    ]

    def mark(row: Row, value: str, name: str) -> str:
        return f"{value} MISSED" if row.missed(name) else value

    table = [
        [
            row.method,
            mark(row, f"{row.median('seconds'):.2f}", "total s"),
            common.spread(s.seconds for s in row.samples),
            f"{row.per_container_s:.3f}",
            mark(row, f"{row.ratio_to_original:.3f}" if row.ratio_to_original is not None else "-", "x original <="),
            common.format_bytes(row.median("disk_writes")),
            mark(row, common.format_bytes(row.median("blob_bytes")), "new blob bytes"),
            common.format_bytes(row.median("other_bytes")),
            "-" if row.samples[0].tasks_run is None else f"{row.median('tasks_run'):.0f}",
            mark(row, f"{row.median('peak_rss_mib'):.1f}", "peak RSS"),
        ]
        for row in rows
    ]
    common.print_table(columns, table)


def print_disk_use(uses: dict[str, list[DiskUse]], containers: int) -> None:
    columns = [
        ("after the cold run", -18),
        ("output du", 10),
        ("cache du", 10),
        ("together du", 11),
        (f"image + {containers} own layers", 22),
        ("output x that", 13),
        ("together x that", 15),
    ]
    table = []
    for image_format, samples in uses.items():
        use = samples[len(samples) // 2]
        expected = use.expected or 1
        table.append(
            [
                image_format + (" (<out>/store)" if image_format == "store" else ""),
                common.format_bytes(use.output),
                common.format_bytes(use.cache),
                common.format_bytes(use.together),
                f"{common.format_bytes(use.image_layers)} + {common.format_bytes(use.container_layers)}",
                f"{use.output / expected:.2f}",
                f"{use.together / expected:.2f}",
            ]
        )
    common.print_table(columns, table)


# --------------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = common.argument_parser(
        __doc__, "pipeline-snapshot-benchmark", "generated storage (reused), outputs and logs", repeat="method"
    )
    parser.add_argument("--scale", type=float, default=1.0, help="image size factor (1.0: ~420 MB in two layers)")
    parser.add_argument("--containers", type=int, default=20, help="containers on the shared image")
    parser.add_argument("--workers", type=int, default=2, help="luigi --workers for SnapshotAll")
    parser.add_argument(
        "--formats",
        default="store,both,oci-dir",
        help="comma-separated SnapshotAll --format values to time (store: one shared OCI layout; both/docker/oci:"
        " a tar per snapshot, copying the shared layers; oci-dir: a layout per snapshot, hardlinking them)",
    )
    parser.add_argument(
        "--original-containers",
        type=int,
        default=0,
        help="time the original on the first K containers only (default: all); its per-container time is compared",
    )
    parser.add_argument("--skip-changed", action="store_true", help="do not time the run with 1 container changed")
    parser.add_argument("--keep-outputs", action="store_true", help="keep the last round's output and cache dirs")
    args = parser.parse_args(argv)
    args.formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    if args.scale <= 0 or args.containers < 1 or args.workers < 1 or args.repeat < 1:
        parser.error("--scale must be > 0, --containers, --workers and --repeat >= 1")
    if not args.formats or any(f not in FORMATS for f in args.formats) or len(set(args.formats)) != len(args.formats):
        parser.error(f"--formats: distinct values among {', '.join(FORMATS)}")
    if args.original_containers < 0:
        parser.error("--original-containers must be >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    luigi = common.find_luigi(("tar", "sha256sum", "skopeo"))
    if luigi is None:
        return 2
    workdir: Path = args.workdir
    root = ensure_fleet(workdir, args.scale, args.containers)
    ids = fleet_ids(args.containers)
    original_ids = ids[: args.original_containers] if args.original_containers else ids

    run_dir = workdir / "run"
    logs = common.fresh_dir(run_dir) / "logs"
    logs.mkdir()
    changed_file = root / "overlay2" / ids[0] / "diff" / "home/app/changed-by-benchmark.txt"
    changed_file.unlink(missing_ok=True)  # left by an interrupted earlier run

    rows: dict[str, Row] = {ORIGINAL: Row(ORIGINAL, "", "", len(original_ids))}
    for image_format in args.formats:
        kinds = [COLD, UNCHANGED] + ([] if args.skip_changed else [CHANGED])
        for kind in kinds:
            rows[f"{image_format} {kind}"] = Row(f"{image_format} {kind}", image_format, kind, len(ids))
    uses: dict[str, list[DiskUse]] = {f: [] for f in args.formats}
    problems: list[str] = []
    notes: dict[str, str] = {}

    def time_format(round_index: int, image_format: str) -> None:
        """Cold, unchanged and 1 changed for one format, on fresh output and cache dirs."""
        home = run_dir / image_format
        shutil.rmtree(home, ignore_errors=True)
        place = SnapshotPlace(luigi, root, home / "out", home / "cache", args.workers, image_format)
        runs = [(COLD, STAMP_COLD, set(ids), 2), (UNCHANGED, STAMP_UNCHANGED, set(), 0)]
        if not args.skip_changed:
            runs.append((CHANGED, STAMP_CHANGED, {ids[0]}, 0))
        for kind, stamp, new, image_packs in runs:
            method = f"{image_format} {kind}"
            print(f"timing: round {round_index + 1}, {method} ...", flush=True)
            log = logs / f"r{round_index + 1}-{image_format}-{kind.replace(' ', '-')}.log"
            if kind == CHANGED:
                changed_file.write_text("changed by snapshot_benchmark\n")
            try:
                measured, blobs = time_snapshot_all(place, stamp, log)
            finally:
                changed_file.unlink(missing_ok=True)
            rows[method].samples.append(measured)
            problems.extend(check_run(place, ids, stamp, new=new, image_packs=image_packs, log=log))
            if new:
                # A changed container's store snapshot is its previous one plus one delta layer.
                layers = 4 if kind == CHANGED and image_format == "store" else 3
                problems.extend(check_image(place, sorted(new)[0], stamp, layers))
            notes[method] = read_summary(log, stamp) or f"(no summary line in {log})"
            notes[method] += f"; luigi: {common.read_luigi_summary(log).describe()}"
            if kind == COLD:
                uses[image_format].append(measure_disk_use(place, ids, stamp))
            if kind == UNCHANGED and (blobs.files or blobs.removed):
                problems.append(
                    f"{stamp}: nothing changed, yet {blobs.bytes} layer/archive bytes were written in"
                    f" {len(blobs.files)} file(s), and {blobs.removed} file(s) were removed, under"
                    f" {', '.join(str(d) for d in place.blob_dirs())}:"
                )
                problems.extend(f"  {path} ({size} bytes)" for path, size in blobs.files[:20])
        if not (args.keep_outputs and round_index == args.repeat - 1):
            shutil.rmtree(home, ignore_errors=True)

    try:
        print("warming the page cache ...", flush=True)
        warm_page_cache(root)
        for round_index, method in common.alternating([ORIGINAL, *args.formats], args.repeat):
            if method == ORIGINAL:
                print(f"timing: round {round_index + 1}, {ORIGINAL} x {len(original_ids)} ...", flush=True)
                rows[ORIGINAL].samples.append(run_original(root, original_ids, run_dir, logs / "original.log"))
            else:
                time_format(round_index, method)
    except (BenchmarkError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        print(f"outputs and logs kept in {run_dir}", file=sys.stderr)
        return 1

    table = list(rows.values())
    apply_targets(table)
    rss_source = common.peak_rss_source()
    print()
    print(
        f"scale {args.scale:g}, {len(ids)} containers (original timed on {len(original_ids)}), SnapshotAll --workers"
        f" {args.workers}, {os.cpu_count()} CPUs, {args.repeat} round(s), medians; storage {root}"
    )
    print(f"peak RSS read from: {rss_source}")
    print_table(table)
    print()
    print_disk_use(uses, len(ids))
    print()
    print("targets:")
    for row in table:
        for target, ok in row.verdicts:
            print(f"  {row.method}: {target}: {common.verdict(ok)}")
    for method, line in notes.items():
        print(f"{method}: {line}")
    if args.json:
        doc = {
            "scale": args.scale,
            "containers": len(ids),
            "original_containers": len(original_ids),
            "workers": args.workers,
            "cpus": os.cpu_count(),
            "repeat": args.repeat,
            "peak_rss_source": rss_source,
            "storage_root": str(root),
            "stamps": {COLD: STAMP_COLD, UNCHANGED: STAMP_UNCHANGED, CHANGED: STAMP_CHANGED},
            "targets": {
                "store": asdict(STORE_TARGETS),
                "archives": asdict(ARCHIVE_TARGETS),
                "max_rss_mib": MAX_RSS_MIB,
            },
            "rows": [
                {**asdict(row), "per_container_s": row.per_container_s, "median_seconds": row.median("seconds")}
                for row in table
            ],
            "disk_use": {f: [{**asdict(u), "expected": u.expected} for u in samples] for f, samples in uses.items()},
            "notes": notes,
            "problems": problems,
        }
        common.write_json(args.json, doc)
    if problems:
        print("\nSnapshotAll MISBEHAVED:", file=sys.stderr)
        for line in problems:
            print(f"  {line}", file=sys.stderr)
        print(f"logs kept in {logs}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Measures incremental snapshots into the snapshot store: one container with a large upper dir, a full snapshot,
then delta snapshots of small changes; and (--choose-k) what a longer delta chain costs the snapshot's consumers.

The storage: one container on a small one-layer image (~2 MB), its upper dir 4,000 x --scale files of 256 KiB
(~1 GB at scale 1) in directories of 100. Every change is made as an application would make it: a file rewritten
in place (same size, its mtime set back with os.utime, so only its ctime shows the change), one file deleted, one
added. The runs change the upper dir; its size and file count stay the same, so a later invocation reuses it.

Measured, each SnapshotAll run (`--format store`, the default) after a sync, in fresh output and cache dirs per
round, over --repeat rounds:

- "full": the container's first snapshot: its whole upper dir packed into the store.
- "nothing changed": a run in the next period with nothing changed (luigi's start-up, planning, one index entry),
  and "1 MB rewritten ...": 4 files of 256 KiB rewritten in place, one deleted, one added, then a run. The two
  run side by side, --pairs times after each full snapshot, in alternating order from pair to pair; "delta -
  nothing changed" is the median of each pair's difference: what the delta itself costs beyond luigi's fixed
  cost.
- "hourly": on fresh dirs once, a full snapshot and 24 hourly snapshots, each with a different 1 MB rewritten
  (and one file deleted, one added); the store's disk use (du, a blob hardlinked from the cache counted once)
  against the full snapshot's plus the bytes changed. Afterwards the last snapshot is unpacked with umoci and
  compared with the upper dir (every path under data/, and the content of every file the series changed).

With --choose-k, for [snapshot] full_every (the chain length after which a snapshot is full again): a full
snapshot and 48 hourly deltas, each rewriting the same 1 MB (so every delta keeps a superseded copy), then for
the snapshots at chain lengths 0, 6, 12, 24 and 48, in alternating order over --repeat rounds: `skopeo copy
oci:<store>:<ref> docker-archive:...` and `umoci unpack --image <store>:<ref>` (what restoring a snapshot costs),
the store's disk use at that length, and what a day of hourly snapshots adds to the store with full_every = that
length (24/(L+1) full container layers plus the rest as deltas of the measured size).

"disk writes" is write_bytes of the whole process tree (common.measure); "new store bytes" the bytes of files
created under <out>/store/blobs (the delta layer, hardlinked from the cache, its config and manifest).

Targets (issue 13): a delta snapshot of 1 MB changed adds <= 2 MB to the store; its time beyond a run with nothing
changed is <= 0.05x the full snapshot's; after 24 hourly snapshots the store takes <= 1.1x the full snapshot plus
the bytes changed. Each is printed met or MISSED (exit code 0); a SnapshotAll run that fails, records the wrong
status or chain length, or a last snapshot that does not unpack to the upper dir, exits 1.

Usage: .venv/bin/python benchmarks/incremental_benchmark.py [--scale 1.0] [--repeat 3] [--pairs 3] [--hours 24]
       [--choose-k] [--workers 2] [--json FILE] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import common
from common import MB, BenchmarkError, SnapshotPlace

STORAGE_VERSION = 1  # bump when the generated storage changes, so an old one is rebuilt
CONTAINER_ID = hashlib.sha256(b"incremental-benchmark container").hexdigest()
CONTAINER_NAME = "incremental-bench"
FILE_SIZE = 256 << 10
FILES_AT_SCALE_1 = 4_000
FILES_PER_DIR = 100
REWRITTEN_FILES = 4  # x 256 KiB = 1 MiB rewritten per snapshot
CHAIN_LENGTHS = (0, 6, 12, 24, 48)

DELTA_MAX_BYTES = 2 * MB
DELTA_MAX_RATIO = 0.05
HOURLY_MAX_RATIO = 1.1

FULL = "full"
NOOP = "nothing changed"
DELTA = "1 MB rewritten, 1 deleted, 1 added"
DELTA_NET = "delta - nothing changed"
HOURLY = "hourly delta"


# --------------------------------------------------------------------------------------------------------------
# The storage and the changes made to it
# --------------------------------------------------------------------------------------------------------------


def file_count(scale: float) -> int:
    return max(16, round(FILES_AT_SCALE_1 * scale))


def ensure_storage(workdir: Path, scale: float) -> Path:
    """The storage root under workdir: reused when complete, else (re)built; returns the root."""
    home = workdir / f"incremental-scale{scale:g}"
    count = file_count(scale)
    wanted: dict[str, object] = {"version": STORAGE_VERSION, "scale": scale, "upper_files": count}
    if common.reuse_built(home, wanted):
        return home / "root"
    print(f"storage: building {home / 'root'}: {count} files of {FILE_SIZE >> 10} KiB ...", flush=True)
    start = time.perf_counter()
    root = home / "root"
    base = root / "overlay2" / common.BASE_ID / "diff"
    base.mkdir(parents=True)
    files, written = common.build_layer(base, common.LayerSpec("base", 11, 2 * MB, 200, "usr/lib/pkg", "opt/data"))
    diff = root / "overlay2" / CONTAINER_ID / "diff"
    rng = random.Random(12)
    for i in range(count):
        directory = diff / "data" / f"d{i // FILES_PER_DIR:03d}"
        directory.mkdir(parents=True, exist_ok=True)
        common.write_random_file(directory / f"f{i:05d}.bin", FILE_SIZE, rng)
    (root / "overlay2" / CONTAINER_ID / "lower").write_text(f"{common.BASE_ID}/diff")
    common.write_container_config(root, CONTAINER_ID, CONTAINER_NAME)
    common.mark_built(home, wanted, files + count, written + count * FILE_SIZE, start)
    return root


def upper_dir(root: Path) -> Path:
    return root / "overlay2" / CONTAINER_ID / "diff"


def data_files(upper: Path) -> list[Path]:
    """The container's data files, sorted."""
    return sorted(p for p in (upper / "data").rglob("*") if p.is_file())


def rewrite_in_place(path: Path, rng: random.Random) -> int:
    """New bytes over the whole file, same size and inode, its mtime set back: only the ctime shows it."""
    st = path.stat()
    with open(path, "r+b") as f:
        f.write(rng.randbytes(st.st_size))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    return st.st_size


@dataclass(frozen=True)
class Change:
    """What one change did to the upper dir: the bytes a delta must carry, and the paths it touched."""

    changed_bytes: int  # rewritten + added
    touched: tuple[Path, ...]


def change_upper(upper: Path, step: int, rng: random.Random, *, same_files: bool = False) -> Change:
    """Rewrite REWRITTEN_FILES files in place (step picks which, unless same_files: always the first ones); unless
    same_files, also delete one other file and add a new one."""
    files = data_files(upper)
    first = 0 if same_files else (step * REWRITTEN_FILES) % len(files)
    rewritten = [files[(first + k) % len(files)] for k in range(REWRITTEN_FILES)]
    changed = sum(rewrite_in_place(path, rng) for path in rewritten)
    if same_files:
        return Change(changed, tuple(rewritten))
    doomed = next(
        f for k in range(len(files)) if (f := files[(len(files) // 2 + step + k) % len(files)]) not in rewritten
    )
    doomed.unlink()
    added = upper / "data" / "added" / f"step{step:03d}-{time.time_ns()}.bin"
    added.parent.mkdir(exist_ok=True)
    common.write_random_file(added, FILE_SIZE, rng)
    return Change(changed + FILE_SIZE, (*rewritten, doomed, added))


def warm_page_cache(upper: Path) -> None:
    for path in data_files(upper):
        with open(path, "rb") as f:
            while f.read(1 << 20):
                pass


# --------------------------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Measured:
    """One timed SnapshotAll run of the container."""

    seconds: float
    disk_writes: int  # write_bytes of the process tree
    store_bytes: int  # new files under <out>/store/blobs
    tasks_run: int
    peak_rss_mib: float
    deltas: int  # the record's chain length
    status: str


@dataclass
class Bench:
    """Where this invocation runs SnapshotAll, and what it checked."""

    luigi: Path
    root: Path
    run_dir: Path
    workers: int
    problems: list[str] = field(default_factory=list)
    runs: int = 0

    def place(self, name: str, extra: tuple[str, ...] = ()) -> SnapshotPlace:
        """Fresh output and cache dirs under run/<name>."""
        home = self.run_dir / name
        shutil.rmtree(home, ignore_errors=True)
        return SnapshotPlace(self.luigi, self.root, home / "out", home / "cache", self.workers, "store", extra)

    def snapshot(self, place: SnapshotPlace, stamp: str, *, status: str, deltas: int) -> Measured:
        """One timed SnapshotAll (after a sync), checked: the record's status and chain length."""
        self.runs += 1
        log = self.run_dir / "logs" / f"{self.runs:03d}-{place.out.parent.name}-{stamp}.log"
        before = common.read_files([place.store / "blobs"])
        sample, usage, summary = common.run_snapshot_all(place, stamp, log)
        written = common.find_writes(before, common.read_files([place.store / "blobs"]))
        record = common.read_catalog_record(place.out, CONTAINER_ID, stamp)
        found = Measured(
            sample.seconds,
            sample.write_bytes,
            written.bytes,
            summary.ran,
            usage.maxrss_kib / 1024,
            int(str(record.get("deltas"))),
            str(record.get("status")),
        )
        if (found.status, found.deltas) != (status, deltas):
            self.problems.append(
                f"{stamp}: the record says {found.status!r} with {found.deltas} delta(s), expected {status!r} with"
                f" {deltas} ({log})"
            )
        # The image's one layer, the full container layer, then one layer per delta: a change the delta missed
        # (an empty delta adds no layer) shows here.
        layers = len(common.record_layer_sizes(record))
        if layers != 2 + deltas:
            self.problems.append(f"{stamp}: {layers} layers with {deltas} delta(s), expected {2 + deltas} ({log})")
        return found


def reference(stamp: str) -> str:
    return f"{CONTAINER_NAME}:{stamp}"


# --------------------------------------------------------------------------------------------------------------
# (c) one delta beside a run with nothing changed, and 24 hourly deltas
# --------------------------------------------------------------------------------------------------------------


@dataclass
class DeltaResult:
    full: list[Measured] = field(default_factory=list)
    noop: list[Measured] = field(default_factory=list)
    delta: list[Measured] = field(default_factory=list)
    changed_bytes: list[int] = field(default_factory=list)


def time_deltas(bench: Bench, repeat: int, pairs: int, rng: random.Random) -> DeltaResult:
    """Per round: a full snapshot, then `pairs` pairs of a run with nothing changed and a delta run, each pair in
    the other order than the one before."""
    result = DeltaResult()
    upper = upper_dir(bench.root)
    for round_index in range(repeat):
        place = bench.place("deltas")
        stamps = iter(common.hourly_stamps("2026-12-01T0000", 1 + 2 * pairs))
        print(f"timing: round {round_index + 1}, {FULL} ...", flush=True)
        result.full.append(bench.snapshot(place, next(stamps), status="new", deltas=0))
        chain = 0  # a reused snapshot is its previous one, chain length included
        for pair in range(pairs):
            for kind in (NOOP, DELTA) if (round_index + pair) % 2 == 0 else (DELTA, NOOP):
                print(f"timing: round {round_index + 1}, pair {pair + 1}, {kind} ...", flush=True)
                if kind == NOOP:
                    result.noop.append(bench.snapshot(place, next(stamps), status="reused", deltas=chain))
                else:
                    step = round_index * pairs + pair
                    result.changed_bytes.append(change_upper(upper, step, rng).changed_bytes)
                    chain += 1
                    result.delta.append(bench.snapshot(place, next(stamps), status="new", deltas=chain))
        shutil.rmtree(place.out.parent, ignore_errors=True)
    return result


@dataclass
class HourlyResult:
    hours: int
    full: Measured | None = None
    deltas: list[Measured] = field(default_factory=list)
    changed_bytes: int = 0
    store_after_full: int = 0
    store_after: int = 0
    cache_after: int = 0
    indexes_after: int = 0

    @property
    def expected(self) -> int:
        return self.store_after_full + self.changed_bytes

    @property
    def ratio(self) -> float:
        return self.store_after / self.expected if self.expected else 0.0


def time_hourly(bench: Bench, hours: int, rng: random.Random) -> HourlyResult:
    """A full snapshot and `hours` hourly deltas, each a different 1 MB; the last snapshot checked with umoci."""
    result = HourlyResult(hours)
    upper = upper_dir(bench.root)
    place = bench.place("hourly", ("--schedule-full-every", str(max(hours, 1))))
    stamps = common.hourly_stamps("2026-12-02T0000", hours + 1)
    print(f"timing: hourly, {FULL} and {hours} deltas ...", flush=True)
    result.full = bench.snapshot(place, stamps[0], status="new", deltas=0)
    result.store_after_full = common.disk_usage([place.store])
    touched: set[Path] = set()
    for hour in range(1, hours + 1):
        change = change_upper(upper, 100 + hour, rng)
        result.changed_bytes += change.changed_bytes
        touched.update(change.touched)
        result.deltas.append(bench.snapshot(place, stamps[hour], status="new", deltas=hour))
    result.store_after = common.disk_usage([place.store])
    result.cache_after = common.disk_usage([place.cache])
    result.indexes_after = common.disk_usage([place.cache / "indexes"])
    bench.problems.extend(check_unpacked(place.store, stamps[-1], upper, touched, bench.run_dir / "bundle"))
    shutil.rmtree(place.out.parent, ignore_errors=True)
    return result


def check_unpacked(store: Path, stamp: str, upper: Path, touched: set[Path], bundle: Path) -> list[str]:
    """umoci unpack of the snapshot: the same paths under data/ as the upper dir, the touched files' content."""
    shutil.rmtree(bundle, ignore_errors=True)
    image = f"{store}:{reference(stamp)}"
    done = subprocess.run(["umoci", "unpack", "--image", image, str(bundle)], capture_output=True, text=True)
    if done.returncode != 0:
        return [f"umoci unpack --image {image} failed: {done.stderr.strip()}"]
    try:
        rootfs = bundle / "rootfs"
        want = {str(p.relative_to(upper)) for p in data_files(upper)}
        got = {str(p.relative_to(rootfs)) for p in data_files(rootfs)}
        problems = [f"{image}: unpacked data/ differs: {len(want - got)} missing, {len(got - want)} extra"]
        problems = problems if want != got else []
        for path in sorted(touched):
            relative = path.relative_to(upper)
            if path.exists() and (rootfs / relative).read_bytes() != path.read_bytes():
                problems.append(f"{image}: {relative} unpacked differs from the upper dir")
        return problems
    finally:
        shutil.rmtree(bundle, ignore_errors=True)


# --------------------------------------------------------------------------------------------------------------
# (d) what a longer chain costs consumers
# --------------------------------------------------------------------------------------------------------------


@dataclass
class ChainPoint:
    length: int
    stamp: str
    layers: int
    store_du: int
    skopeo: list[common.Sample] = field(default_factory=list)
    umoci: list[common.Sample] = field(default_factory=list)


@dataclass
class ChainResult:
    points: list[ChainPoint]
    full_layer_bytes: int  # the container layer of a full snapshot
    delta_store_bytes: float  # median new store bytes of one delta


def time_chain(bench: Bench, repeat: int, rng: random.Random) -> ChainResult:
    """A full snapshot and max(CHAIN_LENGTHS) deltas of the same 1 MB; consumers timed at each chain length."""
    longest = max(CHAIN_LENGTHS)
    upper = upper_dir(bench.root)
    place = bench.place("chain", ("--schedule-full-every", str(longest)))
    stamps = common.hourly_stamps("2026-12-10T0000", longest + 1)
    print(f"choose-k: building a chain of {longest} deltas ...", flush=True)
    points: list[ChainPoint] = []
    deltas: list[Measured] = []
    full_layer = 0
    for length, stamp in enumerate(stamps):
        if length:
            change_upper(upper, length, rng, same_files=True)
        measured = bench.snapshot(place, stamp, status="new", deltas=length)
        if length:
            deltas.append(measured)
        record = common.read_catalog_record(place.out, CONTAINER_ID, stamp)
        if length == 0:
            full_layer = common.record_layer_sizes(record)[-1]
        if length in CHAIN_LENGTHS:
            layers = len(common.record_layer_sizes(record))
            points.append(ChainPoint(length, stamp, layers, common.disk_usage([place.store])))
    rewritten = set(data_files(upper)[:REWRITTEN_FILES])
    bench.problems.extend(check_unpacked(place.store, stamps[-1], upper, rewritten, bench.run_dir / "bundle"))
    scratch = bench.run_dir / "consumer"
    for round_index, point in common.alternating(points, repeat):
        print(f"choose-k: round {round_index + 1}, chain {point.length}: skopeo copy, umoci unpack ...", flush=True)
        image = f"{place.store}:{reference(point.stamp)}"
        common.fresh_dir(scratch)
        archive = f"docker-archive:{scratch / 'out.tar'}:bench/chain:latest"
        point.skopeo.append(consume(["skopeo", "copy", "-q", f"oci:{image}", archive], bench))
        point.umoci.append(consume(["umoci", "unpack", "--image", image, str(scratch / "bundle")], bench))
        shutil.rmtree(scratch, ignore_errors=True)
    shutil.rmtree(place.out.parent, ignore_errors=True)
    return ChainResult(points, full_layer, common.median(m.store_bytes for m in deltas))


def consume(argv: list[str], bench: Bench) -> common.Sample:
    log = bench.run_dir / "logs" / "consumers.log"
    sample, _ = common.measure(lambda: common.run_child(argv, common.Usage(), log=log))
    return sample


def bytes_per_day(full_every: int, full_bytes: float, delta_bytes: float) -> float:
    """What 24 hourly snapshots of a changing container add to the store when every (full_every+1)th is full."""
    fulls = 24 / (full_every + 1)
    return fulls * full_bytes + (24 - fulls) * delta_bytes


# --------------------------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------------------------


def med(samples: list[Measured], name: str) -> float:
    return common.median(float(getattr(s, name)) for s in samples)


def pair_differences(result: DeltaResult) -> list[float]:
    return [d.seconds - n.seconds for d, n in zip(result.delta, result.noop, strict=True)]


def verdicts(deltas: DeltaResult, hourly: HourlyResult) -> list[tuple[str, str, bool]]:
    """(what, measured, met) for each issue-13 target."""
    full_s = med(deltas.full, "seconds")
    net = common.median(pair_differences(deltas))
    delta_bytes = max(m.store_bytes for m in deltas.delta)
    return [
        (
            f"a 1 MB delta adds <= {common.format_bytes(DELTA_MAX_BYTES)} to the store",
            f"{common.format_bytes(delta_bytes)} (largest of {len(deltas.delta)})",
            delta_bytes <= DELTA_MAX_BYTES,
        ),
        (
            f"(delta - nothing changed) <= {DELTA_MAX_RATIO} x full",
            f"{net:.3f} s / {full_s:.2f} s = {net / full_s:.3f}x",
            net / full_s <= DELTA_MAX_RATIO,
        ),
        (
            f"store after {hourly.hours} hourly <= {HOURLY_MAX_RATIO} x (full + changed bytes)",
            f"{hourly.ratio:.3f}x",
            hourly.ratio <= HOURLY_MAX_RATIO,
        ),
    ]


def print_delta_table(deltas: DeltaResult, hourly: HourlyResult) -> None:
    full_s = med(deltas.full, "seconds")
    net = pair_differences(deltas)
    columns = [
        ("method", -36),
        ("total s", 14),
        ("spread", 11),
        ("x full", 13),
        ("disk writes", 11),
        ("new store bytes", 15),
        ("tasks run", 9),
        ("peak RSS MiB", 12),
    ]

    def row(name: str, samples: list[Measured], missed: bool = False) -> list[str]:
        seconds = med(samples, "seconds")
        return [
            name,
            f"{seconds:.2f}",
            common.spread(s.seconds for s in samples),
            f"{seconds / full_s:.3f}",
            common.format_bytes(med(samples, "disk_writes")),
            common.format_bytes(med(samples, "store_bytes")) + (" MISSED" if missed else ""),
            f"{med(samples, 'tasks_run'):.0f}",
            f"{med(samples, 'peak_rss_mib'):.1f}",
        ]

    net_s = common.median(net)
    net_missed = net_s / full_s > DELTA_MAX_RATIO
    rows = [
        row(FULL, deltas.full),
        row(NOOP, deltas.noop),
        row(DELTA, deltas.delta, max(m.store_bytes for m in deltas.delta) > DELTA_MAX_BYTES),
        [
            DELTA_NET,
            f"{net_s:.3f}",
            common.spread(net),
            f"{net_s / full_s:.3f}" + (" MISSED" if net_missed else ""),
            "",
            "",
            "",
            "",
        ],
        row(f"{HOURLY} (median of {hourly.hours})", hourly.deltas),
    ]
    common.print_table(columns, rows)


def print_hourly_table(hourly: HourlyResult) -> None:
    columns = [
        (f"after a full + {hourly.hours} hourly", -26),
        ("store du", 10),
        ("full's store du + changed", 26),
        ("x that", 12),
        ("cache du", 10),
        ("of which indexes", 16),
    ]
    ratio = f"{hourly.ratio:.3f}" + (" MISSED" if hourly.ratio > HOURLY_MAX_RATIO else "")
    expected = f"{common.format_bytes(hourly.store_after_full)} + {common.format_bytes(hourly.changed_bytes)}"
    row = [
        "",
        common.format_bytes(hourly.store_after),
        expected,
        ratio,
        common.format_bytes(hourly.cache_after),
        common.format_bytes(hourly.indexes_after),
    ]
    common.print_table(columns, [row])


def print_chain_table(chain: ChainResult) -> None:
    base = chain.points[0]
    skopeo0 = common.median(s.seconds for s in base.skopeo)
    umoci0 = common.median(s.seconds for s in base.umoci)
    columns = [
        ("chain length", 12),
        ("layers", 6),
        ("skopeo copy s", 13),
        ("spread", 11),
        ("x chain 0", 9),
        ("umoci unpack s", 14),
        ("spread", 11),
        ("x chain 0", 9),
        ("store du", 10),
        ("store/day if full_every = L", 27),
    ]
    rows = []
    for point in chain.points:
        skopeo = common.median(s.seconds for s in point.skopeo)
        umoci = common.median(s.seconds for s in point.umoci)
        per_day = bytes_per_day(point.length, chain.full_layer_bytes, chain.delta_store_bytes)
        rows.append(
            [
                str(point.length),
                str(point.layers),
                f"{skopeo:.2f}",
                common.spread(s.seconds for s in point.skopeo),
                f"{skopeo / skopeo0:.2f}",
                f"{umoci:.2f}",
                common.spread(s.seconds for s in point.umoci),
                f"{umoci / umoci0:.2f}",
                common.format_bytes(point.store_du),
                common.format_bytes(per_day),
            ]
        )
    common.print_table(columns, rows)
    print(
        f"store/day: 24/(L+1) full container layers of {common.format_bytes(chain.full_layer_bytes)} plus the rest"
        f" as deltas of {common.format_bytes(chain.delta_store_bytes)} (median new store bytes of the"
        f" {max(CHAIN_LENGTHS)} deltas, each the same 1 MB rewritten); L = 0 is a full snapshot every hour"
    )


# --------------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = common.argument_parser(
        __doc__, "pipeline-incremental-benchmark", "generated storage (reused), outputs and logs", repeat="run"
    )
    parser.add_argument("--scale", type=float, default=1.0, help="upper dir size factor (1.0: 4,000 x 256 KiB)")
    parser.add_argument(
        "--pairs", type=int, default=3, help="pairs of (nothing changed, 1 MB changed) runs after each full snapshot"
    )
    parser.add_argument("--hours", type=int, default=24, help="hourly delta snapshots after the full one")
    parser.add_argument("--workers", type=int, default=2, help="luigi --workers for SnapshotAll")
    parser.add_argument(
        "--choose-k",
        action="store_true",
        help=f"also time consumers of chains of {', '.join(map(str, CHAIN_LENGTHS))} deltas (several minutes)",
    )
    args = parser.parse_args(argv)
    if args.scale <= 0 or min(args.repeat, args.pairs, args.hours, args.workers) < 1:
        parser.error("--scale must be > 0, --repeat, --pairs, --hours and --workers >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    luigi = common.find_luigi(("skopeo", "umoci"))
    if luigi is None:
        return 2
    workdir: Path = args.workdir
    root = ensure_storage(workdir, args.scale)
    run_dir = workdir / "run"
    (common.fresh_dir(run_dir) / "logs").mkdir()
    bench = Bench(luigi, root, run_dir, args.workers)
    rng = random.Random(time.time_ns())
    chain: ChainResult | None = None
    try:
        print("warming the page cache ...", flush=True)
        warm_page_cache(upper_dir(root))
        deltas = time_deltas(bench, args.repeat, args.pairs, rng)
        hourly = time_hourly(bench, args.hours, rng)
        if args.choose_k:
            chain = time_chain(bench, args.repeat, rng)
    except (BenchmarkError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        print(f"outputs and logs kept in {run_dir}", file=sys.stderr)
        return 1

    files = len(data_files(upper_dir(root)))
    print()
    print(
        f"scale {args.scale:g}: one container, {files} files of {FILE_SIZE >> 10} KiB"
        f" ({common.format_bytes(files * FILE_SIZE)}) on a ~2 MB image; SnapshotAll --format store --workers"
        f" {args.workers}; {os.cpu_count()} CPUs; {args.repeat} round(s) of a full snapshot and {args.pairs} pair(s),"
        f" medians; storage {root}"
    )
    print(f"peak RSS read from: {common.peak_rss_source()}")
    print_delta_table(deltas, hourly)
    print()
    print_hourly_table(hourly)
    if chain is not None:
        print()
        print_chain_table(chain)
    print()
    print("targets:")
    checked = verdicts(deltas, hourly)
    for what, value, ok in checked:
        print(f"  {what}: {value}: {common.verdict(ok)}")
    if args.json:
        doc = {
            "scale": args.scale,
            "files": files,
            "file_size": FILE_SIZE,
            "workers": args.workers,
            "cpus": os.cpu_count(),
            "repeat": args.repeat,
            "storage_root": str(root),
            "deltas": asdict(deltas),
            "delta_minus_noop_s": pair_differences(deltas),
            "hourly": {**asdict(hourly), "expected": hourly.expected, "ratio": hourly.ratio},
            "chain": asdict(chain) if chain else None,
            "targets": [{"target": w, "measured": v, "met": ok} for w, v, ok in checked],
            "problems": bench.problems,
        }
        common.write_json(args.json, doc)
    if bench.problems:
        print("\nSnapshotAll MISBEHAVED:", file=sys.stderr)
        for line in bench.problems:
            print(f"  {line}", file=sys.stderr)
        print(f"logs kept in {run_dir / 'logs'}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

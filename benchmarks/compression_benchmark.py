"""Measures compressing layer tars: ours (pipeline.store.compression.compress_blob) against pigz -p2 and zstd -T2.

Inputs, both GNU `tar -cf` output, each placed in a layer cache the way LayerCache.pack_layer leaves a blob:

- "incompressible": one tar per diff/ of commit_benchmark's storage (base, mid and the container's layer; their
  files are seeded random bytes), i.e. the performance fixture the target is stated for.
- "compressible": one tar of system directories (--compressible; by default Python's standard library, man
  pages, docs and locales), so that the ratios mean something.

Compared, on the same tars in the same run, each method compressing every tar of a data set one after another:

- "ours gzip -1": compress_blob(gzip, 1), ISA-L; "ours gzip -6": zlib level 6; both compress in one thread
  (and hash and write in a second).
- "ours zstd -3": compress_blob(zstd, 3) with --threads workers (2 by default).
- "pigz -p2 -1", "pigz -p2 -6": `pigz -p2 -n -c`, -n like ours (no name or mtime in the header).
- "zstd -T2 -3": the zstd CLI, `zstd -T2 -3 -q -c` (checksum and content size on, as ours).

Ours includes everything compress_blob does (fsync, rename, the mapping JSON); the tools' output file is fsync'd
inside the timing too. Before every timed run ours' cache entries are removed, so it compresses again, and every
timed run starts after an os.sync(). Every method runs once untimed first; ours' warm-up output is decompressed
by the tools (pigz -dc, zstd -dc) and must hash to the diff_id, and each timed run of ours must give the
warm-up's digest. Then --repeat timed runs, interleaved in alternating order (A B C, C B A, ...); the table shows
medians. MB/s is uncompressed input (MB = 10^6 bytes) per second of wall time; "size" is compressed /
uncompressed bytes; "CPU" is CPU time / wall time (2.00 = both cores busy); "x tool" is our MB/s over the MB/s of
the tool at the same algorithm and level. "+sha256" is MB/s counting also the sha256 of the output that an OCI
manifest needs: ours computes it while writing; for the tools it is hashlib over their output files, timed
separately and added; "x +sha256" compares those. The load average is printed at start and end: the machine may
be shared, so read the ratios, which are taken in one run.

Target (issue 7): ours zstd -3 at least 400 MB/s on 2 cores on the incompressible data. A missed target is
marked MISSED; the exit code stays 0. A broken blob (wrong decompressed digest, digest changing between runs)
exits 1.

Usage: .venv/bin/python benchmarks/compression_benchmark.py [--scale 1.0] [--repeat 3] [--threads 2]
       [--compressible DIR ...] [--workdir DIR] [--json FILE]
Needs GNU tar, pigz and zstd on PATH (Debian: apt-get install -y pigz zstd).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import common
from common import MB, BenchmarkError

from pipeline.layer.writer import LayerRecord
from pipeline.store.cache import LayerCache
from pipeline.store.compression import compress_blob, library_version, mapping_path

ZSTD_TARGET_MB_S = 400.0
DEFAULT_COMPRESSIBLE = (
    f"/usr/lib/python{sys.version_info.major}.{sys.version_info.minor}",
    "/usr/share/man",
    "/usr/share/doc",
    "/usr/share/locale",
)


@dataclass(frozen=True)
class Method:
    name: str
    algorithm: str
    level: int
    tool: str = ""  # for ours: the tool method compared with; "" for a tool


METHODS = (
    Method("ours gzip -1", "gzip", 1, tool="pigz -p2 -1"),
    Method("pigz -p2 -1", "gzip", 1),
    Method("ours gzip -6", "gzip", 6, tool="pigz -p2 -6"),
    Method("pigz -p2 -6", "gzip", 6),
    Method("ours zstd -3", "zstd", 3, tool="zstd -T2 -3"),
    Method("zstd -T2 -3", "zstd", 3),
)


@dataclass
class Result:
    data: str
    method: str
    samples_s: list[float] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)
    digest_s: list[float] = field(default_factory=list)  # tools only: sha256 of their output, after the timing
    input_bytes: int = 0
    output_bytes: int = 0
    median_s: float = 0.0
    mb_per_s: float = 0.0
    with_digest_mb_per_s: float = 0.0
    size_ratio: float = 0.0
    cpu_ratio: float = 0.0
    vs_tool: float | None = None
    vs_tool_with_digest: float | None = None


# --------------------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------------------


def gnu_tar(argv: list[str], out: Path) -> None:
    # Exit 1 is GNU tar's "some files differ" (changed while read): harmless for system directories.
    done = subprocess.run(["tar", "-cf", str(out), *argv], capture_output=True, text=True, check=False)
    if done.returncode not in (0, 1):
        raise BenchmarkError(f"tar -cf {out} {' '.join(argv)} failed: {done.stderr.strip()}")


def add_to_cache(cache: Path, tar: Path) -> LayerRecord:
    """Move tar into cache as the blob of its diff_id."""
    with open(tar, "rb") as f:
        diff_id = "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()
    record = LayerRecord(diff_id, tar.stat().st_size)
    blob = LayerCache(cache).blob_path(diff_id)
    blob.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tar, blob)
    return record


def build_inputs(work: Path, storage: Path, compressible: list[Path]) -> dict[str, list[LayerRecord]]:
    cache = work / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    inputs: dict[str, list[LayerRecord]] = {"incompressible": [], "compressible": []}
    for layer_id, diff in common.layer_dirs(storage):
        gnu_tar(["-C", str(diff), "."], work / f"{layer_id}.tar")
        inputs["incompressible"].append(add_to_cache(cache, work / f"{layer_id}.tar"))
    dirs = [d for d in compressible if d.is_dir()]
    if not dirs:
        raise BenchmarkError(f"none of the compressible directories exist: {', '.join(map(str, compressible))}")
    gnu_tar(["-C", "/", *(str(d.relative_to("/")) for d in dirs)], work / "system.tar")
    inputs["compressible"].append(add_to_cache(cache, work / "system.tar"))
    print(f"compressible: {', '.join(map(str, dirs))}")
    return inputs


# --------------------------------------------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------------------------------------------


def forget(cache: Path, records: list[LayerRecord], method: Method) -> None:
    """Remove ours' cache entries (mapping and blob) of an earlier run, so that compress_blob compresses again."""
    for record in records:
        mapping = mapping_path(cache, record.diff_id, method.algorithm, method.level)
        if mapping.exists():
            digest = json.loads(mapping.read_bytes())["digest"]
            LayerCache(cache).blob_path(digest).unlink(missing_ok=True)
            mapping.unlink()


def run_ours(cache: Path, records: list[LayerRecord], method: Method, threads: int) -> tuple[int, list[str]]:
    """compress_blob on every record; returns the total compressed bytes and the digests."""
    blobs = [compress_blob(cache, r, method.algorithm, method.level, threads=threads) for r in records]
    return sum(b.size for b in blobs), [b.digest for b in blobs]


def tool_argv(method: Method) -> list[str]:
    if method.algorithm == "gzip":
        return ["pigz", "-p2", f"-{method.level}", "-n", "-c"]
    return ["zstd", "-T2", f"-{method.level}", "-q", "-c"]


def run_tool(cache: Path, records: list[LayerRecord], method: Method, out_dir: Path) -> tuple[int, list[str]]:
    """The tool on every record's blob, each into a file fsync'd; returns the total compressed bytes."""
    total = 0
    for record in records:
        out = out_dir / f"{record.hex}.{method.algorithm}"
        with open(out, "wb") as f:
            blob = LayerCache(cache).blob_path(record.diff_id)
            done = subprocess.run([*tool_argv(method), str(blob)], stdout=f, stderr=subprocess.PIPE, check=False)
            if done.returncode != 0:
                raise BenchmarkError(f"{' '.join(tool_argv(method))} {blob} failed: {done.stderr.decode().strip()}")
            f.flush()
            os.fsync(f.fileno())
        total += out.stat().st_size
    return total, []


def digest_outputs(out_dir: Path) -> float:
    """Seconds to sha256 the tool's outputs (hashlib, as ours), which are then removed: the digest an OCI
    manifest needs, which ours computes while writing and the tools do not."""
    start = time.perf_counter()
    for out in sorted(out_dir.iterdir()):
        with open(out, "rb") as f:
            hashlib.file_digest(f, "sha256")
    seconds = time.perf_counter() - start
    for out in out_dir.iterdir():
        out.unlink()
    return seconds


def check_ours(cache: Path, records: list[LayerRecord], method: Method, digests: list[str]) -> None:
    """Each blob decompresses, through the CLI tools, to the tar it came from."""
    decompress = ["pigz", "-dc"] if method.algorithm == "gzip" else ["zstd", "-dcq"]
    for record, digest in zip(records, digests, strict=True):
        blob = LayerCache(cache).blob_path(digest)
        proc = subprocess.Popen([*decompress, str(blob)], stdout=subprocess.PIPE)
        assert proc.stdout is not None
        digest_of = hashlib.sha256()
        with proc.stdout:
            while chunk := proc.stdout.read(1 << 20):
                digest_of.update(chunk)
        got = "sha256:" + digest_of.hexdigest()
        if proc.wait() != 0 or got != record.diff_id:
            raise BenchmarkError(f"{method.name}: {blob} decompresses to {got}, not {record.diff_id}")


# --------------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------------


def print_table(results: list[Result]) -> None:
    columns = [
        ("data", -15),
        ("method", -14),
        ("median s", 9),
        ("MB/s", 7),
        ("+sha256", 8),
        ("size", 6),
        ("CPU", 5),
        ("x tool", 7),
        ("x +sha256", 9),
    ]
    rows = [
        [
            r.data,
            r.method,
            f"{r.median_s:.2f}",
            f"{r.mb_per_s:.0f}",
            f"{r.with_digest_mb_per_s:.0f}",
            f"{r.size_ratio:.3f}",
            f"{r.cpu_ratio:.2f}",
            f"{r.vs_tool:.2f}" if r.vs_tool is not None else "",
            f"{r.vs_tool_with_digest:.2f}" if r.vs_tool_with_digest is not None else "",
        ]
        for r in results
    ]
    common.print_table(columns, rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = common.argument_parser(
        __doc__,
        "pipeline-commit-benchmark",
        "commit_benchmark's storage (reused or built) and, in compression/, this run's tars and outputs",
        repeat="method",
    )
    parser.add_argument("--scale", type=float, default=1.0, help="commit_benchmark's storage size factor")
    parser.add_argument("--threads", type=int, default=2, help="zstd workers for ours (the bytes do not change)")
    parser.add_argument("--compressible", type=Path, nargs="+", default=[Path(d) for d in DEFAULT_COMPRESSIBLE])
    args = parser.parse_args(argv)
    if args.scale <= 0 or args.repeat < 1 or args.threads < 1:
        parser.error("--scale must be > 0, --repeat and --threads >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for program in ("tar", "pigz", "zstd"):
        if shutil.which(program) is None:
            print(f"error: {program} is not on PATH (Debian: apt-get install -y pigz zstd)", file=sys.stderr)
            return 2
    storage = common.ensure_storage(args.workdir, args.scale)
    work = common.fresh_dir(args.workdir / "compression")
    (work / "out").mkdir()
    cache = work / "cache"
    load_start = os.getloadavg()
    results: dict[tuple[str, str], Result] = {}
    try:
        inputs = build_inputs(work, storage, args.compressible)
        for data, records in inputs.items():
            for m in METHODS:
                results[data, m.name] = Result(data, m.name, input_bytes=sum(r.size for r in records))
        expected: dict[tuple[str, str], list[str]] = {}
        for data, records in inputs.items():
            for m in METHODS:
                print(f"warm-up: {data}: {m.name} ...", flush=True)
                if m.tool:
                    _, digests = run_ours(cache, records, m, args.threads)
                    check_ours(cache, records, m, digests)
                    expected[data, m.name] = digests
                else:
                    run_tool(cache, records, m, work / "out")
                    digest_outputs(work / "out")
        runs = [(data, m) for data in inputs for m in METHODS]
        for i, (data, m) in common.alternating(runs, args.repeat):
            records = inputs[data]
            r = results[data, m.name]
            if m.tool:
                forget(cache, records, m)
                run: Callable[[], tuple[int, list[str]]] = functools.partial(run_ours, cache, records, m, args.threads)
            else:
                run = functools.partial(run_tool, cache, records, m, work / "out")
            sample, (size, digests) = common.measure(run)
            if m.tool and digests != expected[data, m.name]:
                raise BenchmarkError(f"{data}: {m.name}: digests differ from the warm-up run: {digests}")
            r.samples_s.append(sample.seconds)
            r.digest_s.append(0.0 if m.tool else digest_outputs(work / "out"))
            r.cpu_s.append(sample.cpu_seconds)
            r.output_bytes = size
            print(f"  run {i + 1}/{args.repeat}: {data}: {m.name}: {sample.seconds:.2f}s", flush=True)
    except BenchmarkError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)

    for r in results.values():
        r.median_s = statistics.median(r.samples_s)
        r.mb_per_s = r.input_bytes / MB / r.median_s
        r.with_digest_mb_per_s = r.input_bytes / MB / (r.median_s + statistics.median(r.digest_s))
        r.size_ratio = r.output_bytes / r.input_bytes
        r.cpu_ratio = statistics.median(r.cpu_s) / r.median_s
    for data in inputs:
        for m in METHODS:
            if m.tool:
                ours, tool = results[data, m.name], results[data, m.tool]
                ours.vs_tool = ours.mb_per_s / tool.mb_per_s
                ours.vs_tool_with_digest = ours.mb_per_s / tool.with_digest_mb_per_s

    zstd = results["incompressible", "ours zstd -3"]
    met = "met" if zstd.mb_per_s >= ZSTD_TARGET_MB_S else "MISSED"
    sizes = {d: sum(r.size for r in recs) / MB for d, recs in inputs.items()}
    print()
    print(
        f"scale {args.scale:g}, repeat {args.repeat}, {os.cpu_count()} CPUs, ours zstd threads {args.threads}; "
        f"incompressible {sizes['incompressible']:.0f} MB in {len(inputs['incompressible'])} tars, "
        f"compressible {sizes['compressible']:.0f} MB"
    )
    print(
        f"ours: {library_version('gzip', 1)} (gzip -1), {library_version('gzip', 6)} (gzip -6), "
        f"{library_version('zstd', 3)}; tools: {common.tool_version(['pigz', '--version'])}, "
        f"{common.tool_version(['zstd', '--version'])}"
    )
    load_end = os.getloadavg()
    print(f"load average (1 min) at start {load_start[0]:.2f}, at end {load_end[0]:.2f}")
    print_table(list(results.values()))
    print(f"target: ours zstd -3 >= {ZSTD_TARGET_MB_S:.0f} MB/s on incompressible data: {zstd.mb_per_s:.0f} ({met})")
    if args.json:
        doc = {
            "scale": args.scale,
            "repeat": args.repeat,
            "threads": args.threads,
            "cpus": os.cpu_count(),
            "load_average": [load_start[0], load_end[0]],
            "results": [asdict(r) for r in results.values()],
        }
        common.write_json(args.json, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())

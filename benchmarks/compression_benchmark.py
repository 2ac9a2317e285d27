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
inside the timing too. Before every timed run ours' cache entries are removed, so it compresses again, and the
page cache is synced. Every method runs once untimed first; ours' warm-up output is decompressed by the tools
(pigz -dc, zstd -dc) and must hash to the diff_id, and each timed run of ours must give the warm-up's digest.
Then --repeat timed runs, interleaved; the table shows medians. MB/s is uncompressed input (MB = 10^6 bytes) per
second of wall time; "size" is compressed / uncompressed bytes; "CPU" is CPU time / wall time (2.00 = both
cores busy); "x tool" is our MB/s over the MB/s of the tool at the same algorithm and level. "+sha256" is MB/s
counting also the sha256 of the output that an OCI manifest needs: ours computes it while writing; for the tools
it is hashlib over their output files, timed separately and added; "x +sha256" compares those. The load average
is printed at start and end: the machine may be shared, so read the ratios, which are taken in one run.

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
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent))
import commit_benchmark as cb  # noqa: E402 - a sibling script, importable once its directory is on sys.path

from pipeline.layer.writer import LayerRecord  # noqa: E402
from pipeline.store.compression import compress_blob, library_version, mapping_path  # noqa: E402

MB = cb.MB
T = TypeVar("T")
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


class BenchmarkError(Exception):
    """A method failed or wrote a broken blob; the benchmark stops instead of timing it."""


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
    blob_dir = cache / "blobs" / "sha256"
    blob_dir.mkdir(parents=True, exist_ok=True)
    os.replace(tar, blob_dir / record.hex)
    return record


def build_inputs(work: Path, storage: Path, compressible: list[Path]) -> dict[str, list[LayerRecord]]:
    cache = work / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    inputs: dict[str, list[LayerRecord]] = {"incompressible": [], "compressible": []}
    for layer_id, diff in cb.layer_dirs(storage):
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
            (cache / "blobs" / "sha256" / digest.removeprefix("sha256:")).unlink(missing_ok=True)
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
            blob = cache / "blobs" / "sha256" / record.hex
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
        blob = cache / "blobs" / "sha256" / digest.removeprefix("sha256:")
        proc = subprocess.Popen([*decompress, str(blob)], stdout=subprocess.PIPE)
        assert proc.stdout is not None
        digest_of = hashlib.sha256()
        with proc.stdout:
            while chunk := proc.stdout.read(1 << 20):
                digest_of.update(chunk)
        got = "sha256:" + digest_of.hexdigest()
        if proc.wait() != 0 or got != record.diff_id:
            raise BenchmarkError(f"{method.name}: {blob} decompresses to {got}, not {record.diff_id}")


def timed(fn: Callable[[], T]) -> tuple[float, float, T]:
    """Wall seconds, CPU seconds (this process's threads and waited-for children) and fn's result."""
    os.sync()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = time.process_time()
    start = time.perf_counter()
    result = fn()
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = time.process_time() - cpu + (after.ru_utime - children.ru_utime) + (after.ru_stime - children.ru_stime)
    return wall, cpu, result


# --------------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------------


def print_table(results: list[Result]) -> None:
    columns = ("data", "method", "median s", "MB/s", "+sha256", "size", "CPU", "x tool", "x +sha256")
    widths = (-15, -14, 9, 7, 8, 6, 5, 7, 9)  # negative: left-aligned
    rows = [columns]
    for r in results:
        vs = f"{r.vs_tool:.2f}" if r.vs_tool is not None else ""
        vs_digest = f"{r.vs_tool_with_digest:.2f}" if r.vs_tool_with_digest is not None else ""
        rows.append(
            (
                r.data,
                r.method,
                f"{r.median_s:.2f}",
                f"{r.mb_per_s:.0f}",
                f"{r.with_digest_mb_per_s:.0f}",
                f"{r.size_ratio:.3f}",
                f"{r.cpu_ratio:.2f}",
                vs,
                vs_digest,
            )
        )
    for i, row in enumerate(rows):
        print(" ".join(f"{cell:<{-w}}" if w < 0 else f"{cell:>{w}}" for cell, w in zip(row, widths, strict=True)))
        if i == 0:
            print("-" * (sum(abs(w) for w in widths) + len(widths) - 1))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--scale", type=float, default=1.0, help="commit_benchmark's storage size factor")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per method (median reported)")
    parser.add_argument("--threads", type=int, default=2, help="zstd workers for ours (the bytes do not change)")
    parser.add_argument("--compressible", type=Path, nargs="+", default=[Path(d) for d in DEFAULT_COMPRESSIBLE])
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "pipeline-commit-benchmark",
        help="commit_benchmark's storage (reused or built) and, in compression/, this run's tars and outputs",
    )
    parser.add_argument("--json", type=Path, help="also write the results as JSON to this file")
    args = parser.parse_args(argv)
    if args.scale <= 0 or args.repeat < 1 or args.threads < 1:
        parser.error("--scale must be > 0, --repeat and --threads >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for tool in ("tar", "pigz", "zstd"):
        if shutil.which(tool) is None:
            print(f"error: {tool} is not on PATH (Debian: apt-get install -y pigz zstd)", file=sys.stderr)
            return 2
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    storage = cb.ensure_storage(workdir, args.scale)
    work = workdir / "compression"
    shutil.rmtree(work, ignore_errors=True)
    (work / "out").mkdir(parents=True)
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
        for i in range(args.repeat):
            for data, records in inputs.items():
                for m in METHODS:
                    r = results[data, m.name]
                    if m.tool:
                        forget(cache, records, m)
                        run: Callable[[], tuple[int, list[str]]] = functools.partial(
                            run_ours, cache, records, m, args.threads
                        )
                    else:
                        run = functools.partial(run_tool, cache, records, m, work / "out")
                    wall, cpu, (size, digests) = timed(run)
                    if m.tool and digests != expected[data, m.name]:
                        raise BenchmarkError(f"{data}: {m.name}: digests differ from the warm-up run: {digests}")
                    r.samples_s.append(wall)
                    r.digest_s.append(0.0 if m.tool else digest_outputs(work / "out"))
                    r.cpu_s.append(cpu)
                    r.output_bytes = size
                    print(f"  run {i + 1}/{args.repeat}: {data}: {m.name}: {wall:.2f}s", flush=True)
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
        f"{library_version('zstd', 3)}; tools: {tool_version(['pigz', '--version'])}, "
        f"{tool_version(['zstd', '--version'])}"
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
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


def tool_version(argv: list[str]) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    line = (done.stdout or done.stderr).strip().splitlines()
    return line[0].strip("* ") if line else argv[0]


if __name__ == "__main__":
    sys.exit(main())

"""Measures wall time, throughput and peak RSS of committing one rocker container to a docker-archive.

Compared methods, all on the same generated storage in the same run:

- "original (made loadable)": the seed's method (seed/commit.go): GNU `tar -C <layer>/diff -cf` per layer, run
  one after another, then `sha256sum` of each layer tar, a minimal image config and manifest.json written here
  (the seed has none, so its archive would not load), and a final `tar -cf` of everything; its temporary
  directory is removed at the end, as the seed's deferred RemoveAll does. Made durable as ours is (issue 14:
  "durable writes on both sides"): each layer tar, each JSON file and the archive is fsync'd once written, and
  the archive's directory after it (the seed syncs nothing; these fsyncs are inside its timed run).
- "ours cold": `luigi --module pipeline CommitImage` with an empty cache dir.
- "ours warm": the same with the cache of an earlier run and a new --output: the container did not change, so
  every layer (its own too, keyed by its upper dir's fingerprint) comes from the cache and only the archive is
  written (or hardlinked from the cache while no other archive shares it: each timed archive is deleted after its
  run, so that is the case here).
- "podman commit + save" (only with --podman): an equivalent podman container, committed and saved; the saved
  archive and its directory are fsync'd (podman's own storage writes are podman's business).

Every method runs once untimed first (to warm the page cache, and to validate its archive with
`skopeo inspect docker-archive:...`), then --repeat timed runs, interleaved in alternating order (A B C, C B A,
...), each after an os.sync() so that none pays for another's writeback; the table shows medians.
MB/s is the total size of the three uncompressed layer tars (MB = 10^6 bytes) divided by the median time, the
same byte count for every method (for "ours warm" it is an effective rate: most bytes come from the cache).
Peak RSS is the largest ru_maxrss of the method's child processes, in MiB, read through GNU time when installed
(see common.run_child for why); this script's own work (the original's JSON files) is not included. --json
also records each run's bytes written to storage (/proc/self/io, children included).

The zero-copy case (issue 14): --big-file MB adds one file of MB MiB to the container, and --workdir on a mounted
XFS (reflink) or btrfs puts the storage, the cache and the archives there, so ours clones it where the original
copies it.

Usage: .venv/bin/python benchmarks/commit_benchmark.py [--scale 1.0] [--repeat 3] [--json FILE] [--workdir DIR]
       [--podman] [--big-file MB]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import stat
import statistics
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import common
from common import CONTAINER_ID, MB, BenchmarkError, Usage, run_child

ORIGINAL = "original (made loadable)"
OURS_COLD = "ours cold"
OURS_WARM = "ours warm"
PODMAN = "podman commit + save"
OURS_PODMAN = "ours cold, podman storage"
SLUGS = {
    ORIGINAL: "original",
    OURS_COLD: "ours-cold",
    OURS_WARM: "ours-warm",
    PODMAN: "podman",
    OURS_PODMAN: "ours-podman",
}


# --------------------------------------------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Context:
    root: Path  # storage root
    run_dir: Path  # outputs and logs of this invocation
    luigi: Path
    warm_cache: Path
    podman: list[str] | None = None  # podman argv prefix with --root/--runroot/--storage-driver


def original_commit(ctx: Context, out: Path, log: Path) -> Usage:
    """The seed's commit plus the config it lacks (common.original_commit), every file it writes fsync'd."""
    usage = Usage()
    common.original_commit(ctx.root, CONTAINER_ID, out, log, usage, durable=True)
    return usage


def ours_commit(ctx: Context, out: Path, log: Path, cache: Path) -> Usage:
    usage = Usage()
    argv = common.commit_argv(ctx.luigi, CONTAINER_ID, out, ctx.root, ctx.run_dir / "images", cache)
    run_child(argv, usage, cwd=common.REPO_ROOT, log=log)
    return usage


def ours_cold(ctx: Context, out: Path, log: Path) -> Usage:
    cache = ctx.run_dir / "cache-cold"
    shutil.rmtree(cache, ignore_errors=True)
    try:
        return ours_commit(ctx, out, log, cache)
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def ours_warm(ctx: Context, out: Path, log: Path) -> Usage:
    usage = ours_commit(ctx, out, log, ctx.warm_cache)
    if "running   PackImageLayer(" in log.read_text(errors="replace"):
        raise BenchmarkError(f"warm run repacked an image layer instead of reusing the cache; see {log}")
    return usage


def ours_podman(ctx: Context, out: Path, log: Path) -> Usage:
    """CommitImage reading the same podman store podman commit reads (--storage-engine podman), cold cache."""
    assert ctx.podman is not None
    cache = ctx.run_dir / "cache-podman"
    shutil.rmtree(cache, ignore_errors=True)
    usage = Usage()
    argv = [str(ctx.luigi), "--module", "pipeline", "CommitImage", "--id", "bench-ctr", "--output", str(out)]
    argv += ["--storage-engine", "podman", "--storage-root", ctx.podman[ctx.podman.index("--root") + 1]]
    argv += ["--commit-cache-dir", str(cache), "--local-scheduler"]
    try:
        run_child(argv, usage, cwd=common.REPO_ROOT, log=log)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return usage


def podman_commit(ctx: Context, out: Path, log: Path) -> Usage:
    """`podman commit` of the prepared container, then `podman save` of the new image; the image is removed after."""
    assert ctx.podman is not None
    usage = Usage()
    tag = f"localhost/bench-podman:{out.stem}"
    try:
        run_child([*ctx.podman, "commit", "--quiet", "bench-ctr", tag], usage, log=log)
        run_child([*ctx.podman, "save", "--quiet", "--format", "docker-archive", "-o", str(out), tag], usage, log=log)
        common.fsync_path(out)
        common.fsync_path(out.parent)
    finally:
        subprocess.run([*ctx.podman, "rmi", "--force", tag], capture_output=True, check=False)
    return usage


# --------------------------------------------------------------------------------------------------------------
# podman setup
# --------------------------------------------------------------------------------------------------------------


def apply_diff(diff: Path, merged: Path) -> None:
    """Replay an overlay diff/ onto a mounted container: whiteouts delete, dirs are created, files copied.

    Enough for the generated data (no symlinks, opaque dirs or special files besides whiteouts).
    """
    for dirpath, dirnames, filenames in os.walk(diff):
        rel = Path(dirpath).relative_to(diff)
        for name in [*dirnames, *filenames]:
            src, dst = Path(dirpath) / name, merged / rel / name
            st = src.lstat()
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                if dst.is_dir() and not dst.is_symlink():
                    shutil.rmtree(dst)
                else:
                    dst.unlink(missing_ok=True)
            elif stat.S_ISDIR(st.st_mode):
                dst.mkdir(exist_ok=True)
            elif stat.S_ISREG(st.st_mode):
                shutil.copy2(src, dst)


def ensure_podman(workdir: Path, scale: float, root: Path) -> list[str]:
    """A podman store holding image base+mid (two layers) and container bench-ctr with the container's changes."""
    home = workdir / f"podman-scale{scale:g}"
    # podman refuses a runroot longer than 50 characters, so it lives in /tmp under a name derived from home.
    runroot = Path("/tmp") / f"podrun-{hashlib.sha256(str(home).encode()).hexdigest()[:12]}"
    store = ["--root", str(home / "podroot"), "--runroot", str(runroot), "--storage-driver", "overlay"]
    podman = ["podman", *store]
    if (home / "COMPLETE").exists():
        print(f"podman: reusing {home}")
        return podman
    if home.exists():
        subprocess.run([*podman, "system", "reset", "--force"], capture_output=True, check=False)
        shutil.rmtree(home)
        shutil.rmtree(runroot, ignore_errors=True)
    home.mkdir(parents=True)
    print(f"podman: preparing an equivalent container in {home} ...", flush=True)

    def podman_out(*args: str) -> str:
        done = subprocess.run([*podman, *args], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise BenchmarkError(f"podman {' '.join(args)} failed: {done.stderr.strip()}")
        return done.stdout.strip()

    base_tar = home / "base.tar"
    subprocess.run(
        ["tar", "-C", str(root / "overlay2" / common.BASE_ID / "diff"), "-cf", str(base_tar), "."], check=True
    )
    podman_out("import", "--quiet", "--change", "CMD /bin/sh", str(base_tar), "localhost/bench-base:1")
    base_tar.unlink()
    podman_out("create", "--name", "bench-mid", "localhost/bench-base:1", "/bin/sh")
    apply_diff(root / "overlay2" / common.MID_ID / "diff", Path(podman_out("mount", "bench-mid")))
    podman_out("unmount", "bench-mid")
    podman_out("commit", "--quiet", "bench-mid", "localhost/bench-image:1")
    podman_out("rm", "bench-mid")
    podman_out("create", "--name", "bench-ctr", "localhost/bench-image:1", "/bin/sh")
    apply_diff(root / "overlay2" / CONTAINER_ID / "diff", Path(podman_out("mount", "bench-ctr")))
    podman_out("unmount", "bench-ctr")
    os.sync()
    (home / "COMPLETE").write_text("ok\n")
    return podman


# --------------------------------------------------------------------------------------------------------------
# Validation and reporting
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Result:
    method: str
    samples_s: list[float] = field(default_factory=list)
    maxrss_kib: list[int] = field(default_factory=list)
    write_bytes: list[int] = field(default_factory=list)  # written to storage, this script and its children
    median_s: float = 0.0
    ratio_to_original: float | None = None
    mb_per_s: float = 0.0
    peak_rss_mib: float = 0.0

    @property
    def written_median(self) -> float:
        return statistics.median(self.write_bytes) if self.write_bytes else 0.0


Method = Callable[[Context, Path, Path], Usage]


def timed(method: Method, ctx: Context, out: Path, log: Path) -> tuple[common.Sample, Usage]:
    out.unlink(missing_ok=True)
    sample, usage = common.measure(lambda: method(ctx, out, log))
    if not out.is_file() or out.stat().st_size == 0:
        raise BenchmarkError(f"{out}: no archive was written")
    return sample, usage


def print_table(results: list[Result], image_bytes: int) -> None:
    """The table; "MB written" is the median of each run's bytes written to storage (/proc/self/io write_bytes,
    children included), "x image" that against the layer tars' total."""
    columns = [
        ("method", -26),
        ("median s", 9),
        ("x original", 10),
        ("MB/s", 8),
        ("MB written", 11),
        ("x image", 8),
        ("peak RSS MiB", 13),
    ]
    rows = [
        [
            r.method,
            f"{r.median_s:.2f}",
            f"{r.ratio_to_original:.2f}" if r.ratio_to_original is not None else "-",
            f"{r.mb_per_s:.0f}",
            f"{r.written_median / MB:.1f}",
            f"{r.written_median / image_bytes:.3f}" if image_bytes else "-",
            f"{r.peak_rss_mib:.1f}",
        ]
        for r in results
    ]
    common.print_table(columns, rows)


# --------------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = common.argument_parser(
        __doc__, "pipeline-commit-benchmark", "generated storage (reused), outputs and logs", repeat="method"
    )
    parser.add_argument("--scale", type=float, default=1.0, help="data size factor (1.0: ~484 MB of layers)")
    parser.add_argument("--podman", action="store_true", help="also time podman commit + save")
    parser.add_argument(
        "--big-file",
        type=int,
        default=0,
        metavar="MB",
        help="the container also holds one file of MB MiB (with --workdir on XFS or btrfs: the zero-copy case)",
    )
    args = parser.parse_args(argv)
    if args.scale <= 0 or args.repeat < 1:
        parser.error("--scale must be > 0 and --repeat >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    luigi = common.find_luigi(("tar", "sha256sum", "skopeo"))
    if luigi is None:
        return 2
    workdir: Path = args.workdir
    root = common.ensure_storage(workdir, args.scale, args.big_file << 20)

    run_dir = workdir / "run"
    (common.fresh_dir(run_dir) / "logs").mkdir()
    ctx = Context(root=root, run_dir=run_dir, luigi=luigi, warm_cache=run_dir / "cache-warm")

    methods: dict[str, Method] = {ORIGINAL: original_commit, OURS_COLD: ours_cold, OURS_WARM: ours_warm}
    skipped: dict[str, str] = {}
    if args.podman:
        if shutil.which("podman") is None:
            skipped[PODMAN] = "podman is not on PATH"
        else:
            try:
                ctx.podman = ensure_podman(workdir, args.scale, root)
                methods[PODMAN] = podman_commit
                methods[OURS_PODMAN] = ours_podman
            except (BenchmarkError, OSError, subprocess.CalledProcessError) as e:
                skipped[PODMAN] = f"setup failed: {e}"
    else:
        skipped[PODMAN] = "not requested (pass --podman)"

    results = {name: Result(name) for name in methods}
    try:
        # Warm-up: one untimed run of each, validated. ours cold's warm-up fills the cache ours warm then uses.
        expected: dict[str, list[str]] = {}
        total_bytes = 0
        for name, method in methods.items():
            out = run_dir / f"{SLUGS[name]}-warmup.tar"
            log = run_dir / "logs" / f"{out.stem}.log"
            print(f"warm-up: {name} ...", flush=True)
            if method is ours_cold:
                ours_commit(ctx, out, log, ctx.warm_cache)
            else:
                method(ctx, out, log)
            common.skopeo_check(out)
            expected[name] = common.archive_layers(out)
            if method is ours_cold:
                total_bytes = common.layer_tar_bytes(out)
            out.unlink()
        if expected[OURS_WARM] != expected[OURS_COLD]:
            raise BenchmarkError("ours warm produced different layers than ours cold")

        for i, (name, method) in common.alternating(list(methods.items()), args.repeat):
            out = run_dir / f"{SLUGS[name]}-{i}.tar"
            log = run_dir / "logs" / f"{out.stem}.log"
            sample, usage = timed(method, ctx, out, log)
            if method is not original_commit and common.archive_layers(out) != expected[name]:
                raise BenchmarkError(f"{out}: layers differ from the validated warm-up run of {name}")
            out.unlink()
            results[name].samples_s.append(sample.seconds)
            results[name].maxrss_kib.append(usage.maxrss_kib)
            results[name].write_bytes.append(sample.write_bytes)
            rss = usage.maxrss_kib / 1024
            print(f"  run {i + 1}/{args.repeat}: {name}: {sample.seconds:.2f}s, peak RSS {rss:.1f} MiB", flush=True)
    except BenchmarkError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(ctx.warm_cache, ignore_errors=True)  # ~ the layers' size; the logs stay in run/logs

    rss_source = common.peak_rss_source()
    base = statistics.median(results[ORIGINAL].samples_s)
    for r in results.values():
        r.median_s = statistics.median(r.samples_s)
        r.ratio_to_original = r.median_s / base
        r.mb_per_s = total_bytes / MB / r.median_s
        r.peak_rss_mib = max(r.maxrss_kib) / 1024

    print()
    print(
        f"scale {args.scale:g}, repeat {args.repeat}, layer tars {total_bytes / MB:.0f} MB, "
        f"{os.cpu_count()} CPUs, storage {root}"
    )
    print(f"peak RSS read from: {rss_source}")
    print_table(list(results.values()), total_bytes)
    for name, reason in skipped.items():
        print(f"{name.split()[0]}: skipped ({reason})")
    if args.json:
        doc = {
            "scale": args.scale,
            "repeat": args.repeat,
            "layer_tar_bytes": total_bytes,
            "cpus": os.cpu_count(),
            "peak_rss_source": rss_source,
            "storage_root": str(root),
            "results": [asdict(r) for r in results.values()],
            "skipped": skipped,
        }
        common.write_json(args.json, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())

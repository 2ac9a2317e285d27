"""Measures wall time, throughput and peak RSS of committing one rocker container to a docker-archive.

Compared methods, all on the same generated storage in the same run:

- "original (made loadable)": the seed's method (seed/commit.go): GNU `tar -C <layer>/diff -cf` per layer, run
  one after another, then `sha256sum` of each layer tar, a minimal image config and manifest.json written here
  (the seed has none, so its archive would not load), and a final `tar -cf` of everything; its temporary
  directory is removed at the end, as the seed's deferred RemoveAll does.
- "ours cold": `luigi --module pipeline CommitImage` with an empty cache dir.
- "ours warm": the same with the cache of an earlier run and a new --output: the container did not change, so
  every layer (its own too, keyed by its upper dir's fingerprint) comes from the cache and only the archive is
  written.
- "podman commit + save" (only with --podman): an equivalent podman container, committed and saved.

Every method runs once untimed first (to warm the page cache, and to validate its archive with
`skopeo inspect docker-archive:...`), then --repeat timed runs, interleaved; the table shows medians.
MB/s is the total size of the three uncompressed layer tars (MB = 10^6 bytes) divided by the median time, the
same byte count for every method (for "ours warm" it is an effective rate: most bytes come from the cache).
Peak RSS is the largest ru_maxrss of the method's child processes, in MiB, read through GNU time when installed
(see run_child for why); this script's own work (the original's JSON files) is not included.

Usage: .venv/bin/python benchmarks/commit_benchmark.py [--scale 1.0] [--repeat 3] [--json FILE] [--workdir DIR]
       [--podman]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import os
import random
import shutil
import stat
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO

REPO_ROOT = Path(__file__).resolve().parent.parent
MB = 1_000_000
FORMAT_VERSION = 1  # bump when the generated storage changes, so an old one is rebuilt

# Fixed 64-hex ids: sha256 of fixed strings, the same on every machine and every run.
BASE_ID = hashlib.sha256(b"commit-benchmark base layer").hexdigest()
MID_ID = hashlib.sha256(b"commit-benchmark mid layer").hexdigest()
CONTAINER_ID = hashlib.sha256(b"commit-benchmark container").hexdigest()
CREATED = "2024-01-02T03:04:05Z"
WHITEOUT_DIR = "usr/share/doc"  # a base directory the container deletes (a char device 0/0 in its diff/)

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
# Storage generation
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerSpec:
    """What one generated layer holds: small files spread over directories, then large files up to total_bytes."""

    name: str
    seed: int
    total_bytes: int
    small_files: int
    small_dir: str  # small files go to <small_dir>NNNN/
    large_dir: str
    files_per_dir: int = 50


def layer_specs(scale: float) -> dict[str, LayerSpec]:
    """Base ~300 MB in ~11,000 files, mid ~120 MB; sizes and file counts both scale (same size mix at any scale)."""
    return {
        BASE_ID: LayerSpec("base", 1, int(300 * MB * scale), max(1, round(10_960 * scale)), "usr/lib/pkg", "opt/data"),
        MID_ID: LayerSpec(
            "mid", 2, int(120 * MB * scale), max(1, round(1_000 * scale)), "usr/local/lib/mod", "opt/mid"
        ),
    }


def write_random_file(path: Path, size: int, rng: random.Random) -> None:
    """size incompressible bytes from the seeded generator, written in chunks of at most 4 MiB."""
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 4 << 20)
            f.write(rng.randbytes(n))
            left -= n


def build_layer(diff: Path, spec: LayerSpec, *, whiteout_files: int = 0) -> tuple[int, int]:
    """Fill diff/ per spec; whiteout_files of the small files go to WHITEOUT_DIR. Returns (files, bytes)."""
    rng = random.Random(spec.seed)
    files = written = 0
    for i in range(spec.small_files):
        if i < whiteout_files:
            directory = diff / WHITEOUT_DIR
        else:
            directory = diff / f"{spec.small_dir}{i // spec.files_per_dir:04d}"
        directory.mkdir(parents=True, exist_ok=True)
        size = rng.randint(1024, 16 * 1024)
        write_random_file(directory / f"file{i:05d}.bin", size, rng)
        files += 1
        written += size
    large = diff / spec.large_dir
    large.mkdir(parents=True, exist_ok=True)
    index = 0
    while spec.total_bytes - written >= MB:
        size = min(rng.randint(1 * MB, 10 * MB), spec.total_bytes - written)
        write_random_file(large / f"blob{index:03d}.bin", size, rng)
        files += 1
        written += size
        index += 1
    return files, written


def build_container_layer(diff: Path, scale: float) -> tuple[int, int]:
    """One 64 MB x scale file, ~2,000 x scale small files and a whiteout deleting the base's WHITEOUT_DIR."""
    rng = random.Random(3)
    files = written = 0
    big = diff / "var/lib/app"
    big.mkdir(parents=True)
    size = int(64 * MB * scale)
    write_random_file(big / "data.bin", size, rng)
    files += 1
    written += size
    for i in range(max(1, round(2_000 * scale))):
        directory = diff / f"home/app/cache{i // 100:02d}"
        directory.mkdir(parents=True, exist_ok=True)
        size = rng.randint(1024, 16 * 1024)
        write_random_file(directory / f"f{i:04d}.dat", size, rng)
        files += 1
        written += size
    whiteout = diff / WHITEOUT_DIR
    whiteout.parent.mkdir(parents=True, exist_ok=True)
    os.mknod(whiteout, stat.S_IFCHR | 0o000, os.makedev(0, 0))
    return files + 1, written


def reuse_built(home: Path, wanted: dict[str, object]) -> bool:
    """Whether home holds a complete build for wanted (its COMPLETE.json says so); if not, home is cleared."""
    marker = home / "COMPLETE.json"
    if marker.exists():
        try:
            done = json.loads(marker.read_text())
        except ValueError:
            done = {}
        if {k: done.get(k) for k in wanted} == wanted:
            print(f"storage: reusing {home / 'root'} ({done['files']} files, {done['bytes'] / MB:.0f} MB)")
            return True
    if home.exists():
        shutil.rmtree(home)
    return False


def ensure_storage(workdir: Path, scale: float) -> Path:
    """The storage root for scale under workdir: reused when complete, else (re)built; returns the root."""
    home = workdir / f"storage-scale{scale:g}"
    wanted: dict[str, object] = {"version": FORMAT_VERSION, "scale": scale}
    if reuse_built(home, wanted):
        return home / "root"
    print(f"storage: building {home / 'root'} at scale {scale:g} ...", flush=True)
    start = time.perf_counter()
    root = home / "root"
    specs = layer_specs(scale)
    files = written = 0
    for layer_id, spec in specs.items():
        diff = root / "overlay2" / layer_id / "diff"
        diff.mkdir(parents=True)
        n, size = build_layer(diff, spec, whiteout_files=100 if layer_id == BASE_ID else 0)
        files += n
        written += size
    # rocker writes lower files bottom layer first, relative to overlay2/; the base layer has none.
    (root / "overlay2" / MID_ID / "lower").write_text(f"{BASE_ID}/diff")
    container_diff = root / "overlay2" / CONTAINER_ID / "diff"
    container_diff.mkdir(parents=True)
    n, size = build_container_layer(container_diff, scale)
    files += n
    written += size
    (root / "overlay2" / CONTAINER_ID / "lower").write_text(f"{BASE_ID}/diff:{MID_ID}/diff")
    config = {
        "ID": CONTAINER_ID,
        "Name": "commit-benchmark",
        "Created": CREATED,
        "State": {"Running": False, "Pid": 0},
        "Config": {"Cmd": ["/bin/sh"], "Image": ""},
    }
    (root / "containers" / CONTAINER_ID).mkdir(parents=True)
    (root / "containers" / CONTAINER_ID / "config.json").write_text(json.dumps(config))
    os.sync()
    (home / "COMPLETE.json").write_text(json.dumps({**wanted, "files": files, "bytes": written}))
    print(f"storage: {files} files, {written / MB:.0f} MB in {time.perf_counter() - start:.1f}s")
    return root


def layer_dirs(root: Path) -> list[tuple[str, Path]]:
    """(layer id, diff/) of the container's layers, bottom first, the container's own last."""
    return [(layer_id, root / "overlay2" / layer_id / "diff") for layer_id in (BASE_ID, MID_ID, CONTAINER_ID)]


# --------------------------------------------------------------------------------------------------------------
# Child processes
# --------------------------------------------------------------------------------------------------------------


class BenchmarkError(Exception):
    """A method failed or produced a broken archive; the benchmark stops instead of timing it."""


@dataclass
class Usage:
    """Peak RSS (KiB) over the child processes of one method run."""

    maxrss_kib: int = 0


@functools.cache
def gnu_time() -> str | None:
    """/usr/bin/time if it is GNU time (its -f %M is the child's ru_maxrss in KiB), else None."""
    path = "/usr/bin/time"
    try:
        done = subprocess.run([path, "--version"], capture_output=True, text=True, check=False)
    except OSError:
        return None
    return path if "GNU" in done.stdout + done.stderr else None


def run_child(
    argv: list[str], usage: Usage, *, cwd: Path | None = None, log: Path | None = None, capture: bool = False
) -> bytes:
    """Run argv to completion (Popen, then os.wait4 on its pid), fold its peak RSS into usage, return its stdout.

    os.wait4 gives the child's own rusage, and Linux folds into its ru_maxrss the peak of every descendant the
    child itself waited for (luigi's local scheduler runs tasks in-process anyway). resource.getrusage(
    RUSAGE_CHILDREN) would be the fallback, but its ru_maxrss is the maximum over all children ever waited, so a
    delta only shows a child that beat every earlier one; hence one wait4 per pid.

    But a child's ru_maxrss also counts the memory of the process that forked it: exec records the old address
    space's high-water mark, and with vfork (what subprocess uses) that is this script's own peak RSS. So when GNU
    time is installed the child runs under `time -f %M`, which forks it from a ~1 MiB process and reports the
    child's ru_maxrss from its own wait4; the reading from our wait4 (of time) is then only the fallback.
    """
    timer = gnu_time()
    with contextlib.ExitStack() as stack:
        err: IO[bytes] | int = stack.enter_context(open(log, "ab")) if log else subprocess.DEVNULL
        rss_file = None
        if timer:
            fd, name = tempfile.mkstemp(prefix="maxrss-")
            os.close(fd)
            rss_file = Path(name)
            stack.callback(rss_file.unlink, missing_ok=True)
            argv = [timer, "-f", "%M", "-o", str(rss_file), *argv]
        proc = subprocess.Popen(
            argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE if capture else err, stderr=err
        )
        out = b""
        if proc.stdout:
            with proc.stdout:
                out = proc.stdout.read()
        _, status, rusage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)  # so Popen never waits for the reaped pid
        maxrss = rusage.ru_maxrss
        if rss_file:
            # "<KiB>" alone, or after a line such as "Command exited with non-zero status 2".
            lines = rss_file.read_text().split()
            maxrss = int(lines[-1]) if lines and lines[-1].isdigit() else maxrss
    usage.maxrss_kib = max(usage.maxrss_kib, maxrss)
    if proc.returncode != 0:
        detail = ""
        if log and log.exists():
            detail = "\n" + "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise BenchmarkError(f"{' '.join(argv)} exited with {proc.returncode}{detail}")
    return out


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
    """The seed's commit plus the config it lacks: tar per layer, sha256sum, config + manifest, tar of all."""
    usage = Usage()
    tmp = out.with_suffix(".tmpdir")
    tmp.mkdir()
    try:
        members = []
        for layer_id, diff in layer_dirs(ctx.root):
            (tmp / layer_id).mkdir(mode=0o700)
            run_child(["tar", "-C", str(diff), "-cf", str(tmp / layer_id / "layer.tar"), "."], usage, log=log)
            members.append(f"{layer_id}/layer.tar")
        diff_ids = []
        for member in members:
            line = run_child(["sha256sum", str(tmp / member)], usage, log=log, capture=True)
            diff_ids.append("sha256:" + line.split()[0].decode())
        config = json.dumps(
            {
                "architecture": "amd64",
                "os": "linux",
                "created": CREATED,
                "config": {"Cmd": ["/bin/sh"]},
                "rootfs": {"type": "layers", "diff_ids": diff_ids},
            }
        ).encode()
        config_hex = hashlib.sha256(config).hexdigest()
        (tmp / f"{config_hex}.json").write_bytes(config)
        manifest = [{"Config": f"{config_hex}.json", "RepoTags": ["bench/original:latest"], "Layers": members}]
        (tmp / "manifest.json").write_text(json.dumps(manifest))
        (tmp / "repositories").write_text(json.dumps({"bench/original": {"latest": config_hex}}))
        files = [*members, f"{config_hex}.json", "repositories", "manifest.json"]
        run_child(["tar", "-C", str(tmp), "-cf", str(out), *files], usage, log=log)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return usage


def ours_commit(ctx: Context, out: Path, log: Path, cache: Path) -> Usage:
    usage = Usage()
    argv = [
        str(ctx.luigi),
        "--module",
        "pipeline",
        "CommitImage",
        "--id",
        CONTAINER_ID,
        "--image",
        "bench/ours:latest",
        "--output",
        str(out),
        "--storage-root",
        str(ctx.root),
        "--commit-output-dir",
        str(ctx.run_dir / "images"),
        "--commit-cache-dir",
        str(cache),
        "--local-scheduler",
    ]
    run_child(argv, usage, cwd=REPO_ROOT, log=log)
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
        run_child(argv, usage, cwd=REPO_ROOT, log=log)
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
    subprocess.run(["tar", "-C", str(root / "overlay2" / BASE_ID / "diff"), "-cf", str(base_tar), "."], check=True)
    podman_out("import", "--quiet", "--change", "CMD /bin/sh", str(base_tar), "localhost/bench-base:1")
    base_tar.unlink()
    podman_out("create", "--name", "bench-mid", "localhost/bench-base:1", "/bin/sh")
    apply_diff(root / "overlay2" / MID_ID / "diff", Path(podman_out("mount", "bench-mid")))
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


def archive_layers(path: Path) -> list[str]:
    """The Layers of a docker-archive's manifest.json (its member names)."""
    with tarfile.open(path) as tar:
        member = tar.extractfile("manifest.json")
        if member is None:
            raise BenchmarkError(f"{path}: manifest.json is not a file")
        layers: list[str] = json.loads(member.read())[0]["Layers"]
    return layers


def layer_tar_bytes(path: Path) -> int:
    """Total size of the layer tars a docker-archive's manifest names."""
    layers = set(archive_layers(path))
    with tarfile.open(path) as tar:
        return sum(m.size for m in tar.getmembers() if m.name in layers)


def skopeo_check(path: Path) -> None:
    done = subprocess.run(["skopeo", "inspect", f"docker-archive:{path}"], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise BenchmarkError(f"skopeo inspect docker-archive:{path} failed: {done.stderr.strip()}")


@dataclass
class Result:
    method: str
    samples_s: list[float] = field(default_factory=list)
    maxrss_kib: list[int] = field(default_factory=list)
    median_s: float = 0.0
    ratio_to_original: float | None = None
    mb_per_s: float = 0.0
    peak_rss_mib: float = 0.0


Method = Callable[[Context, Path, Path], Usage]


def timed(method: Method, ctx: Context, out: Path, log: Path) -> tuple[float, Usage]:
    out.unlink(missing_ok=True)
    start = time.perf_counter()
    usage = method(ctx, out, log)
    elapsed = time.perf_counter() - start
    if not out.is_file() or out.stat().st_size == 0:
        raise BenchmarkError(f"{out}: no archive was written")
    return elapsed, usage


def print_table(results: list[Result]) -> None:
    header = f"{'method':<26} {'median s':>9} {'x original':>10} {'MB/s':>8} {'peak RSS MiB':>13}"
    print(header)
    print("-" * len(header))
    for r in results:
        ratio = f"{r.ratio_to_original:.2f}" if r.ratio_to_original is not None else "-"
        print(f"{r.method:<26} {r.median_s:>9.2f} {ratio:>10} {r.mb_per_s:>8.0f} {r.peak_rss_mib:>13.1f}")


# --------------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--scale", type=float, default=1.0, help="data size factor (1.0: ~484 MB of layers)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per method (median reported)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON to this file")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "pipeline-commit-benchmark",
        help="generated storage (reused), outputs and logs",
    )
    parser.add_argument("--podman", action="store_true", help="also time podman commit + save")
    args = parser.parse_args(argv)
    if args.scale <= 0 or args.repeat < 1:
        parser.error("--scale must be > 0 and --repeat >= 1")
    return args


def find_luigi(tools: tuple[str, ...]) -> Path | None:
    """The venv's luigi once every tool is on PATH; None, after an error line, when something is missing."""
    for tool in tools:
        if shutil.which(tool) is None:
            print(f"error: {tool} is not on PATH", file=sys.stderr)
            return None
    luigi = Path(sys.executable).parent / "luigi"
    if not luigi.exists():
        print(f"error: {luigi} not found; run with the project's .venv/bin/python", file=sys.stderr)
        return None
    return luigi


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    luigi = find_luigi(("tar", "sha256sum", "skopeo"))
    if luigi is None:
        return 2
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    root = ensure_storage(workdir, args.scale)

    run_dir = workdir / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    (run_dir / "logs").mkdir(parents=True)
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
            skopeo_check(out)
            expected[name] = archive_layers(out)
            if method is ours_cold:
                total_bytes = layer_tar_bytes(out)
            out.unlink()
        if expected[OURS_WARM] != expected[OURS_COLD]:
            raise BenchmarkError("ours warm produced different layers than ours cold")

        for i in range(args.repeat):
            for name, method in methods.items():
                out = run_dir / f"{SLUGS[name]}-{i}.tar"
                log = run_dir / "logs" / f"{out.stem}.log"
                elapsed, usage = timed(method, ctx, out, log)
                if method is not original_commit and archive_layers(out) != expected[name]:
                    raise BenchmarkError(f"{out}: layers differ from the validated warm-up run of {name}")
                out.unlink()
                results[name].samples_s.append(elapsed)
                results[name].maxrss_kib.append(usage.maxrss_kib)
                rss = usage.maxrss_kib / 1024
                print(f"  run {i + 1}/{args.repeat}: {name}: {elapsed:.2f}s, peak RSS {rss:.1f} MiB", flush=True)
    except BenchmarkError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(ctx.warm_cache, ignore_errors=True)  # ~ the layers' size; the logs stay in run/logs

    rss_source = "GNU time %M (child's wait4 ru_maxrss)" if gnu_time() else "os.wait4 (floored at this script's RSS)"
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
    print_table(list(results.values()))
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
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

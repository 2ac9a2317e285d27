"""Measures our commit of a Docker Engine container against `docker commit` + `docker save` of the same container.

The Docker Engine is a private, offline dockerd (tests/support/dockerd.py: Debian's docker.io, overlay2, its own
data-root, exec-root, socket and containerd under --workdir; no bridge, no iptables, containers with --network
none), started for the run and always stopped at its end. The client is /usr/bin/docker, whatever comes first on
PATH.

The containers, one per --size, have commit_benchmark's shape (its generated layer dirs, common.ensure_storage, at
scale 1 for "large" and 0.02 for "small"), built offline:

- image layer 1: `docker import` of a busybox-static root filesystem plus the generated base layer (large: ~300 MB
  in ~11,000 files; 100 of them in usr/share/doc);
- image layer 2: a container of that image into which the generated middle layer is `docker cp`'d (large:
  ~120 MB in ~1,000 files), then `docker commit`ted;
- the container: `docker run -d ... sleep` of that image, the generated container layer `docker cp`'d into it
  (large: one 64 MB file and ~2,000 small files), and `docker exec rm -rf /usr/share/doc` (a whiteout). It keeps
  running, so both sides pause it while they read its layer (docker commit's default, and ours').
"small" is ~10 MB of generated files (base 6 MB, middle 2.4 MB, container 1.6 MB), 12.3 MB of layer tars with
busybox; "large" 514 MB of layer tars.

Compared, on the same container in the same run:

- "docker commit + save": `docker commit CONTAINER REF`, `docker save -o FILE REF`, then fsync of FILE and its
  directory (ours fsyncs everything it writes); `docker rmi REF` afterwards, outside the timing.
- "ours cold": `luigi --module pipeline CommitImage --id CONTAINER --storage-engine docker --storage-root
  <dockerd's data-root> --output FILE` (as tests/test_docker_engine.py runs it), with a new, empty cache dir
  (removed afterwards, outside the timing).
- "ours warm, ctr changed": the same with a cache that holds the image layers and an older state of the
  container's layer: before each such run (untimed) `docker exec CONTAINER touch /tmp/bench-N` changes the
  container, so its layer is packed again and the image layers come from the cache. The repeated commit of a
  running container.
- "ours warm, unchanged": the same cache with the container unchanged: only the archive is written (or, since
  archives are assembled in place, hardlinked from the cache while no other archive shares it: every timed
  archive here is deleted after its run, so that is the case).

Every method runs once untimed first, and its archive is validated (`skopeo inspect docker-archive:FILE`; ours'
image layers must have the diff_ids docker save gives them). Then --repeat timed runs per method in alternating
order (A B C D, D C B A, ...), each after an os.sync(); the table shows medians and the min-max spread.
"x docker" is the median time against docker commit + save's median in the same run. "CPU s" and "MB written"
cover the whole process tree: this script and the children it waited for (/proc/self/io, as common.measure),
plus dockerd, its containerd and their shims, whose /proc/<pid>/io and /proc/<pid>/stat deltas over the run are
added (docker commit and save do their work in dockerd). MB written is write_bytes less cancelled_write_bytes
(bytes dirtied, less those deleted before writeback: docker save's temporary copy under the data-root is
largely cancelled that way). "x image" is MB written against the image's layer tars (docker save's). Peak RSS is
ours' (common.run_child: luigi and its workers); docker's work happens in dockerd, whose high-water mark is printed
under the table.

Targets (issue 14): ours cold <= 0.4x docker commit + save for the large (300 MB) container, <= 1.0x for the
small (10 MB) one; printed met or MISSED, the exit code stays 0. A failed method or a broken archive exits 1.
Needs root (dockerd runs only as root here); otherwise it prints why and exits 0 without running.

Usage: .venv/bin/python benchmarks/docker_benchmark.py [--size small|large|both] [--repeat 3] [--json FILE]
       [--workdir DIR]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import stat
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import common
from common import MB, BenchmarkError, Usage, run_child

sys.path.insert(0, str(common.REPO_ROOT))  # tests/ is the repository's own package, not installed
from tests.support import dockerd as private  # noqa: E402

SCALES = {"small": 0.02, "large": 1.0}
TARGETS = {"small": 1.0, "large": 0.4}  # ours cold / docker commit + save (issue 14)

DOCKER = "docker commit + save"
OURS_COLD = "ours cold"
OURS_CHANGED = "ours warm, ctr changed"
OURS_WARM = "ours warm, unchanged"
SLUGS = {DOCKER: "docker", OURS_COLD: "ours-cold", OURS_CHANGED: "ours-changed", OURS_WARM: "ours-warm"}


# --------------------------------------------------------------------------------------------------------------
# The private dockerd and the containers
# --------------------------------------------------------------------------------------------------------------


def client(d: private.Dockerd) -> list[str]:
    """/usr/bin/docker talking to the private dockerd, with its own client config dir."""
    return [str(private.DOCKER), "--config", d.client_env["DOCKER_CONFIG"], "-H", f"unix://{d.socket}"]


def docker_out(d: private.Dockerd, *args: str) -> str:
    """An untimed docker command's stdout; BenchmarkError with its stderr when it fails."""
    done = subprocess.run([*client(d), *args], capture_output=True, text=True, check=False, timeout=600)
    if done.returncode != 0:
        raise BenchmarkError(f"docker {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout.strip()


def whiteouts_in(diff: Path) -> list[str]:
    """Paths (relative) of the overlay whiteouts (char devices 0/0) in a generated diff/."""
    found = []
    for dirpath, dirnames, filenames in os.walk(diff):
        for name in [*dirnames, *filenames]:
            st = os.lstat(os.path.join(dirpath, name))
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                found.append(os.path.relpath(os.path.join(dirpath, name), diff))
    return sorted(found)


def copy_diff_into(d: private.Dockerd, container: str, diff: Path) -> None:
    """`docker cp -` of a generated diff/ into a container's root (through its mounted root filesystem, as any
    docker cp), then `docker exec rm -rf` for each of its whiteouts (the container must run for those)."""
    whiteouts = whiteouts_in(diff)
    names = sorted(os.listdir(diff))
    excludes = [f"--exclude={path}" for path in whiteouts]
    tar = subprocess.Popen(["tar", "-C", str(diff), *excludes, "-cf", "-", *names], stdout=subprocess.PIPE)
    assert tar.stdout is not None
    with tar.stdout:
        done = subprocess.run([*client(d), "cp", "-", f"{container}:/"], stdin=tar.stdout, capture_output=True)
    if tar.wait() != 0 or done.returncode != 0:
        raise BenchmarkError(f"docker cp of {diff} into {container} failed: {done.stderr.decode().strip()}")
    if whiteouts:
        docker_out(d, "exec", container, "rm", "-rf", *(f"/{path}" for path in whiteouts))


@dataclass(frozen=True)
class Prepared:
    """One size's running container in the private dockerd."""

    size: str
    scale: float
    container: str
    image: str


def prepare_container(d: private.Dockerd, workdir: Path, size: str, scale: float) -> Prepared:
    """The image (busybox + base, then middle) and the running container with its own layer, for one size."""
    root = common.ensure_storage(workdir, scale)
    base_diff, mid_diff, ctr_diff = (path for _, path in common.layer_dirs(root))
    print(f"docker: building the {size} container (scale {scale:g}) ...", flush=True)
    start = time.perf_counter()
    base_ref, image_ref = f"bench/{size}-base:1", f"bench/{size}-image:1"
    base_tar = workdir / f"{size}-base.tar"
    try:
        base_tar.write_bytes(private.busybox_rootfs_tar())
        subprocess.run(
            ["tar", "-C", str(base_diff), "--append", "-f", str(base_tar), *sorted(os.listdir(base_diff))],
            check=True,
        )
        docker_out(d, "import", "--change", 'CMD ["sh"]', str(base_tar), base_ref)
    finally:
        base_tar.unlink(missing_ok=True)
    mid = f"{size}-mid"
    docker_out(d, "create", "--network", "none", "--name", mid, base_ref, "sh")
    copy_diff_into(d, mid, mid_diff)
    docker_out(d, "commit", mid, image_ref)
    docker_out(d, "rm", mid)
    container = f"{size}-ctr"
    docker_out(d, "run", "--detach", "--network", "none", "--name", container, image_ref, "sleep", "100000000")
    copy_diff_into(d, container, ctr_diff)
    os.sync()
    print(f"docker: {container} ready in {time.perf_counter() - start:.1f}s", flush=True)
    return Prepared(size, scale, container, image_ref)


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below path (so that nothing is ever removed through a mount)."""
    prefix = str(path)
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4].encode().decode("unicode_escape") for line in f]
    return [p for p in points if p == prefix or p.startswith(prefix + "/")]


def daemon_pids(d: private.Dockerd) -> list[int]:
    """dockerd, its containerd and the shims: every process whose command line names the private exec-root."""
    needle = os.fsencode(d.exec_root) + b"/"
    pids = {p.pid for p in (d.process, d.containerd) if p is not None}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if needle in (entry / "cmdline").read_bytes():
                    pids.add(int(entry.name))
            except OSError:
                continue
    return sorted(pids)


def read_pid_io(pid: int) -> tuple[int, float]:
    """(write_bytes - cancelled_write_bytes, CPU seconds) of a process, its reaped children included (Linux adds
    a child's I/O and CPU to its parent's when the parent waits for it); (0, 0.0) when it is gone."""
    try:
        with open(f"/proc/{pid}/io") as f:
            io = {key: int(value) for key, value in (line.split(":") for line in f)}
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0, 0.0
    ticks = sum(int(fields[i]) for i in (11, 12, 13, 14))  # utime, stime, cutime, cstime
    return io["write_bytes"] - io["cancelled_write_bytes"], ticks / os.sysconf("SC_CLK_TCK")


def measure_tree(fn: Callable[[], Usage], pids: list[int]) -> tuple[common.Sample, Usage]:
    """common.measure (after an os.sync()) plus the daemons' writes and CPU over the same span."""
    os.sync()
    before = {pid: read_pid_io(pid) for pid in pids}
    sample, usage = common.measure(fn, sync=False)
    after = {pid: read_pid_io(pid) for pid in pids}
    written = sum(after[p][0] - before[p][0] for p in pids if after[p] != (0, 0.0))
    cpu = sum(after[p][1] - before[p][1] for p in pids if after[p] != (0, 0.0))
    return replace(sample, write_bytes=sample.write_bytes + written, cpu_seconds=sample.cpu_seconds + cpu), usage


def vm_hwm_mib(pid: int) -> float:
    """A process's peak RSS since it started (VmHWM), MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


# --------------------------------------------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Context:
    d: private.Dockerd
    prepared: Prepared
    run_dir: Path
    luigi: Path
    warm_cache: Path
    changes: int = 0  # how many times the container was changed for OURS_CHANGED

    @property
    def slug(self) -> str:
        return self.prepared.size


def docker_commit_save(ctx: Context, out: Path, log: Path, usage: Usage) -> None:
    """docker commit + docker save -o, the output made durable; the image is removed by docker_cleanup."""
    ref = f"bench/docker:{out.stem}"
    run_child([*client(ctx.d), "commit", ctx.prepared.container, ref], usage, log=log, capture=True)
    run_child([*client(ctx.d), "save", "-o", str(out), ref], usage, log=log)
    common.fsync_path(out)
    common.fsync_path(out.parent)


def docker_cleanup(ctx: Context, out: Path) -> None:
    docker_out(ctx.d, "rmi", f"bench/docker:{out.stem}")


def ours_commit(ctx: Context, out: Path, log: Path, usage: Usage, cache: Path) -> None:
    """CommitImage from dockerd's storage, as tests/test_docker_engine.py runs it."""
    argv = common.commit_argv(
        ctx.luigi, ctx.prepared.container, out, ctx.d.root, ctx.run_dir / "images", cache, "--storage-engine", "docker"
    )
    run_child(argv, usage, cwd=common.REPO_ROOT, log=log)


def cold_cache(ctx: Context) -> Path:
    return ctx.run_dir / f"{ctx.slug}-cache-cold"


def ours_cold(ctx: Context, out: Path, log: Path, usage: Usage) -> None:
    ours_commit(ctx, out, log, usage, cold_cache(ctx))


def ours_warm(ctx: Context, out: Path, log: Path, usage: Usage) -> None:
    ours_commit(ctx, out, log, usage, ctx.warm_cache)


def change_container(ctx: Context) -> None:
    """An untimed change to the running container: one new empty file in its layer."""
    ctx.changes += 1
    docker_out(ctx.d, "exec", ctx.prepared.container, "touch", f"/tmp/bench-{ctx.changes}")


def check_ran(log: Path, method: str) -> None:
    """The warm runs pack what they should: no image layer, and the container's layer only when it changed."""
    text = log.read_text(errors="replace")
    if "running   PackImageLayer(" in text:
        raise BenchmarkError(f"{method}: an image layer was packed again instead of coming from the cache; see {log}")
    packed = "running   PackContainerLayer(" in text
    if packed != (method == OURS_CHANGED):
        raise BenchmarkError(f"{method}: the container's layer was {'' if packed else 'not '}packed; see {log}")


Method = Callable[[Context, Path, Path, Usage], None]
METHODS: dict[str, Method] = {
    DOCKER: docker_commit_save,
    OURS_COLD: ours_cold,
    OURS_CHANGED: ours_warm,
    OURS_WARM: ours_warm,
}


def run_method(method: Method, ctx: Context, out: Path, log: Path, usage: Usage) -> Usage:
    method(ctx, out, log, usage)
    return usage


def before_run(ctx: Context, name: str) -> None:
    """Untimed set-up of one run: an empty cold cache, a changed container."""
    if name == OURS_COLD:
        shutil.rmtree(cold_cache(ctx), ignore_errors=True)
    elif name == OURS_CHANGED:
        change_container(ctx)


def after_run(ctx: Context, name: str, out: Path, log: Path) -> None:
    """Untimed clean-up and checks of one run."""
    if name == DOCKER:
        docker_cleanup(ctx, out)
    elif name == OURS_COLD:
        shutil.rmtree(cold_cache(ctx), ignore_errors=True)
    else:
        check_ran(log, name)


# --------------------------------------------------------------------------------------------------------------
# Validation and reporting
# --------------------------------------------------------------------------------------------------------------


def skopeo_layers(path: Path) -> list[str]:
    """The layer digests skopeo reads from a docker-archive (diff_ids: the layers are uncompressed)."""
    done = subprocess.run(["skopeo", "inspect", f"docker-archive:{path}"], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise BenchmarkError(f"skopeo inspect docker-archive:{path} failed: {done.stderr.strip()}")
    layers: list[str] = json.loads(done.stdout)["Layers"]
    return layers


@dataclass
class Result:
    size: str
    method: str
    samples_s: list[float] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)
    write_bytes: list[int] = field(default_factory=list)
    maxrss_kib: list[int] = field(default_factory=list)
    archive_bytes: int = 0
    median_s: float = 0.0
    ratio_to_docker: float = 0.0


@dataclass
class SizeReport:
    size: str
    scale: float
    layer_tar_bytes: int
    results: list[Result]
    dockerd_hwm_mib: float
    docker_client_rss_mib: float
    notes: list[str]


def print_report(report: SizeReport) -> None:
    columns = [
        ("method", -24),
        ("median s", 9),
        ("spread", 11),
        ("x docker", 8),
        ("CPU s", 6),
        ("MB written", 11),
        ("x image", 8),
        ("peak RSS MiB", 13),
    ]
    rows = []
    for r in report.results:
        written = statistics.median(r.write_bytes)
        rows.append(
            [
                r.method,
                f"{r.median_s:.2f}",
                common.spread(r.samples_s),
                f"{r.ratio_to_docker:.2f}",
                f"{statistics.median(r.cpu_s):.2f}",
                f"{written / MB:.1f}",
                f"{written / report.layer_tar_bytes:.2f}",
                "-" if r.method == DOCKER else f"{max(r.maxrss_kib) / 1024:.1f}",
            ]
        )
    print()
    tars = report.layer_tar_bytes / MB
    print(f"{report.size}: scale {report.scale:g}, image layer tars {tars:.1f} MB (docker save's)")
    common.print_table(columns, rows)
    print(
        f"docker's peak RSS: dockerd VmHWM {report.dockerd_hwm_mib:.1f} MiB (since it started, all sizes), "
        f"the docker client {report.docker_client_rss_mib:.1f} MiB"
    )
    cold = next(r for r in report.results if r.method == OURS_COLD)
    target = TARGETS[report.size]
    print(
        f"target: ours cold <= {target:g}x docker commit + save: {cold.ratio_to_docker:.2f}x, "
        f"{common.verdict(cold.ratio_to_docker <= target)}"
    )
    for note in report.notes:
        print(f"note: {note}")


# --------------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------------


def run_size(ctx: Context, repeat: int) -> SizeReport:
    """Warm-up and validation, then the timed rounds, for one prepared container."""
    size = ctx.prepared.size
    logs = ctx.run_dir / "logs"
    results = {name: Result(size, name) for name in METHODS}
    notes: list[str] = []
    client_rss = Usage()
    pids = daemon_pids(ctx.d)

    layers: dict[str, list[str]] = {}
    image_bytes = 0
    for name, method in METHODS.items():
        out = ctx.run_dir / f"{size}-{SLUGS[name]}-warmup.tar"
        log = logs / f"{out.stem}.log"
        print(f"warm-up: {size}: {name} ...", flush=True)
        before_run(ctx, name)
        # ours cold's warm-up fills the cache the warm methods use.
        usage = Usage()
        if name == OURS_COLD:
            ours_commit(ctx, out, log, usage, ctx.warm_cache)
        else:
            method(ctx, out, log, usage)
        layers[name] = skopeo_layers(out)
        results[name].archive_bytes = out.stat().st_size
        if name == DOCKER:
            image_bytes = common.layer_tar_bytes(out)
        else:
            warnings = [line for line in log.read_text(errors="replace").splitlines() if " WARNING " in line]
            notes += [f"{name}: {line}" for line in warnings[:3]]
        after_run(ctx, name, out, log)
        out.unlink()
    docker_layers = layers[DOCKER]
    for name, found in layers.items():
        if len(found) != len(docker_layers) or found[:-1] != docker_layers[:-1]:
            raise BenchmarkError(f"{size}: {name}'s layers {found} are not docker save's image layers {docker_layers}")
    n = len(docker_layers) - 1
    notes.append(f"every archive passes skopeo inspect; ours' {n} image layers have docker's diff_ids")

    for i, name in common.alternating(list(METHODS), repeat):
        out = ctx.run_dir / f"{size}-{SLUGS[name]}-{i}.tar"
        log = logs / f"{out.stem}.log"
        out.unlink(missing_ok=True)
        before_run(ctx, name)
        usage = Usage()
        sample, _ = measure_tree(functools.partial(run_method, METHODS[name], ctx, out, log, usage), pids)
        if not out.is_file() or out.stat().st_size == 0:
            raise BenchmarkError(f"{out}: no archive was written")
        if len(common.archive_layers(out)) != len(docker_layers):
            raise BenchmarkError(f"{out}: not {len(docker_layers)} layers")
        after_run(ctx, name, out, log)
        out.unlink()
        r = results[name]
        r.samples_s.append(sample.seconds)
        r.cpu_s.append(sample.cpu_seconds)
        r.write_bytes.append(sample.write_bytes)
        r.maxrss_kib.append(usage.maxrss_kib)
        if name == DOCKER:
            client_rss.maxrss_kib = max(client_rss.maxrss_kib, usage.maxrss_kib)
        print(
            f"  {size} round {i + 1}/{repeat}: {name}: {sample.seconds:.2f}s, "
            f"{sample.write_bytes / MB:.1f} MB written, peak RSS {usage.maxrss_kib / 1024:.1f} MiB",
            flush=True,
        )

    base = statistics.median(results[DOCKER].samples_s)
    for r in results.values():
        r.median_s = statistics.median(r.samples_s)
        r.ratio_to_docker = r.median_s / base
    assert ctx.d.process is not None
    return SizeReport(
        size,
        ctx.prepared.scale,
        image_bytes,
        list(results.values()),
        vm_hwm_mib(ctx.d.process.pid),
        client_rss.maxrss_kib / 1024,
        notes,
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = common.argument_parser(
        __doc__,
        "pipeline-docker-benchmark",
        "generated layer dirs (reused), the private dockerd (made anew each run), outputs and logs",
        repeat="method",
    )
    parser.add_argument("--size", choices=("small", "large", "both"), default="both", help="which container(s)")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    reason = private.docker_missing_reason()
    if reason:
        print(f"docker_benchmark: skipped: {reason}", file=sys.stderr)
        return 0
    luigi = common.find_luigi(("tar", "skopeo"))
    if luigi is None:
        return 2
    workdir: Path = args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    base = workdir / "dockerd"
    if mounts_under(base):
        print(f"error: mounts remain under {base} (an earlier run's dockerd?): {mounts_under(base)}", file=sys.stderr)
        return 1
    shutil.rmtree(base, ignore_errors=True)
    run_dir = workdir / "run"
    (common.fresh_dir(run_dir) / "logs").mkdir()
    sizes = ["small", "large"] if args.size == "both" else [args.size]
    load_start = os.getloadavg()

    reports: list[SizeReport] = []
    print(f"dockerd: starting a private one under {base} ...", flush=True)
    d = private.start_dockerd(base)
    try:
        for size in sizes:
            prepared = prepare_container(d, workdir, size, SCALES[size])
            ctx = Context(d, prepared, run_dir, luigi, run_dir / f"{size}-cache-warm")
            try:
                reports.append(run_size(ctx, args.repeat))
            finally:
                shutil.rmtree(ctx.warm_cache, ignore_errors=True)
                shutil.rmtree(cold_cache(ctx), ignore_errors=True)
    except (BenchmarkError, subprocess.CalledProcessError, AssertionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        d.stop()
        if mounts_under(base):
            print(f"warning: mounts remain under {base}: {mounts_under(base)}; not removing it", file=sys.stderr)
        else:
            shutil.rmtree(base, ignore_errors=True)
    load_end = os.getloadavg()

    print()
    print(
        f"repeat {args.repeat}, {os.cpu_count()} CPUs, load average {load_start[0]:.2f} at start, "
        f"{load_end[0]:.2f} at end; {private.DOCKER} {common.tool_version([str(private.DOCKER), '--version'])}"
    )
    print(f"peak RSS read from: {common.peak_rss_source()}")
    for report in reports:
        print_report(report)
    if args.json:
        doc = {
            "repeat": args.repeat,
            "cpus": os.cpu_count(),
            "load_average": [load_start, load_end],
            "peak_rss_source": common.peak_rss_source(),
            "sizes": [asdict(report) for report in reports],
        }
        common.write_json(args.json, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())

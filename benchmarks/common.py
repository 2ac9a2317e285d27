"""What the benchmark scripts share: the generated rocker storage, the seed's commit, SnapshotAll runs and what they
wrote, timed runs in alternating order, the peak RSS and I/O of what ran, and the tables they print.

The scripts run as `python benchmarks/<name>.py`, which puts this directory first on sys.path: `import common`
finds this module with no path set-up.
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import functools
import hashlib
import json
import os
import random
import re
import resource
import shutil
import stat
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import IO, TypeVar

T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parent.parent
MB = 1_000_000


class BenchmarkError(Exception):
    """A method failed or produced a broken output; the benchmark stops instead of timing it."""


# --------------------------------------------------------------------------------------------------------------
# The generated rocker storage: a two-layer image and one container on it
# --------------------------------------------------------------------------------------------------------------

STORAGE_VERSION = 1  # bump when the generated storage changes, so an old one is rebuilt

# Fixed 64-hex ids: sha256 of fixed strings, the same on every machine and every run.
BASE_ID = hashlib.sha256(b"commit-benchmark base layer").hexdigest()
MID_ID = hashlib.sha256(b"commit-benchmark mid layer").hexdigest()
CONTAINER_ID = hashlib.sha256(b"commit-benchmark container").hexdigest()
CREATED = "2024-01-02T03:04:05Z"
WHITEOUT_DIR = "usr/share/doc"  # a base directory the container deletes (a char device 0/0 in its diff/)


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


def write_small_file(path: Path, rng: random.Random) -> int:
    """A file of 1-16 KiB of random bytes (its directory created if need be); returns its size."""
    path.parent.mkdir(parents=True, exist_ok=True)
    size = rng.randint(1024, 16 * 1024)
    write_random_file(path, size, rng)
    return size


def build_layer(diff: Path, spec: LayerSpec, *, whiteout_files: int = 0) -> tuple[int, int]:
    """Fill diff/ per spec; whiteout_files of the small files go to WHITEOUT_DIR. Returns (files, bytes)."""
    rng = random.Random(spec.seed)
    files = written = 0
    for i in range(spec.small_files):
        if i < whiteout_files:
            directory = diff / WHITEOUT_DIR
        else:
            directory = diff / f"{spec.small_dir}{i // spec.files_per_dir:04d}"
        written += write_small_file(directory / f"file{i:05d}.bin", rng)
        files += 1
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


def build_image_layers(root: Path, scale: float) -> tuple[int, int]:
    """The image's base and mid layers under root/overlay2, mid's lower file naming base. Returns (files, bytes).

    The base puts its first 100 small files in WHITEOUT_DIR (file00000.bin ...), for containers to delete.
    """
    files = written = 0
    for layer_id, spec in layer_specs(scale).items():
        diff = root / "overlay2" / layer_id / "diff"
        diff.mkdir(parents=True)
        n, size = build_layer(diff, spec, whiteout_files=100 if layer_id == BASE_ID else 0)
        files += n
        written += size
    # rocker writes lower files bottom layer first, relative to overlay2/; the base layer has none.
    (root / "overlay2" / MID_ID / "lower").write_text(f"{BASE_ID}/diff")
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
        written += write_small_file(diff / f"home/app/cache{i // 100:02d}" / f"f{i:04d}.dat", rng)
        files += 1
    whiteout = diff / WHITEOUT_DIR
    whiteout.parent.mkdir(parents=True, exist_ok=True)
    os.mknod(whiteout, stat.S_IFCHR | 0o000, os.makedev(0, 0))
    return files + 1, written


def write_container_config(root: Path, container_id: str, name: str) -> None:
    """rocker's containers/<id>/config.json for a stopped container running /bin/sh."""
    config = {
        "ID": container_id,
        "Name": name,
        "Created": CREATED,
        "State": {"Running": False, "Pid": 0},
        "Config": {"Cmd": ["/bin/sh"], "Image": ""},
    }
    (root / "containers" / container_id).mkdir(parents=True)
    (root / "containers" / container_id / "config.json").write_text(json.dumps(config))


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


def mark_built(home: Path, wanted: dict[str, object], files: int, written: int, start: float) -> None:
    """Sync the new build and record it complete (what reuse_built looks for)."""
    os.sync()
    (home / "COMPLETE.json").write_text(json.dumps({**wanted, "files": files, "bytes": written}))
    print(f"storage: {files} files, {written / MB:.0f} MB in {time.perf_counter() - start:.1f}s")


def ensure_storage(workdir: Path, scale: float, big_file: int = 0) -> Path:
    """The storage root for scale under workdir: reused when complete, else (re)built; returns the root. big_file:
    the container also holds one file of that many random bytes (data/model.bin: a model, a dataset)."""
    home = workdir / (f"storage-scale{scale:g}" + (f"-big{big_file}" if big_file else ""))
    wanted: dict[str, object] = {"version": STORAGE_VERSION, "scale": scale, "big_file": big_file}
    if reuse_built(home, wanted):
        return home / "root"
    print(f"storage: building {home / 'root'} at scale {scale:g} ...", flush=True)
    start = time.perf_counter()
    root = home / "root"
    files, written = build_image_layers(root, scale)
    container_diff = root / "overlay2" / CONTAINER_ID / "diff"
    container_diff.mkdir(parents=True)
    n, size = build_container_layer(container_diff, scale)
    if big_file:
        (container_diff / "data").mkdir(exist_ok=True)
        with open(container_diff / "data" / "model.bin", "wb") as f:
            rng = random.Random(big_file)
            for left in range(big_file, 0, -(8 << 20)):
                f.write(rng.randbytes(min(left, 8 << 20)))
        n, size = n + 1, size + big_file
    (root / "overlay2" / CONTAINER_ID / "lower").write_text(f"{BASE_ID}/diff:{MID_ID}/diff")
    write_container_config(root, CONTAINER_ID, "commit-benchmark")
    mark_built(home, wanted, files + n, written + size, start)
    return root


def layer_dirs(root: Path) -> list[tuple[str, Path]]:
    """(layer id, diff/) of the container's layers, bottom first, the container's own last."""
    return [(layer_id, root / "overlay2" / layer_id / "diff") for layer_id in (BASE_ID, MID_ID, CONTAINER_ID)]


# --------------------------------------------------------------------------------------------------------------
# Child processes and their peak RSS
# --------------------------------------------------------------------------------------------------------------


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


def peak_rss_source() -> str:
    """Where run_child's peak RSS comes from, for the report."""
    return "GNU time %M (child's wait4 ru_maxrss)" if gnu_time() else "os.wait4 (floored at this script's RSS)"


def run_child(
    argv: list[str], usage: Usage, *, cwd: Path | None = None, log: Path | None = None, capture: bool = False
) -> bytes:
    """Run argv to completion (Popen, then os.wait4 on its pid), fold its peak RSS into usage, return its stdout.

    os.wait4 gives the child's own rusage, and Linux folds into its ru_maxrss the peak of every descendant the
    child itself waited for (luigi's worker processes included). resource.getrusage(RUSAGE_CHILDREN) would be the
    fallback, but its ru_maxrss is the maximum over all children ever waited, so a delta only shows a child that
    beat every earlier one; hence one wait4 per pid.

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


def commit_argv(
    luigi: Path, container: str, out: Path, root: Path, output_dir: Path, cache: Path, *extra: str
) -> list[str]:
    """`luigi --module pipeline CommitImage` of container in the storage at root into the archive out (image
    bench/ours:latest), with its output and cache dirs, the scheduler in-process; extra flags (--storage-engine)
    before those."""
    return [
        *(str(luigi), "--module", "pipeline", "CommitImage", "--id", container, "--image", "bench/ours:latest"),
        *("--output", str(out), *extra, "--storage-root", str(root)),
        *("--commit-output-dir", str(output_dir), "--commit-cache-dir", str(cache), "--local-scheduler"),
    ]


def find_luigi(tools: tuple[str, ...]) -> Path | None:
    """The venv's luigi once every tool is on PATH; None, after an error line, when something is missing. The
    package's bytecode is compiled first, as a pip install does (the editable one here has none, and with
    PYTHONDONTWRITEBYTECODE set every run would compile it again)."""
    for tool in tools:
        if shutil.which(tool) is None:
            print(f"error: {tool} is not on PATH", file=sys.stderr)
            return None
    luigi = Path(sys.executable).parent / "luigi"
    if not luigi.exists():
        print(f"error: {luigi} not found; run with the project's .venv/bin/python", file=sys.stderr)
        return None
    compileall.compile_dir(REPO_ROOT / "pipeline", quiet=1)
    return luigi


def tool_version(argv: list[str]) -> str:
    """The first line a tool prints for its --version, for the report."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
    except OSError:
        return f"{argv[0]} missing"
    lines = (done.stdout or done.stderr).strip().splitlines()
    return lines[0].strip("* ") if lines else argv[0]


# --------------------------------------------------------------------------------------------------------------
# The seed's commit, and checks of a docker-archive
# --------------------------------------------------------------------------------------------------------------


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (open read-only: enough for fsync on Linux)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def original_commit(
    root: Path, container_id: str, out: Path, log: Path, usage: Usage, *, durable: bool = False
) -> tuple[int, int]:
    """The seed's commit (seed/commit.go) of one container plus the config and manifest.json it lacks, so that the
    archive loads: GNU `tar -cf` per layer, `sha256sum` of each, then a `tar -cf` of everything; its temporary
    directory is removed at the end, as the seed's deferred RemoveAll does.

    durable: as ours does with every file it writes, fsync each file once written (each layer tar after its
    `tar -cf`, each JSON file, the archive after the final `tar -cf`) and the archive's directory. The seed itself
    syncs nothing.

    Returns (layer tar + archive bytes, JSON bytes) written.
    """
    # getLayers: the lower file's "<id>/diff" entries, bottom first, then the container's own layer.
    lower = (root / "overlay2" / container_id / "lower").read_text().strip()
    layers = [item.split("/")[0] for item in lower.split(":") if item] + [container_id]
    tmp = out.with_suffix(".tmpdir")
    tmp.mkdir()
    try:
        members = []
        for layer_id in layers:
            (tmp / layer_id).mkdir(mode=0o700)
            diff = root / "overlay2" / layer_id / "diff"
            run_child(["tar", "-C", str(diff), "-cf", str(tmp / layer_id / "layer.tar"), "."], usage, log=log)
            if durable:
                fsync_path(tmp / layer_id / "layer.tar")
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
        if durable:
            for name in files[len(members) :]:
                fsync_path(tmp / name)
        run_child(["tar", "-C", str(tmp), "-cf", str(out), *files], usage, log=log)
        if durable:
            fsync_path(out)
            fsync_path(out.parent)
        layer_bytes = sum((tmp / m).stat().st_size for m in members)
        json_bytes = sum((tmp / f).stat().st_size for f in files[len(members) :])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return layer_bytes + out.stat().st_size, json_bytes


def archive_layers(path: Path) -> list[str]:
    """The Layers of a docker-archive's manifest.json (its member names)."""
    with tarfile.open(path) as tar:
        member = tar.extractfile("manifest.json")
        if member is None:
            raise BenchmarkError(f"{path}: manifest.json is not a file")
        layers: list[str] = json.loads(member.read())[0]["Layers"]
    return layers


def layer_tar_bytes(path: Path) -> int:
    """Total size of the layer tars a docker-archive's manifest.json names."""
    layers = set(archive_layers(path))
    with tarfile.open(path) as tar:
        return sum(m.size for m in tar.getmembers() if m.name in layers)


def skopeo_check(path: Path) -> None:
    """skopeo inspect of a docker-archive; a BenchmarkError with skopeo's message when it refuses it."""
    done = subprocess.run(["skopeo", "inspect", f"docker-archive:{path}"], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise BenchmarkError(f"skopeo inspect docker-archive:{path} failed: {done.stderr.strip()}")


# --------------------------------------------------------------------------------------------------------------
# SnapshotAll runs, what they wrote, and luigi's summary of them
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SnapshotPlace:
    """Where SnapshotAll reads and writes, and the flags every run of one benchmark passes."""

    luigi: Path
    root: Path  # the storage root
    out: Path  # --commit-output-dir
    cache: Path  # --commit-cache-dir
    workers: int
    image_format: str  # SnapshotAll --format
    extra: tuple[str, ...] = ()  # more flags, e.g. ("--schedule-full-every", "48")

    @property
    def store(self) -> Path:
        """The snapshot store (--format store): one OCI layout under the output dir."""
        return self.out / "store"

    def blob_dirs(self) -> list[Path]:
        """Where layer and archive bytes land: the store's blobs, standalone archives, the cache's blobs."""
        return [self.store / "blobs", self.out / "snapshots", self.cache / "blobs"]

    def argv(self, stamp: str) -> list[str]:
        """`pipeline-run SnapshotAll ...`, as the systemd unit (config/systemd/pipeline-snapshot.service) runs it:
        luigi's command line with --module pipeline."""
        return [
            str(self.luigi.parent / "pipeline-run"),
            "SnapshotAll",
            "--snapshot",
            stamp,
            "--storage-root",
            str(self.root),
            "--commit-output-dir",
            str(self.out),
            "--commit-cache-dir",
            str(self.cache),
            "--workers",
            str(self.workers),
            "--format",
            self.image_format,
            *self.extra,
            "--local-scheduler",
        ]


STAMP_FORMAT = "%Y-%m-%dT%H%M"  # SnapshotAll's --snapshot


def hourly_stamps(start: str, count: int) -> list[str]:
    """count SnapshotAll stamps (YYYY-MM-DDTHHMM, UTC) one hour apart from start: one period each at the default
    [snapshot] period_minutes."""
    first = datetime.strptime(start, STAMP_FORMAT)
    return [(first + timedelta(hours=i)).strftime(STAMP_FORMAT) for i in range(count)]


@dataclass(frozen=True)
class LuigiSummary:
    """What luigi's closing "Execution Summary" says (tasks that ran, tasks found complete), and the families of
    the tasks that ran, counted from the workers' "running   Family(...)" lines (the summary lists five at most)."""

    ran: int
    complete: int
    ran_by_family: dict[str, int]

    def describe(self) -> str:
        families = ", ".join(f"{n} {family}" for family, n in sorted(self.ran_by_family.items()))
        return f"{self.ran} ran ({families}), {self.complete} already complete"


_SUMMARY_HEAD = "===== Luigi Execution Summary ====="
_SUMMARY_GROUP = re.compile(r"^\* (\d+) (ran successfully|complete ones were encountered)", re.MULTILINE)
_RUNNING = re.compile(r"\) running   ([A-Za-z_][A-Za-z0-9_]*)\(")


def read_luigi_summary(log: Path) -> LuigiSummary:
    """The last execution summary in a luigi log of one run (BenchmarkError if there is none)."""
    text = log.read_text(errors="replace")
    end = text.rfind(_SUMMARY_HEAD)
    start = text.rfind(_SUMMARY_HEAD, 0, end)
    if start < 0:
        raise BenchmarkError(f"{log}: no luigi execution summary")
    counts = {m.group(2): int(m.group(1)) for m in _SUMMARY_GROUP.finditer(text, start, end)}
    families: dict[str, int] = {}
    for m in _RUNNING.finditer(text):
        families[m.group(1)] = families.get(m.group(1), 0) + 1
    return LuigiSummary(counts.get("ran successfully", 0), counts.get("complete ones were encountered", 0), families)


def run_snapshot_all(place: SnapshotPlace, stamp: str, log: Path) -> tuple[Sample, Usage, LuigiSummary]:
    """One SnapshotAll, timed after a sync (common.measure): its sample, peak RSS and luigi's summary."""
    usage = Usage()
    sample, _ = measure(lambda: run_child(place.argv(stamp), usage, cwd=REPO_ROOT, log=log))
    return sample, usage, read_luigi_summary(log)


def read_catalog_record(out: Path, container_id: str, stamp: str) -> dict[str, object]:
    """SnapshotAll's catalog record of one container's snapshot (BenchmarkError when missing or unreadable)."""
    path = out / "catalog" / "records" / container_id / f"{stamp}.json"
    try:
        record: dict[str, object] = json.loads(path.read_bytes())
    except (OSError, ValueError) as e:
        raise BenchmarkError(f"{stamp}: no readable catalog record {path} ({e})") from e
    return record


def record_layer_sizes(record: dict[str, object]) -> list[int]:
    """A catalog record's layer sizes, oldest first (BenchmarkError when it has none)."""
    sizes = record.get("layer_sizes")
    if not isinstance(sizes, list) or not all(isinstance(n, int) for n in sizes):
        raise BenchmarkError(f"catalog record of {record.get('reference')}: no layer_sizes list")
    return sizes


FileState = tuple[int, int, int, int]  # inode, size, mtime_ns, ctime_ns


def read_files(dirs: Sequence[Path]) -> dict[str, FileState]:
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
    """New or rewritten files; a new hardlink to data already counted (a store blob linked from the cache, an
    oci-dir's cached layers) adds no bytes."""
    changed: list[tuple[str, int]] = []
    seen_inodes = {state[0] for state in before.values()}
    for path, state in sorted(after.items()):
        if before.get(path) == state:
            continue
        changed.append((path, 0 if state[0] in seen_inodes else state[1]))
        seen_inodes.add(state[0])
    return Writes(changed, sum(1 for path in before if path not in after))


def disk_usage(paths: Sequence[Path]) -> int:
    """Bytes of disk the trees under paths take, as `du -s --block-size=1 PATH...` counts them: allocated blocks of
    every file and directory, an inode linked several times (a store blob hardlinked from the cache) once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for top in paths:
        if not top.exists():
            continue
        for dirpath, dirnames, filenames in os.walk(top):
            for name in [".", *dirnames, *filenames] if dirpath == str(top) else [*dirnames, *filenames]:
                st = os.lstat(os.path.join(dirpath, name))
                if (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    total += st.st_blocks * 512
    return total


# --------------------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One timed run: wall and CPU seconds, and I/O, of this process and of the children it waited for."""

    seconds: float
    cpu_seconds: float  # user + system
    rchar: int  # bytes through read() and friends, page cache hits included
    read_bytes: int  # bytes fetched from storage
    write_bytes: int  # bytes sent (or to be sent) to storage, less those cancelled before writeback


def cpu_seconds() -> float:
    """User + system CPU of this process (all threads) and of the children it waited for so far."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def read_proc_io() -> dict[str, int]:
    """/proc/self/io. Linux adds a child's counters to its parent's when the parent waits for it (as with
    rusage), so these cover every process of the tree that has been reaped, not this process alone."""
    with open("/proc/self/io") as f:
        return {key: int(value) for key, value in (line.split(":") for line in f)}


def measure(fn: Callable[[], T], *, sync: bool = True) -> tuple[Sample, T]:
    """Run fn once and measure it; with sync, after os.sync(), so that it pays for no earlier run's writeback."""
    if sync:
        os.sync()
    io, cpu = read_proc_io(), cpu_seconds()
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    cpu = cpu_seconds() - cpu
    after = read_proc_io()
    written = after["write_bytes"] - io["write_bytes"] - (after["cancelled_write_bytes"] - io["cancelled_write_bytes"])
    sample = Sample(seconds, cpu, after["rchar"] - io["rchar"], after["read_bytes"] - io["read_bytes"], written)
    return sample, result


def alternating(items: Sequence[T], repeat: int) -> Iterator[tuple[int, T]]:
    """(round, item) for repeat rounds over items, every other round in reverse (A B, B A, A B ...), so that no
    item always runs right after the same other one or always first in a round (drift, a warming cache)."""
    for round_index in range(repeat):
        for item in items if round_index % 2 == 0 else reversed(items):
            yield round_index, item


# --------------------------------------------------------------------------------------------------------------
# Command line and report
# --------------------------------------------------------------------------------------------------------------


def argument_parser(doc: str | None, workdir: str, workdir_help: str, *, repeat: str = "") -> argparse.ArgumentParser:
    """The options every script has: --workdir DIR (default <tmp>/<workdir>), --json FILE and, when the script
    repeats something (repeat names it: "method", "variant"), --repeat N; described by doc's first line."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0] if doc else None)
    parser.add_argument(
        "--workdir", type=resolved_path, default=Path(tempfile.gettempdir()) / workdir, help=workdir_help
    )
    parser.add_argument("--json", type=Path, help="also write the results (every sample) as JSON to this file")
    if repeat:
        parser.add_argument("--repeat", type=int, default=3, help=f"timed runs per {repeat} (median reported)")
    return parser


def resolved_path(value: str) -> Path:
    return Path(value).resolve()


def fresh_dir(path: Path) -> Path:
    """path, emptied of what an earlier run left there (or created, with its parents)."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def write_json(path: Path, doc: dict[str, object]) -> None:
    path.write_text(json.dumps(doc, indent=2) + "\n")


def print_table(columns: Sequence[tuple[str, int]], rows: Iterable[Sequence[str]]) -> None:
    """A header, a rule as wide as it, and rows. Each column is (title, width): width > 0 right-aligns, < 0
    left-aligns, 0 leaves the cell as it is (a last, free-text column); cells are joined by one space."""

    def line(cells: Sequence[str]) -> str:
        parts = [
            f"{cell:>{w}}" if w > 0 else f"{cell:<{-w}}" if w < 0 else cell
            for cell, (_, w) in zip(cells, columns, strict=True)
        ]
        return " ".join(parts).rstrip()

    header = line([title for title, _ in columns])
    print(header)
    print("-" * len(header))
    for row in rows:
        print(line(row))


def median(values: Iterable[float]) -> float:
    """The median (0.0 of nothing)."""
    items = list(values)
    return statistics.median(items) if items else 0.0


def spread(values: Iterable[float]) -> str:
    """min-max of the samples, for the report's variance column ("-" with fewer than two)."""
    items = list(values)
    return f"{min(items):.2f}-{max(items):.2f}" if len(items) > 1 else "-"


def format_bytes(n: float) -> str:
    """0, kB below 1 MB, MB below 10 GB, else GB (decimal units)."""
    if n == 0:
        return "0"
    if abs(n) < MB:
        return f"{n / 1000:.1f} kB"
    return f"{n / MB:.1f} MB" if abs(n) < 10_000 * MB else f"{n / (1000 * MB):.2f} GB"


def verdict(ok: bool) -> str:
    """How a target reads in a report."""
    return "met" if ok else "MISSED"

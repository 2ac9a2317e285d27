"""Snapshots scheduled through a real central scheduler (luigid): two SnapshotAll runs at once over twenty
containers sharing one image, and the progress a layer task shows in luigid while it packs. And choosing the
scheduler: the plain command needs no luigid (luigi.cfg's [core] local_scheduler = true), a host's config or
pipeline-run's --scheduler-* flags pick luigid, and a luigid that cannot be reached is one error line at once."""

from __future__ import annotations

import configparser
import contextlib
import dataclasses
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pipeline.demo import build_sample_storage
from tests.conftest import TOOLS
from tests.support.cli import REPO, kill_run, resume, tree_fingerprint
from tests.support.fleet import add_container, set_fixed_mtimes
from tests.support.imagecheck import check_image_archive, compare_trees, unpack_layers_with_python
from tests.support.luigid import (  # noqa: F401 - the `luigid` fixture
    HOST,
    Luigid,
    free_port,
    luigid_fixture,
    run_luigid,
    scrubbed_env,
)
from tests.support.overlay_storage import (
    BASE_LAYER_ID,
    MID_LAYER_ID,
    TreeView,
    build_rocker_storage,
    container_id_for,
    read_entry,
    read_tree,
)

STAMP = "2026-11-28T0400"  # both runs pass the same --snapshot, so they schedule the same task ids
NAMES = ("web-1", *(f"web-{i}" for i in range(2, 21)))  # web-1 is build_rocker_storage's own container
BIG_FILE = "data/big.bin"  # in the base layer: packing it keeps one worker busy while the other schedules
BIG_SIZE = 30 << 20
RUN_TIMEOUT = 120.0
PACKED = "INFO pipeline.store.cache: packed "  # pipeline/store/cache.py logs this once per layer it packs
PROGRESS = re.compile(r"(\S+): ([\d.]+) of ([\d.]+) MiB packed")  # the status message of tasks/image.py's Progress
MIB = 1 << 20
LAYER_TASKS = ("PackImageLayer", "PackContainerLayer")
STATUSES = ("PENDING", "RUNNING", "DONE", "FAILED", "DISABLED")
PRODUCTION_CFG = REPO / "config" / "production.cfg"
# luigi's default retries (3 attempts, 30 s apart) took a minute to report an unreachable luigid; anything near that
# fails this bound, which is no benchmark (the runs take about 4 s with plain luigi, under 1 s with pipeline-run).
UNREACHABLE_BOUND = 30.0


@dataclass(frozen=True)
class Fleet:
    """Twenty containers on one two-layer image, with each container's merged view recorded while mounted."""

    root: Path
    views: dict[str, TreeView]


@dataclass(frozen=True)
class TwoRuns:
    """What two SnapshotAll processes run at once through one luigid left behind."""

    out: Path
    cache: Path
    returncodes: tuple[int, ...]
    logs: tuple[str, ...]
    tasks: dict[str, dict[str, Any]]  # luigid's task_list by status afterwards: {status: {task_id: task}}
    storage_unchanged: bool


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    root = tmp_path_factory.mktemp("fleet") / "rocker"
    first = build_rocker_storage(root, name=NAMES[0])
    # A big base layer keeps one worker packing while the other run schedules and works. It goes in before any
    # commit and before the other containers are mounted; web-1's view was recorded without it, so it is added.
    base = root / "overlay2" / BASE_LAYER_ID / "diff"
    (base / BIG_FILE).write_bytes(os.urandom(BIG_SIZE))
    os.chmod(base / BIG_FILE, 0o644)
    set_fixed_mtimes(base)
    views = {NAMES[0]: dataclasses.replace(first.merged, entries={**first.merged.entries, **_entry(base, BIG_FILE)})}
    for number, name in enumerate(NAMES[1:], start=2):
        files = {f"srv/{name}/index.html": f"<h1>{name}</h1>\n".encode(), "etc/hostname": f"{name}\n".encode()}
        delete = ("usr/bin/passwd",) if number % 2 == 0 else ()
        views[name] = add_container(root, name, files, delete=delete)
    return Fleet(root=root, views=views)


@pytest.fixture(scope="module")
def two_runs(fleet: Fleet, tmp_path_factory: pytest.TempPathFactory) -> TwoRuns:
    work = tmp_path_factory.mktemp("two-runs")
    out, cache = work / "out", work / "cache"
    before = tree_fingerprint(fleet.root)
    with run_luigid(work / "luigid") as server:
        args = ["SnapshotAll", "--snapshot", STAMP, "--storage-root", str(fleet.root), "--format", "both"]
        args += ["--commit-output-dir", str(out), "--commit-cache-dir", str(cache), "--workers", "2", *server.flags()]
        logs = [work / "run-a.log", work / "run-b.log"]
        # `python -m pipeline run`: luigi's command line, which also exits 0 when the other worker ran some tasks.
        with _running([_start_luigi(args, log, runner="pipeline-run") for log in logs]) as processes:
            returncodes = _wait_all(processes, logs)
        tasks = {status: server.call("task_list", status=status, limit=False) for status in STATUSES}
    return TwoRuns(
        out=out,
        cache=cache,
        returncodes=returncodes,
        logs=tuple(log.read_text() for log in logs),
        tasks=tasks,
        storage_unchanged=tree_fingerprint(fleet.root) == before,
    )


@pytest.mark.overlay
def test_two_runs_through_one_luigid_archive_every_container_once(
    fleet: Fleet, two_runs: TwoRuns, tmp_path: Path
) -> None:
    expected = {_archive(two_runs.out, name) for name in NAMES}
    assert set(two_runs.out.glob(f"snapshots/*/{STAMP}.tar")) == expected
    diff_ids = {name: _diff_ids(_archive(two_runs.out, name)) for name in NAMES}
    assert all(len(ids) == 3 for ids in diff_ids.values()), diff_ids
    assert len({tuple(ids[:2]) for ids in diff_ids.values()}) == 1, "every container shares the image's two layers"
    assert len({ids[2] for ids in diff_ids.values()}) == len(NAMES), "every container has its own top layer"
    if shutil.which("skopeo"):
        for name in NAMES:
            inspected = _skopeo_inspect(_archive(two_runs.out, name))
            assert inspected["Layers"] == diff_ids[name], name  # uncompressed blobs: digest == diff_id
    for name in (NAMES[0], NAMES[1], NAMES[-1]):
        rootfs = tmp_path / f"rootfs-{name}"
        unpack_layers_with_python(_archive(two_runs.out, name), rootfs)  # also checks every diff_id
        compare_trees(fleet.views[name], read_tree(rootfs), label=f"python {name}")
    if all(shutil.which(tool) for tool in TOOLS):
        name = NAMES[2]
        check_image_archive(_archive(two_runs.out, name), fleet.views[name], tmp_path / "check", ref=f"{name}:{STAMP}")


@pytest.mark.overlay
def test_two_runs_through_one_luigid_pack_each_layer_once_in_total(fleet: Fleet, two_runs: TwoRuns) -> None:
    log = "\n".join(two_runs.logs)
    layer_ids = [BASE_LAYER_ID, MID_LAYER_ID, *(container_id_for(name) for name in NAMES)]
    counts = {
        layer_id: log.count(f"{PACKED}{fleet.root / 'overlay2' / layer_id / 'diff'} into sha256:")
        for layer_id in layer_ids
    }
    assert counts == dict.fromkeys(layer_ids, 1), _summaries(two_runs.logs)
    assert log.count(PACKED) == len(layer_ids)


@pytest.mark.overlay
def test_two_runs_through_one_luigid_leave_every_task_done_and_the_storage_untouched(two_runs: TwoRuns) -> None:
    unfinished = {s: [t["display_name"] for t in two_runs.tasks[s].values()] for s in STATUSES if s != "DONE"}
    assert unfinished == {s: [] for s in STATUSES if s != "DONE"}
    done = [t["name"] for t in two_runs.tasks["DONE"].values()]
    assert done.count("SnapshotAll") == 1 and done.count("SnapshotContainer") == len(NAMES)
    assert done.count("PackImageLayer") == 2 and done.count("PackContainerLayer") == len(NAMES)
    assert (two_runs.out / "catalog" / "runs").is_dir() and any((two_runs.out / "catalog" / "runs").iterdir())
    assert two_runs.storage_unchanged, "a run wrote into the source storage"


@pytest.mark.overlay
def test_two_runs_through_one_luigid_both_exit_zero(two_runs: TwoRuns) -> None:
    assert two_runs.returncodes == (0, 0), _summaries(two_runs.logs)


def test_a_packing_layer_shows_bytes_and_percentage_in_luigid(luigid: Luigid, tmp_path: Path) -> None:
    root = tmp_path / "storage"
    container_id = build_sample_storage(root)
    layer_dir = root / "overlay2" / container_id / "diff"
    for i in range(4):  # the first report comes after the first file (app/big-0.bin), a quarter of the layer
        (layer_dir / "app" / f"big-{i}.bin").write_bytes(os.urandom(8 << 20))
    args = ["CommitImage", "--id", container_id, "--output", str(tmp_path / "image.tar"), "--storage-root", str(root)]
    args += ["--commit-cache-dir", str(tmp_path / "cache"), "--workers", "1"]
    log = tmp_path / "commit.log"
    # Plain luigi through a host's config (config/production.cfg) naming this luigid, as LUIGI_CONFIG_PATH does on a
    # host: the --scheduler-* flags would not do, luigi.cfg's local_scheduler = true makes plain luigi ignore them.
    env = {"LUIGI_CONFIG_PATH": str(_host_config(tmp_path / "host.cfg", luigid.port))}
    # One worker runs tasks in its own process, so this stops the whole run after the second layer is written and
    # before it is renamed into the cache: that layer task is RUNNING in luigid, the first one DONE.
    env["PIPELINE_FAILPOINTS"] = "pack:before-rename@2:stop"
    with _running([_start_luigi(args, log, env)]) as (process,):
        _wait_until_stopped(process, log)
        while_stopped = _layer_tasks(luigid)
        resume(process.pid)
        assert _wait_all([process], [log]) == (0,)
    after = _layer_tasks(luigid)

    assert sorted(t["status"] for t in while_stopped.values()) == ["DONE", "RUNNING"], while_stopped
    container_layer = next(t for t in while_stopped.values() if t["name"] == "PackContainerLayer")
    name, done, total = _progress(container_layer)
    assert name == "demo-web"  # the container, not a task type or a hash
    assert abs(total - _file_bytes(layer_dir) / MIB) <= 0.05  # "about": file data; the done count is tar bytes
    assert 8.0 <= done
    # A finished task says so: 100% and "done", never the last percentage it reported while it ran.
    finished = [t for t in while_stopped.values() if t["status"] == "DONE"]
    assert [(t["progress_percentage"], t["status_message"].endswith(": done")) for t in finished] == [(100, True)]
    ended = {(t["status"], t["progress_percentage"], t["status_message"].endswith(": done")) for t in after.values()}
    assert ended == {("DONE", 100, True)}


@pytest.mark.root
def test_the_plain_command_commits_without_any_luigid(tmp_path: Path) -> None:
    """`luigi --module pipeline CommitImage --id X` exactly as users type it: no --local-scheduler, no luigid."""
    root = tmp_path / "storage"
    container_id = build_sample_storage(root)
    output = tmp_path / "image.tar"
    args = ["CommitImage", "--id", container_id, "--output", str(output), "--storage-root", str(root)]
    done, _ = _run(args + ["--commit-cache-dir", str(tmp_path / "cache")])
    assert done.returncode == 0, done.stderr
    assert output.is_file() and tarfile.is_tarfile(output)


@pytest.mark.parametrize("how", ["luigi-host-config", "pipeline-run-flags", "pipeline-run-host-config"])
def test_an_unreachable_luigid_is_one_error_line_at_once(how: str, tmp_path: Path) -> None:
    """A configured luigid that nothing listens for: one ERROR line naming it, no traceback, a non-zero exit, and
    no minute of retries; plain luigi with a host's config (production.cfg's retry settings) and pipeline-run."""
    root = tmp_path / "storage"
    container_id = build_sample_storage(root)
    output = tmp_path / "image.tar"
    args = ["CommitImage", "--id", container_id, "--output", str(output), "--storage-root", str(root)]
    args += ["--commit-cache-dir", str(tmp_path / "cache")]
    port = free_port()
    env: dict[str, str] = {}
    if how.endswith("host-config"):
        env["LUIGI_CONFIG_PATH"] = str(_host_config(tmp_path / "host.cfg", port))
    else:
        args += ["--scheduler-host", HOST, "--scheduler-port", str(port)]

    done, seconds = _run(args, env, runner="luigi" if how.startswith("luigi") else "pipeline-run")

    assert done.returncode != 0, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("ERROR:")]
    assert len(errors) == 1, done.stderr
    assert f"{HOST}:{port}" in errors[0] and "--local-scheduler" in errors[0], errors[0]
    assert "Traceback" not in done.stderr + done.stdout, done.stderr
    assert seconds < UNREACHABLE_BOUND, f"{seconds:.1f} s:\n{done.stderr}"
    assert not output.exists()


@pytest.mark.root
def test_plain_luigi_ignores_scheduler_flags_while_the_config_says_local(luigid: Luigid, tmp_path: Path) -> None:
    """What the README warns of: luigi.cfg's local_scheduler = true beats plain luigi's --scheduler-* flags (its
    --local-scheduler can only switch it on), so that run never reaches luigid; pipeline-run's does."""
    root = tmp_path / "storage"
    container_id = build_sample_storage(root)
    args = ["CommitImage", "--id", container_id, "--output", str(tmp_path / "image.tar"), "--storage-root", str(root)]
    args += ["--commit-cache-dir", str(tmp_path / "cache"), *luigid.flags()]
    plain, _ = _run(args)
    assert plain.returncode == 0, plain.stderr
    assert _all_tasks(luigid) == {}, "plain luigi reached luigid"
    through, _ = _run(args, runner="pipeline-run")
    assert through.returncode == 0, through.stderr
    assert "CommitImage" in [task["name"] for task in _all_tasks(luigid).values()], luigid.log()


def test_pipeline_run_refuses_local_scheduler_with_scheduler_flags() -> None:
    done, _ = _run(["CommitImage", "--id", "x", "--local-scheduler", "--scheduler-port", "1"], runner="pipeline-run")
    assert done.returncode == 2
    assert [line for line in done.stderr.splitlines() if line.startswith("ERROR:")] == [done.stderr.strip()]


# --- helpers -------------------------------------------------------------------------------------------------------


def _host_config(path: Path, port: int) -> Path:
    """config/production.cfg as a host installs it, naming the luigid at 127.0.0.1:port, with this checkout's
    logging config (the host's /etc/pipeline/logging.conf is a copy of it)."""
    config = configparser.ConfigParser(interpolation=None)
    config.optionxform = str  # type: ignore[method-assign,assignment]
    config.read(PRODUCTION_CFG)
    assert config.getboolean("core", "local_scheduler") is False
    config["core"].update(
        scheduler_host=HOST, scheduler_port=str(port), logging_conf_file=str(REPO / "config" / "logging.conf")
    )
    with open(path, "w") as out:
        config.write(out)
    return path


def _run(
    args: list[str], env: dict[str, str] | None = None, *, runner: str = "luigi"
) -> tuple[subprocess.CompletedProcess[str], float]:
    """`luigi --module pipeline ARGS` (or `python -m pipeline run ARGS`) as a user types it, from the repository
    root; what it printed and how long it took."""
    command = [sys.executable, *_prefix(runner), *args]
    started = time.monotonic()
    done = subprocess.run(
        command, cwd=REPO, env=_env(env), capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False
    )
    return done, time.monotonic() - started


def _prefix(runner: str) -> list[str]:
    return ["-m", "luigi", "--module", "pipeline"] if runner == "luigi" else ["-m", "pipeline", "run"]


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment without proxies and without what would change a run (a host config, a fixed epoch, armed
    failpoints), plus extra."""
    unset = ("SOURCE_DATE_EPOCH", "PIPELINE_FAILPOINTS", "LUIGI_CONFIG_PATH")
    return {k: v for k, v in scrubbed_env().items() if k not in unset} | (extra or {})


def _entry(layer_dir: Path, rel: str) -> dict[bytes, Any]:
    return {os.fsencode(rel): read_entry(layer_dir / rel)}


def _archive(out: Path, name: str) -> Path:
    """Where SnapshotAll puts a container's archive: snapshots/<name>-<short id>/<stamp>.tar."""
    return out / "snapshots" / f"{name}-{container_id_for(name)[:12]}" / f"{STAMP}.tar"


def _diff_ids(archive: Path) -> list[str]:
    with tarfile.open(archive) as tar:
        manifest = json.load(tar.extractfile("manifest.json"))  # type: ignore[arg-type]
        config = json.load(tar.extractfile(manifest[0]["Config"]))  # type: ignore[arg-type]
    ids: list[str] = config["rootfs"]["diff_ids"]
    return ids


def _skopeo_inspect(archive: Path) -> dict[str, Any]:
    done = subprocess.run(["skopeo", "inspect", f"docker-archive:{archive}"], capture_output=True, text=True)
    assert done.returncode == 0, f"skopeo inspect {archive}: {done.stderr}"
    inspected: dict[str, Any] = json.loads(done.stdout)
    return inspected


def _start_luigi(
    args: list[str], log: Path, env: dict[str, str] | None = None, *, runner: str = "luigi"
) -> subprocess.Popen[bytes]:
    """`luigi --module pipeline ARGS` (or `python -m pipeline run ARGS`) from the repository root, its output into
    `log` (a pipe could fill up)."""
    command = [sys.executable, *_prefix(runner), *args]
    with open(log, "wb") as out:
        return subprocess.Popen(command, cwd=REPO, env=_env(env), stdout=out, stderr=subprocess.STDOUT)


@contextlib.contextmanager
def _running(processes: list[subprocess.Popen[bytes]]) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Yield the processes; any still running when the block ends (a failed assertion) is killed and reaped."""
    try:
        yield processes
    finally:
        for process in processes:
            if process.poll() is None:
                kill_run(process)
            process.wait(timeout=30)


def _wait_all(processes: list[subprocess.Popen[bytes]], logs: list[Path]) -> tuple[int, ...]:
    deadline = time.monotonic() + RUN_TIMEOUT
    for process in processes:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise AssertionError(f"not done in {RUN_TIMEOUT} s:\n{_tails([p.read_text() for p in logs])}") from None
    return tuple(p.returncode for p in processes)


def _wait_until_stopped(process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + RUN_TIMEOUT
    while _process_state(process.pid) != "T":
        if process.poll() is not None:
            raise AssertionError(f"exited {process.returncode} before its stop point:\n{_tails([log.read_text()])}")
        assert time.monotonic() < deadline, f"never reached its stop point:\n{_tails([log.read_text()])}"
        time.sleep(0.01)


def _process_state(pid: int) -> str:
    """The state letter of /proc/<pid>/stat (T: stopped); "" once the process is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return ""


def _all_tasks(server: Luigid) -> dict[str, dict[str, Any]]:
    """Every task luigid knows, whatever its status, by task id."""
    return {k: t for status in STATUSES for k, t in server.call("task_list", status=status, limit=False).items()}


def _layer_tasks(server: Luigid) -> dict[str, dict[str, Any]]:
    """The layer tasks luigid knows, whatever their status, by task id."""
    found = {}
    for status in STATUSES:
        for task_id, task in server.call("task_list", status=status, limit=False).items():
            if task["name"] in LAYER_TASKS:
                found[task_id] = task
    return found


def _progress(task: dict[str, Any]) -> tuple[str, float, float]:
    """(what, MiB done, MiB total) from a running layer task's status message, checked against its percentage."""
    match = PROGRESS.fullmatch(task["status_message"] or "")
    assert match, f"{task['display_name']}: status message {task['status_message']!r}"
    done, total = float(match[2]), float(match[3])
    assert 0 < done <= total
    assert 0 < task["progress_percentage"] <= 99, task
    assert abs(task["progress_percentage"] - done * 100 / total) <= 2, task  # the MiB shown are rounded
    return match[1], done, total


def _file_bytes(layer_dir: Path) -> int:
    """The bytes of the regular files under a layer_dir: the total a layer task reports against."""
    total = 0
    for dirpath, _, filenames in os.walk(layer_dir):
        for name in filenames:
            st = os.lstat(os.path.join(dirpath, name))
            total += st.st_size if stat.S_ISREG(st.st_mode) else 0
    return total


def _summaries(logs: tuple[str, ...]) -> str:
    """Each run's luigi execution summary (what it ran, what it left and why), or its last lines."""
    marker = "===== Luigi Execution Summary ====="
    return "\n".join(log[log.find(marker) : log.rfind(marker)] if marker in log else _tails([log]) for log in logs)


def _tails(logs: list[str] | tuple[str, ...], lines: int = 40) -> str:
    return "\n".join("\n".join(log.splitlines()[-lines:]) for log in logs)

"""Snapshots into one snapshot store by two `python -m pipeline run SnapshotAll --workers 2` processes at once, through
one real central scheduler (luigid; issue 13): every container's snapshot lands in the store once per stamp, as a
delta where it changed, and luigid lists each SnapshotContainer task by container name and stamp (the containers
unchanged since their last snapshot: one ReuseSnapshots task listing them), shows only its public parameters, 100% when
done, and FAILED with a one-line error for the container that cannot be snapshotted."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pipeline.snapshots.catalog import SnapshotRecord, read_records
from pipeline.snapshots.store import REF_NAME
from tests.support.cli import REPO, is_stopped, kill_run, resume, tree_fingerprint
from tests.support.fleet import add_container
from tests.support.imagecheck import compare_trees
from tests.support.luigid import Luigid, run_luigid, scrubbed_env
from tests.support.overlay_storage import (
    BASE_LAYER_ID,
    MID_LAYER_ID,
    TreeView,
    build_rocker_storage,
    container_id_for,
    overlay_mount,
    read_tree,
)

pytestmark = [pytest.mark.overlay, pytest.mark.tools("skopeo", "umoci")]

NAMES = ("web-1", "db-1", "api.v2", "Cache_1", "queue-7", "worker")
FIRST, SECOND = "2026-12-01T0100", "2026-12-01T0200"
CHANGED = ("web-1", "api.v2")  # changed before the second stamp: a delta each
BROKEN = "worker"  # given a file named like an OCI whiteout before the second stamp: its snapshot fails alone
PUBLIC = {"container_id", "container_name", "stamp", "format"}  # what luigid may show of a SnapshotContainer
INTERNAL = {  # what it must not: paths, keys, digests, the plan
    "host", "engine", "storage_root", "cache_dir", "clamp_mtime", "pause", "output_dir", "lower", "upper",
    "metadata", "reuse_from", "problem", "full_every", "planned_at", "qualified", "push",
}  # fmt: skip
STATUSES = ("PENDING", "RUNNING", "DONE", "FAILED", "DISABLED")
RUN_TIMEOUT = 180.0


@dataclass(frozen=True)
class Phase:
    """Two runs of one stamp at once, and what luigid said afterwards."""

    returncodes: tuple[int, ...]
    logs: tuple[str, ...]
    tasks: dict[str, dict[str, dict[str, Any]]]  # status -> task id -> task, for this stamp's tasks
    errors: dict[str, dict[str, Any]]  # failed task id -> luigid's fetch_error answer


@dataclass(frozen=True)
class Runs:
    root: Path
    out: Path
    views: dict[str, dict[str, TreeView]]  # stamp -> container name -> merged view at that stamp
    phases: dict[str, Phase]
    storage_unchanged: bool


def _changing(root: Path, name: str) -> Any:
    layer = root / "overlay2" / container_id_for(name)
    lowers = [root / "overlay2" / MID_LAYER_ID / "diff", root / "overlay2" / BASE_LAYER_ID / "diff"]
    return overlay_mount(lowers, layer / "diff", layer / "work", layer / "merged")


def _views(root: Path) -> dict[str, TreeView]:
    views = {}
    for name in NAMES:
        with _changing(root, name) as merged:
            views[name] = read_tree(merged)
    return views


def _env() -> dict[str, str]:
    unset = ("SOURCE_DATE_EPOCH", "PIPELINE_FAILPOINTS", "LUIGI_CONFIG_PATH")
    # pipeline run waits for other workers' tasks up to PIPELINE_WAIT_SECONDS: bounded here, far below the timeout.
    return {k: v for k, v in scrubbed_env().items() if k not in unset} | {"PIPELINE_WAIT_SECONDS": "60"}


def _until(condition: Any, what: str, processes: list[subprocess.Popen[bytes]], logs: list[Path]) -> None:
    deadline = time.monotonic() + RUN_TIMEOUT
    while not condition():
        if time.monotonic() > deadline or any(p.poll() is not None for p in processes):
            tails = "\n".join(log.read_text()[-3000:] for log in logs if log.exists())
            raise AssertionError(f"{what}:\n{tails}")
        time.sleep(0.02)


def _two_runs(server: Luigid, root: Path, work: Path, stamp: str) -> Phase:
    """Two runs of stamp at once. Each starts in about a second, so they are made to overlap: the first one stops
    (its luigi process and its workers, a failpoint) where a snapshot is about to be taken until the second one has
    scheduled its tasks, whose workers then take the rest; then the first one goes on to its end."""
    args = [sys.executable, "-m", "pipeline", "run", "SnapshotAll", "--snapshot", stamp, "--storage-root", str(root)]
    args += ["--commit-output-dir", str(work / "out"), "--commit-cache-dir", str(work / "cache"), "--workers", "2"]
    args += server.flags()
    logs = [work / f"{stamp}-{n}.log" for n in "ab"]
    envs = [_env() | {"PIPELINE_FAILPOINTS": "snapshot:record@1:stop"}, _env()]
    processes: list[subprocess.Popen[bytes]] = []
    try:
        for log, env in zip(logs, envs, strict=True):
            with open(log, "wb") as output:
                processes.append(subprocess.Popen(args, cwd=REPO, env=env, stdout=output, stderr=subprocess.STDOUT))
            if not env.get("PIPELINE_FAILPOINTS"):
                break
            _until(lambda: is_stopped(processes[0].pid), "the first run took no snapshot", processes, logs)
        first, second = processes
        _until(lambda: "Done scheduling tasks" in logs[1].read_text(), "the second run never scheduled", [second], logs)
        resume(first.pid)
        deadline = time.monotonic() + RUN_TIMEOUT
        for process in processes:
            process.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for process in processes:
            if process.poll() is None:
                kill_run(process)
    label = stamp.replace("-", "_")
    tasks = {
        status: {k: t for k, t in server.call("task_list", status=status, limit=False).items() if label in k}
        for status in STATUSES
    }
    errors = {task_id: server.call("fetch_error", task_id=task_id) for task_id in tasks["FAILED"]}
    return Phase(tuple(p.returncode for p in processes), tuple(log.read_text() for log in logs), tasks, errors)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    work = tmp_path_factory.mktemp("store-luigid")
    root = work / "rocker"
    build_rocker_storage(root, name=NAMES[0])
    for name in NAMES[1:]:
        add_container(root, name, {f"srv/{name}/index.html": f"<h1>{name}</h1>\n".encode()})
    views = {FIRST: _views(root)}
    before = tree_fingerprint(root)
    with run_luigid(work / "luigid") as server:
        phases = {FIRST: _two_runs(server, root, work, FIRST)}
        unchanged = tree_fingerprint(root) == before
        for name in CHANGED:
            with _changing(root, name) as merged:
                (merged / "etc/passwd").unlink()  # a whiteout in the delta
                (merged / f"srv/{name}-second.txt").write_bytes(b"written before the second snapshot\n")
        with _changing(root, BROKEN) as merged:
            (merged / "srv/.wh.evil").write_bytes(b"a container's own file, named like an OCI whiteout\n")
        views[SECOND] = _views(root)
        before = tree_fingerprint(root)
        phases[SECOND] = _two_runs(server, root, work, SECOND)
        unchanged &= tree_fingerprint(root) == before
    return Runs(root, work / "out", views, phases, unchanged)


def _records(out: Path, stamp: str) -> dict[str, SnapshotRecord]:
    found = [r for r in read_records(out) if r.stamp == stamp]
    assert len({r.name for r in found}) == len(found), [r.name for r in found]
    return {r.name: r for r in found}


def _index(out: Path) -> list[tuple[str, str]]:
    """(reference, manifest digest) of every entry of the store's index.json, which must be an OCI index."""
    index = json.loads((out / "store" / "index.json").read_bytes())
    assert index["schemaVersion"] == 2 and index["mediaType"] == "application/vnd.oci.image.index.v1+json"
    return [(m["annotations"][REF_NAME], m["digest"]) for m in index["manifests"]]


def _tool(*argv: str) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=120)
    assert done.returncode == 0, f"{' '.join(argv)}: {done.stderr.strip()}"
    return done.stdout


def _umoci_view(store: Path, ref: str) -> TreeView:
    with tempfile.TemporaryDirectory(prefix="bundle-") as tmp:
        _tool("umoci", "unpack", "--image", f"{store}:{ref}", f"{tmp}/b")
        return read_tree(Path(tmp) / "b" / "rootfs")


def _label(name: str, stamp: str) -> str:
    """How a task id leads: the container's name and the stamp, made an identifier."""
    return re.sub(r"[^A-Za-z0-9_]", "_", f"{name}_{stamp}")[:48].strip("_")


def _snapshot_tasks(phase: Phase, status: str) -> dict[str, dict[str, Any]]:
    return {k: t for k, t in phase.tasks[status].items() if t["name"] == "SnapshotContainer"}


def _summary(phase: Phase) -> str:
    marker = "===== Luigi Execution Summary ====="
    return "\n".join(log[log.find(marker) :] if marker in log else log[-3000:] for log in phase.logs)


def test_two_runs_at_once_store_every_container_once_and_both_exit_zero(runs: Runs) -> None:
    phase = runs.phases[FIRST]
    assert phase.returncodes == (0, 0), _summary(phase)
    records = _records(runs.out, FIRST)
    assert sorted(records) == sorted(NAMES)
    refs = [ref for ref, _ in _index(runs.out) if ref.endswith(f":{FIRST}")]
    assert sorted(refs) == sorted(r.reference for r in records.values())  # each exactly once
    for ref in refs:
        raw = json.loads(_tool("skopeo", "inspect", "--raw", f"oci:{runs.out / 'store'}:{ref}"))
        assert len(raw["layers"]) == 3, ref  # the two image layers, shared, and the container's own
    for name in ("web-1", "Cache_1"):
        ref = records[name].reference
        compare_trees(runs.views[FIRST][name], _umoci_view(runs.out / "store", ref), label=f"{name} {ref}")
    assert runs.storage_unchanged, "a run wrote into the source storage"
    assert not [p for p in runs.out.rglob("*") if ".partial-" in p.name]


def test_two_runs_at_once_take_deltas_of_changed_containers_and_reuse_unchanged_ones(runs: Runs) -> None:
    first, second = _records(runs.out, FIRST), _records(runs.out, SECOND)
    assert sorted(second) == sorted(set(NAMES) - {BROKEN})
    index = _index(runs.out)
    assert len(index) == len({ref for ref, _ in index}), "a reference named twice"
    digests = dict(index)
    for name, record in second.items():
        if name in CHANGED:
            assert (record.status, record.deltas) == ("new", 1), record
            assert record.diff_ids[:3] == first[name].diff_ids and len(record.diff_ids) == 4
            view = _umoci_view(runs.out / "store", record.reference)
            compare_trees(runs.views[SECOND][name], view, label=f"{name} {record.reference}")
        else:
            assert record.status == "reused", record
            assert digests[record.reference] == digests[first[name].reference]
    assert not any(ref.endswith(f":{SECOND}") and ref.startswith(f"{BROKEN}:") for ref in digests)


def test_luigid_lists_each_snapshot_task_by_container_name_and_stamp(runs: Runs) -> None:
    for stamp in (FIRST, SECOND):
        phase = runs.phases[stamp]
        tasks = {**_snapshot_tasks(phase, "DONE"), **_snapshot_tasks(phase, "FAILED")}
        # A run that plans after the other one finished a container plans it as done (no reuse): the same
        # snapshot under a second task id, which luigid lists too.
        named = {t["params"]["container_name"] for t in tasks.values()}
        reused = _reused_names(phase)
        assert named | reused == set(NAMES), (tasks.keys(), reused)
        assert reused == (set() if stamp == FIRST else set(NAMES) - set(CHANGED) - {BROKEN}), reused
        for task_id, task in tasks.items():
            assert task_id.startswith(f"SnapshotContainer_{_label(task['params']['container_name'], stamp)}_"), task_id


def test_luigid_shows_the_unchanged_containers_in_one_task_by_name_with_the_internal_parameters_hidden(
    runs: Runs,
) -> None:
    # Both runs plan the same batch (one task id to luigid), unless one planned while the other was writing it.
    batches = [(k, t) for k, t in runs.phases[SECOND].tasks["DONE"].items() if t["name"] == "ReuseSnapshots"]
    assert batches, runs.phases[SECOND].tasks["DONE"].keys()
    task_id, task = max(batches, key=lambda kt: len(json.loads(kt[1]["params"]["container_ids"])))
    unchanged = len(NAMES) - len(CHANGED) - 1
    assert task_id.startswith(f"ReuseSnapshots_{unchanged}_unchanged_{_label('', SECOND).strip('_')}_"), task_id
    assert set(task["params"]) == {"container_ids", "container_names", "stamp", "format"}, task["params"]
    ids = json.loads(task["params"]["container_ids"])
    assert sorted(ids) == sorted(container_id_for(n) for n in _reused_names(runs.phases[SECOND]))
    assert task["progress_percentage"] == 100, task


def _reused_names(phase: Phase) -> set[str]:
    """The containers luigid shows in ReuseSnapshots tasks (done or failed)."""
    names: set[str] = set()
    for status in ("DONE", "FAILED"):
        for task in phase.tasks[status].values():
            if task["name"] == "ReuseSnapshots":
                names |= {n.lstrip("/") for n in json.loads(task["params"]["container_names"])}
    return names


def test_luigid_shows_a_snapshot_task_by_its_container_and_hides_the_internal_parameters(runs: Runs) -> None:
    for stamp in (FIRST, SECOND):
        for status in STATUSES:
            for task_id, task in _snapshot_tasks(runs.phases[stamp], status).items():
                params = task["params"]
                assert PUBLIC <= set(params) and not INTERNAL & set(params), (task_id, params)
                assert params["container_id"] == container_id_for(params["container_name"])
                assert params["stamp"] == stamp and params["format"] == "store"
                for hidden in INTERNAL:
                    assert f"{hidden}=" not in task["display_name"], task["display_name"]


def test_luigid_shows_exactly_the_four_public_parameters_of_a_snapshot_task(runs: Runs) -> None:
    shown = {k for t in _snapshot_tasks(runs.phases[FIRST], "DONE").values() for k in t["params"]}
    assert shown == PUBLIC


def test_finished_snapshot_and_layer_tasks_show_100_percent(runs: Runs) -> None:
    for stamp in (FIRST, SECOND):
        done = runs.phases[stamp].tasks["DONE"]
        shown: dict[str, set[int | None]] = {}
        for task_id, task in done.items():
            if task["name"] == "SnapshotContainer":
                shown.setdefault(task["params"]["container_name"], set()).add(task["progress_percentage"])
            if task["name"] == "ReuseSnapshots" and task["progress_percentage"] == 100:
                for name in json.loads(task["params"]["container_names"]):
                    shown.setdefault(name, set()).add(100)
            if task["name"] in ("SnapshotContainer", "PackImageLayer", "ReuseSnapshots") and task["status_message"]:
                assert task["progress_percentage"] == 100, (task_id, task["progress_percentage"])  # it ran
        # Each container's snapshot, taken by one run, shows 100% (the unchanged ones: their ReuseSnapshots); a
        # second id of it (see above), found done when that run planned, never ran and shows none.
        assert {name for name, values in shown.items() if 100 in values} == (
            set(NAMES) if stamp == FIRST else set(NAMES) - {BROKEN}
        ), shown


def test_a_failing_container_is_failed_in_luigid_with_one_error_line_and_fails_both_runs(runs: Runs) -> None:
    phase = runs.phases[SECOND]
    assert all(code == 30 for code in phase.returncodes), _summary(phase)  # luigi.cfg's [retcode] task_failed
    failed = phase.tasks["FAILED"]
    assert [t["params"]["container_name"] for t in failed.values()] == [BROKEN], failed
    [(task_id, answer)] = phase.errors.items()
    assert task_id.startswith(f"SnapshotContainer_{_label(BROKEN, SECOND)}_")
    error = answer["error"]
    message = json.loads(error) if error.startswith('"') else error  # luigi's worker sends it JSON-encoded
    assert "\n" not in message.strip() and message.startswith("ERROR: "), message
    assert container_id_for(BROKEN) in message and ".wh.evil" in message, message
    assert "Traceback" not in message
    assert not any(t["name"] == "SnapshotAll" for t in phase.tasks["DONE"].values())
    prom = (runs.out / "catalog" / "pipeline.prom").read_text()
    assert 'pipeline_snapshot_run_containers{status="failed"} 1' in prom, prom

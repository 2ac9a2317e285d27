"""Monitoring: the snapshot runs' Prometheus textfile (pipeline/snapshots/metrics.py), read back with
prometheus_client's parser (and with promtool and node_exporter itself where they are installed), and luigid's own
/metrics with config/production.cfg's [scheduler] metrics_collector; the systemd units and production.cfg telling
one story (one luigid per host, on 127.0.0.1)."""

from __future__ import annotations

import configparser
import contextlib
import os
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from pipeline.errors import OutputError
from pipeline.snapshots import metrics
from pipeline.snapshots.catalog import SnapshotRecord
from tests.support.cli import REPO
from tests.support.luigid import HOST, Luigid, free_port, luigid_fixture, run_luigid, scrubbed_env  # noqa: F401

STAMP = "2026-11-28T0400"
PERIOD = datetime(2026, 11, 28, 4, 0, tzinfo=UTC).timestamp()
A, B, C, D = ("a" * 64, "b" * 64, "c" * 64, "d" * 64)
PRODUCTION_CFG = REPO / "config" / "production.cfg"
UNITS = REPO / "config" / "systemd"
METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
PER_CONTAINER = (metrics.LAST_SUCCESS, metrics.LAST_DURATION, metrics.LAST_ARCHIVE, metrics.LAST_FAILURE)
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1 only, whatever http_proxy says


def _record(cid: str, name: str, status: str = "new", size: int = 1000, duration: float = 1.5) -> SnapshotRecord:
    return SnapshotRecord(
        cid, name, STAMP, f"{name}:{STAMP}", "/a.tar", "sha256:c", (), (), size, "f", duration, status
    )


def _build(records: list[SnapshotRecord], failed: list[tuple[str, str]] | None = None, **kw: float) -> str:
    return metrics.build_metrics(
        records,
        run_stamp=STAMP,
        started=kw.get("started", PERIOD + 60),
        finished=kw.get("finished", PERIOD + 102.5),
        failed=failed or [],
        bytes_written=int(kw.get("bytes_written", 123456789)),
    )


def _write(path: Path, records: list[SnapshotRecord], failed: list[tuple[str, str]], finished: float) -> None:
    metrics.write_metrics(
        path, records, run_stamp=STAMP, started=finished - 10, finished=finished, failed=failed, bytes_written=7
    )


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample prometheus_client's parser reads, keyed by (metric, sorted labels)."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _per_container(text: str, metric: str) -> dict[str, tuple[str, float]]:
    """metric's samples by container_id: (name label, value), as prometheus_client reads them."""
    found = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == metric:
                assert set(s.labels) == {"container_id", "name"}, s
                found[s.labels["container_id"]] = (s.labels["name"], s.value)
    return found


# --- the textfile -------------------------------------------------------------------------------------------------


def test_a_run_is_reported_by_outcome_with_its_duration_bytes_and_times() -> None:
    records = [_record(A, "web-1"), _record(B, "web-2", "reused", 2_000_000_000, 0.012)]
    text = _build(records, failed=[(C, "db")])

    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert set(families) == {
        metrics.RUN_CONTAINERS,
        metrics.RUN_DURATION,
        metrics.RUN_WRITTEN,
        metrics.RUN_TIMESTAMP,
        metrics.RUN_PERIOD,
        *PER_CONTAINER,
    }
    for name, family in families.items():
        assert METRIC_NAME.fullmatch(name) and name.startswith("pipeline_snapshot_"), name
        assert family.type == "gauge" and family.documentation, name
    samples = _samples(text)
    assert {k: v for k, v in samples.items() if k[0] == metrics.RUN_CONTAINERS} == {
        (metrics.RUN_CONTAINERS, (("status", "new"),)): 1,
        (metrics.RUN_CONTAINERS, (("status", "unchanged"),)): 1,
        (metrics.RUN_CONTAINERS, (("status", "failed"),)): 1,
    }
    assert samples[(metrics.RUN_DURATION, ())] == 42.5
    assert samples[(metrics.RUN_WRITTEN, ())] == 123456789
    assert samples[(metrics.RUN_TIMESTAMP, ())] == PERIOD + 102.5
    assert samples[(metrics.RUN_PERIOD, ())] == PERIOD
    assert _per_container(text, metrics.LAST_SUCCESS) == {A: ("web-1", PERIOD + 102.5), B: ("web-2", PERIOD + 102.5)}
    assert _per_container(text, metrics.LAST_DURATION) == {A: ("web-1", 1.5), B: ("web-2", 0.012)}
    assert _per_container(text, metrics.LAST_ARCHIVE) == {A: ("web-1", 1000), B: ("web-2", 2_000_000_000)}
    assert _per_container(text, metrics.LAST_FAILURE) == {C: ("db", PERIOD + 102.5)}
    assert "pipeline_snapshot_last_archive_bytes" in text and " 2000000000\n" in text  # exact, not 2e+09


def test_every_outcome_is_reported_even_when_a_run_had_none() -> None:
    text = _build([])
    assert {k: v for k, v in _samples(text).items() if k[0] == metrics.RUN_CONTAINERS} == {
        (metrics.RUN_CONTAINERS, (("status", s),)): 0 for s in metrics.STATUSES
    }
    assert all(_per_container(text, m) == {} for m in PER_CONTAINER)


def test_a_container_that_failed_and_also_has_a_record_counts_once_as_snapshotted() -> None:
    text = _build([_record(A, "web-1")], failed=[(A, "web-1"), (C, "db"), (C, "db")])
    samples = _samples(text)
    assert samples[(metrics.RUN_CONTAINERS, (("status", "failed"),))] == 1
    assert samples[(metrics.RUN_CONTAINERS, (("status", "new"),))] == 1


def test_last_success_survives_runs_that_failed_or_did_not_select_the_container(tmp_path: Path) -> None:
    path = tmp_path / "pipeline.prom"
    t1, t2, t3 = PERIOD + 100, PERIOD + 3700, PERIOD + 7300
    _write(path, [_record(A, "web-1"), _record(B, "web-2", size=5, duration=2.25)], [], t1)
    _write(path, [_record(A, "web-1-renamed")], [(C, "db")], t2)  # B not selected; C failed, never succeeded
    _write(path, [_record(A, "web-1-renamed", "reused")], [(B, "web-2")], t3)  # B failed

    text = path.read_text()
    assert _per_container(text, metrics.LAST_SUCCESS) == {A: ("web-1-renamed", t3), B: ("web-2", t1)}
    assert _per_container(text, metrics.LAST_DURATION) == {A: ("web-1-renamed", 1.5), B: ("web-2", 2.25)}
    assert _per_container(text, metrics.LAST_ARCHIVE) == {A: ("web-1-renamed", 1000), B: ("web-2", 5)}
    assert _per_container(text, metrics.LAST_FAILURE) == {B: ("web-2", t3), C: ("db", t2)}
    assert _samples(text)[(metrics.RUN_CONTAINERS, (("status", "unchanged"),))] == 1
    assert text.count('name="web-1"') == 0  # one series per container id: the old name is gone


def test_containers_without_news_for_forget_after_are_dropped(tmp_path: Path) -> None:
    path = tmp_path / "pipeline.prom"
    _write(path, [_record(A, "web-1"), _record(B, "web-2")], [], PERIOD)
    metrics.write_metrics(
        path,
        [_record(A, "web-1")],
        run_stamp=STAMP,
        started=PERIOD + 3600,
        finished=PERIOD + 3601,
        failed=[],
        bytes_written=0,
        forget_after=3600,
    )
    assert set(_per_container(path.read_text(), metrics.LAST_SUCCESS)) == {A}


HOSTILE = [
    ('quo"te', 'quo"te'),
    ("back\\slash", "back\\slash"),
    ("new\nline", "new\nline"),
    ("ends with a backslash\\", "ends with a backslash\\"),
    ('\\"\\n', '\\"\\n'),
    ('} ,="x" 1', '} ,="x" 1'),
    ("ünïcödé ☃ 名前", "ünïcödé ☃ 名前"),
    (os.fsdecode(b"caf\xe9"), "caf\\xe9"),  # an undecodable byte, as os.fsdecode holds it
    ("lone \ud800 surrogate", "lone \\ud800 surrogate"),
    ("carriage\rreturn\x00nul\x1b[31mred", "carriage\\rreturn\\x00nul\\x1b[31mred"),
    ("line\u2028separator\x85", "line\\u2028separator\\x85"),
    ("tab\tkept", "tab\tkept"),
]


@pytest.mark.parametrize(("name", "shown"), HOSTILE, ids=[repr(n)[:24] for n, _ in HOSTILE])
def test_hostile_names_are_escaped_so_that_parsers_read_each_sample_back(name: str, shown: str) -> None:
    text = _build([_record(A, name)], failed=[(B, name)])
    text.encode("utf-8")  # no surrogate reaches the file: it is UTF-8 throughout
    assert len([line for line in text.splitlines() if line.startswith(metrics.LAST_SUCCESS + "{")]) == 1
    assert _per_container(text, metrics.LAST_SUCCESS) == {A: (shown, PERIOD + 102.5)}
    assert _per_container(text, metrics.LAST_FAILURE) == {B: (shown, PERIOD + 102.5)}
    read_back = metrics.read_container_metrics(text)
    assert {cid: c.name for cid, c in read_back.items()} == {A: shown, B: shown}


_ANY_TEXT = st.text(st.characters(exclude_categories=()), max_size=40)  # surrogates and control characters too


@settings(max_examples=300, deadline=None)
@given(name=_ANY_TEXT, container_id=_ANY_TEXT.filter(bool), other=_ANY_TEXT)
def test_any_name_or_id_is_read_back_alike_by_prometheus_client_and_by_the_next_run(
    name: str, container_id: str, other: str
) -> None:
    records = [_record(container_id, name)]
    failed = [(container_id + "-failed", other)]
    text = _build(records, failed)
    text.encode("utf-8")
    by_client = {
        (s.labels["container_id"], s.labels["name"])
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == metrics.LAST_SUCCESS or s.name == metrics.LAST_FAILURE
    }
    previous = metrics.read_container_metrics(text)
    assert by_client == {(c.container_id, c.name) for c in previous.values()}
    assert len(previous) == 2
    # What the next run carries over is written again unchanged: the escaping is its own fixed point.
    again = metrics.build_metrics(
        [], run_stamp=STAMP, started=PERIOD, finished=PERIOD + 1, failed=[], bytes_written=0, previous=previous
    )
    assert metrics.read_container_metrics(again) == previous
    # Printable text (no control characters, no surrogates) is shown as it is.
    if name.isprintable() and container_id.isprintable():
        assert (container_id, name) in by_client


def test_a_damaged_or_foreign_previous_file_is_ignored_line_by_line(tmp_path: Path) -> None:
    path = tmp_path / "pipeline.prom"
    good = f'{metrics.LAST_SUCCESS}{{container_id="{D}",name="kept"}} 1700000000.5\n'
    path.write_bytes(
        b"\xff\xfe\x00garbage that is not UTF-8 \xc3\n"
        + f'{metrics.LAST_SUCCESS}{{container_id="{A}",name="trunc'.encode()  # cut off mid-line
        + b"\n"
        + f'{metrics.LAST_SUCCESS}{{container_id="{B}",name="bad \\q escape"}} 1\n'.encode()
        + f'{metrics.LAST_SUCCESS}{{container_id="{C}",name="x"}} NaN\n'.encode()
        + f'{metrics.LAST_SUCCESS}{{container_id="{C}",name="x"}} +Inf\n'.encode()
        + f'{metrics.LAST_SUCCESS}{{container_id="{C}",name="x"}} 1e999\n'.encode()
        + f'{metrics.LAST_SUCCESS}{{container_id="{C}",name="x"}} 0x10\n'.encode()
        + f'{metrics.LAST_SUCCESS}{{container_id="{C}",name="x",extra="y"}} 1\n'.encode()
        + f'{metrics.LAST_SUCCESS}{{container_id="{C}",container_id="{C}",name="x"}} 1\n'.encode()
        + f'{metrics.LAST_SUCCESS}{{name="no id"}} 1\n'.encode()
        + f'{metrics.LAST_SUCCESS}{{container_id="",name="empty id"}} 1\n'.encode()
        + f'{metrics.LAST_SUCCESS}{{container_id="{C}",name="x"}}1\n'.encode()  # no space before the value
        + f'{metrics.LAST_SUCCESS}{{container_id="{C}",name="x"}} 1 2 3\n'.encode()
        + f'node_cpu_seconds_total{{container_id="{C}",name="x"}} 1\n'.encode()  # not ours
        + b"# HELP pipeline_snapshot_last_success_timestamp_seconds {\n# TYPE x gauge\n\n   \n{}\n"
        + good.encode()
        + b"\x00" * 100
    )
    _write(path, [], [], 1_700_000_100.0)

    text = path.read_text()
    assert _per_container(text, metrics.LAST_SUCCESS) == {D: ("kept", 1700000000.5)}
    assert all(_per_container(text, m) == {} for m in PER_CONTAINER if m != metrics.LAST_SUCCESS)


def test_a_previous_file_too_large_to_be_ours_is_not_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "pipeline.prom"
    _write(path, [_record(A, "web-1")], [], PERIOD)
    monkeypatch.setattr(metrics, "_MAX_PREVIOUS", 100)
    _write(path, [], [], PERIOD + 1)
    assert _per_container(path.read_text(), metrics.LAST_SUCCESS) == {}


def test_the_file_is_replaced_by_a_rename_and_is_readable_by_node_exporter(tmp_path: Path) -> None:
    path = tmp_path / "textfile" / "pipeline.prom"
    old_umask = os.umask(0o077)
    try:
        _write(path, [_record(A, "web-1")], [], PERIOD)
        first = path.stat()
        _write(path, [_record(A, "web-1")], [], PERIOD + 1)
    finally:
        os.umask(old_umask)
    second = path.stat()
    assert (first.st_mode & 0o777, second.st_mode & 0o777) == (0o644, 0o644)
    assert first.st_ino != second.st_ino  # a new file renamed into place, never rewritten in place
    assert sorted(p.name for p in path.parent.iterdir()) == [".pipeline.prom.lock", "pipeline.prom"]


_KILLED_WRITER = """
import sys
from pathlib import Path
from pipeline.snapshots import metrics
metrics.write_metrics(Path(sys.argv[1]), [], run_stamp="2026-11-28T0400", started=0.0, finished=1.0, failed=[],
                      bytes_written=0)
"""


def test_a_writer_killed_before_the_rename_leaves_the_previous_file_whole(tmp_path: Path) -> None:
    path = tmp_path / "pipeline.prom"
    _write(path, [_record(A, "web-1")], [], PERIOD)
    before = path.read_bytes()
    env = os.environ | {"PIPELINE_FAILPOINTS": "atomic:before-rename@1"}
    killed = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(path)], cwd=REPO, env=env, check=False)
    assert killed.returncode == -signal.SIGKILL
    assert path.read_bytes() == before
    assert any(p.name.startswith(".pipeline.prom.partial-") for p in tmp_path.iterdir())

    _write(path, [], [], PERIOD + 1)  # the next run removes the dead writer's temporary file
    assert sorted(p.name for p in tmp_path.iterdir()) == [".pipeline.prom.lock", "pipeline.prom"]
    assert set(_per_container(path.read_text(), metrics.LAST_SUCCESS)) == {A}


def test_a_metrics_path_that_cannot_be_written_is_an_output_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "pipeline.prom"
    path.mkdir()
    with pytest.raises(OutputError, match=re.escape(str(path))):
        _write(path, [_record(A, "web-1")], [], PERIOD)


def test_a_run_stamp_that_is_not_a_snapshot_stamp_is_refused() -> None:
    with pytest.raises(ValueError, match="not a snapshot stamp"):
        metrics.build_metrics([], run_stamp="yesterday", started=0, finished=1, failed=[], bytes_written=0)


def _hostile_file(tmp_path: Path) -> Path:
    path = tmp_path / "textfile" / "pipeline.prom"
    names = [name for name, _ in HOSTILE]
    records = [_record(f"{i:064x}", name) for i, name in enumerate(names)]
    _write(path, records, [(C, 'fail"ed\n\\')], PERIOD)
    return path


@pytest.mark.tools("promtool")
def test_promtool_accepts_the_file(tmp_path: Path) -> None:
    path = _hostile_file(tmp_path)
    with open(path, "rb") as stdin:
        checked = subprocess.run(["promtool", "check", "metrics"], stdin=stdin, capture_output=True, check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout + checked.stderr == b""  # no lint remark either


@pytest.mark.tools("prometheus-node-exporter")
def test_node_exporter_serves_the_file_with_every_name_intact(tmp_path: Path) -> None:
    path = _hostile_file(tmp_path)
    port = free_port()
    command = [
        "prometheus-node-exporter",
        f"--web.listen-address={HOST}:{port}",
        "--collector.disable-defaults",
        "--collector.textfile",
        f"--collector.textfile.directory={path.parent}",
    ]
    with _process(command, tmp_path / "node-exporter.log") as log:
        text = _get_when_up(f"http://{HOST}:{port}/metrics", log).decode()
    samples = _samples(text)
    assert samples[("node_textfile_scrape_error", ())] == 0, text
    assert _per_container(text, metrics.LAST_SUCCESS) == _per_container(path.read_text(), metrics.LAST_SUCCESS)
    assert {n for n, _ in _per_container(text, metrics.LAST_SUCCESS).values()} == {s for _, s in HOSTILE}


# --- luigid's own metrics -----------------------------------------------------------------------------------------

_TINY_TASK = """
import luigi


class Tiny(luigi.Task):
    path = luigi.Parameter()

    def output(self):
        return luigi.LocalTarget(self.path)

    def run(self):
        with self.output().open("w") as out:
            out.write("done")
"""


def test_luigid_with_the_production_config_serves_luigi_metrics_after_a_task_ran(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # luigid as luigid.service starts it: the host's config (production.cfg) named by LUIGI_CONFIG_PATH.
    monkeypatch.setenv("LUIGI_CONFIG_PATH", str(PRODUCTION_CFG))
    with run_luigid(tmp_path / "luigid") as luigid:
        before = _get(luigid, "/metrics")
        assert b"luigi_task_started_total{" not in before[1]
        ran = _run_tiny_task(luigid, tmp_path)
        assert ran.returncode == 0, ran.stderr + luigid.log()
        content_type, body = _get(luigid, "/metrics")

    assert content_type.startswith("text/plain"), content_type
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    assert {"luigi_task_started", "luigi_task_done", "luigi_task_failed", "luigi_task_disabled"} <= set(families)
    assert families["luigi_task_done"].type == "counter"
    assert families["luigi_task_execution_time_seconds"].type == "gauge"
    samples = _samples(body.decode())
    assert samples[("luigi_task_started_total", (("family", "Tiny"),))] == 1
    assert samples[("luigi_task_done_total", (("family", "Tiny"),))] == 1
    assert samples[("luigi_task_execution_time_seconds", (("family", "Tiny"),))] >= 0
    assert ("luigi_task_failed_total", (("family", "Tiny"),)) not in samples


def test_luigid_serves_no_metrics_without_the_collector_setting(luigid: Luigid, tmp_path: Path) -> None:
    ran = _run_tiny_task(luigid, tmp_path)
    assert ran.returncode == 0, ran.stderr + luigid.log()
    assert _get(luigid, "/metrics")[1] == b""


def _run_tiny_task(luigid: Luigid, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """One trivial task run by a worker scheduled through luigid, in a directory without any luigi.cfg."""
    work = tmp_path / "worker"
    work.mkdir()
    (work / "tiny_task.py").write_text(textwrap.dedent(_TINY_TASK))
    env = {k: v for k, v in scrubbed_env().items() if k != "LUIGI_CONFIG_PATH"} | {"PYTHONPATH": str(work)}
    command = [sys.executable, "-m", "luigi", "--module", "tiny_task", "Tiny", "--path", str(work / "out.txt")]
    return subprocess.run(
        [*command, *luigid.flags(), "--no-lock"], cwd=work, env=env, capture_output=True, text=True, timeout=60
    )


def _get(luigid: Luigid, path: str) -> tuple[str, bytes]:
    with _OPENER.open(f"http://{HOST}:{luigid.port}{path}", timeout=5) as answer:
        return answer.headers.get("Content-Type", ""), answer.read()


@contextlib.contextmanager
def _process(command: list[str], log: Path) -> Iterator[Path]:
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=scrubbed_env())
    try:
        yield log
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def _get_when_up(url: str, log: Path, timeout: float = 20.0) -> bytes:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with _OPENER.open(url, timeout=2) as answer:
                body: bytes = answer.read()
                return body
        except OSError:
            if time.monotonic() > deadline:
                raise AssertionError(f"{url} did not answer:\n{log.read_text(errors='replace')}") from None
            time.sleep(0.05)


# --- one story for luigid: the units and production.cfg -------------------------------------------------------------


def _unit(name: str) -> dict[str, list[str]]:
    """A systemd unit's settings (continuation lines joined), each key with every value it is given."""
    settings_: dict[str, list[str]] = {}
    text = re.sub(r"\\\n\s*", " ", (UNITS / name).read_text())
    for line in text.splitlines():
        if line and not line.startswith(("#", "[")) and "=" in line:
            key, _, value = line.partition("=")
            settings_.setdefault(key.strip(), []).append(value.strip())
    return settings_


def test_the_units_and_production_config_tell_one_story() -> None:
    """One luigid per host on 127.0.0.1 that the snapshot runs use, both reading the host's config, which turns on
    luigid's metrics and puts the runs' metrics file where the snapshot unit may write."""
    config = configparser.ConfigParser(interpolation=None)
    config.read(PRODUCTION_CFG)
    luigid, snapshot = _unit("luigid.service"), _unit("pipeline-snapshot.service")

    exec_start = shlex.split(luigid["ExecStart"][0])
    address, port = exec_start[exec_start.index("--address") + 1], exec_start[exec_start.index("--port") + 1]
    assert (address, port) == ("127.0.0.1", config["core"]["scheduler_port"])
    assert config["core"]["scheduler_host"] == "127.0.0.1" and not config.getboolean("core", "local_scheduler")
    scheduler = next(v for v in snapshot["Environment"] if v.strip('"').startswith("SCHEDULER="))
    assert scheduler.strip('"') == f"SCHEDULER=--scheduler-host 127.0.0.1 --scheduler-port {port}"

    host_config = {v for v in luigid["Environment"] + snapshot["Environment"] if v.startswith("LUIGI_CONFIG_PATH=")}
    assert host_config == {"LUIGI_CONFIG_PATH=/etc/pipeline/luigi.cfg"}
    assert config["scheduler"]["metrics_collector"] == "prometheus"
    metrics_dir = str(Path(config["snapshot"]["metrics_file"]).parent)
    writable = [p.lstrip("-") for p in " ".join(snapshot["ReadWritePaths"]).split()]
    assert metrics_dir in writable
    for unit in (luigid, snapshot):
        assert unit["IPAddressAllow"] == ["localhost"] and unit["IPAddressDeny"] == ["any"]

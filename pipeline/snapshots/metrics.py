"""Prometheus metrics of snapshot runs, written as a file for node_exporter's textfile collector.

The file is in the text exposition format (https://prometheus.io/docs/instrumenting/exposition_formats/) and follows
the textfile collector's convention (https://github.com/prometheus/node_exporter#textfile-collector): a `*.prom` file
replaced atomically, by a temporary sibling renamed over it, so the collector never reads half a file; no sample
timestamps (the collector refuses them). Per-container samples are read back from the previous file and carried over,
so a container's last success survives a run that failed it or did not select it.
"""

import fcntl
import logging
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from pipeline.errors import OutputError
from pipeline.host.atomic import atomic_path, make_dirs
from pipeline.snapshots.catalog import SnapshotRecord
from pipeline.snapshots.snapshot import STAMP_FORMAT

log = logging.getLogger(__name__)

# Of the last run (the file's writer): gauges, replaced by every run.
RUN_CONTAINERS = "pipeline_snapshot_run_containers"
RUN_DURATION = "pipeline_snapshot_run_duration_seconds"
RUN_WRITTEN = "pipeline_snapshot_run_written_bytes"
RUN_TIMESTAMP = "pipeline_snapshot_run_timestamp_seconds"
RUN_PERIOD = "pipeline_snapshot_run_period_timestamp_seconds"
# Per container (labels container_id, name): carried over from the previous file until updated.
LAST_SUCCESS = "pipeline_snapshot_last_success_timestamp_seconds"
LAST_DURATION = "pipeline_snapshot_last_duration_seconds"
LAST_ARCHIVE = "pipeline_snapshot_last_archive_bytes"
LAST_FAILURE = "pipeline_snapshot_last_failure_timestamp_seconds"

STATUSES = ("new", "unchanged", "failed")  # RUN_CONTAINERS's status label; "unchanged" is a record's "reused"

_HELP = {
    RUN_CONTAINERS: "Containers in the last snapshot run, by outcome: new snapshot, unchanged (the previous"
    " snapshot's archive reused), failed.",
    RUN_DURATION: "How long the last snapshot run took, in seconds.",
    RUN_WRITTEN: "Bytes the last snapshot run wrote: new layer blobs and archive files.",
    RUN_TIMESTAMP: "When the last snapshot run finished, in seconds since the epoch.",
    RUN_PERIOD: "The snapshot stamp (start of its period, UTC) of the last run, in seconds since the epoch.",
    LAST_SUCCESS: "When a run last ended with a snapshot of this container (new or unchanged), in seconds since"
    " the epoch.",
    LAST_DURATION: "How long the container's last successful snapshot took, in seconds.",
    LAST_ARCHIVE: "Size of the archive of the container's last successful snapshot (for an unchanged one, the"
    " earlier archive it reuses), in bytes.",
    LAST_FAILURE: "When a run last failed to snapshot this container, in seconds since the epoch.",
}

# A container none of whose samples was updated for this long (gone from the host, or never selected again) is
# dropped from the file rather than alerting forever.
FORGET_AFTER = 30 * 24 * 3600.0
# A previous file larger than this is not ours: it is ignored rather than read into memory.
_MAX_PREVIOUS = 64 << 20
_LABELS = ("container_id", "name")
_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")
_UNESCAPE = {"\\": "\\", '"': '"', "n": "\n"}


@dataclass(frozen=True)
class ContainerMetrics:
    """One container's per-container samples; None where the file has none (a container that never succeeded)."""

    container_id: str
    name: str
    last_success: float | None = None
    last_duration: float | None = None
    last_archive_bytes: float | None = None
    last_failure: float | None = None

    def newest(self) -> float:
        """The latest of its timestamps (-inf if it has none)."""
        times = [t for t in (self.last_success, self.last_failure) if t is not None]
        return max(times, default=-math.inf)


_FIELDS = {
    LAST_SUCCESS: "last_success",
    LAST_DURATION: "last_duration",
    LAST_ARCHIVE: "last_archive_bytes",
    LAST_FAILURE: "last_failure",
}


def write_metrics(
    path: Path,
    records: Sequence[SnapshotRecord],
    *,
    run_stamp: str,
    started: float,
    finished: float,
    failed: Sequence[tuple[str, str]],
    bytes_written: int,
    forget_after: float = FORGET_AFTER,
) -> None:
    """Replace the metrics file at path with this run's metrics, carrying over the per-container samples of
    containers this run did not snapshot. failed holds (container id, name) pairs.

    Writers take turns (a flock on a `.<name>.lock` sibling, which the collector ignores: it reads only `*.prom`),
    so two overlapping runs never lose each other's updates. The file is made readable by everyone whatever the
    umask: node_exporter runs as its own user."""
    make_dirs(path.parent)
    try:
        lock = os.open(path.with_name(f".{path.name}.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise OutputError(f"{path}: cannot write the metrics file ({e.strerror}); choose a writable location") from e
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        text = build_metrics(
            records,
            run_stamp=run_stamp,
            started=started,
            finished=finished,
            failed=failed,
            bytes_written=bytes_written,
            previous=read_container_metrics(_read_previous(path)),
            forget_after=forget_after,
        )
        try:
            with atomic_path(path) as temp:
                fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
                with open(fd, "wb") as out:
                    os.fchmod(fd, 0o644)
                    out.write(text.encode())
        except OSError as e:
            raise OutputError(
                f"{path}: cannot write the metrics file ({e.strerror}); choose a writable location"
            ) from e
    finally:
        os.close(lock)


def build_metrics(
    records: Sequence[SnapshotRecord],
    *,
    run_stamp: str,
    started: float,
    finished: float,
    failed: Sequence[tuple[str, str]],
    bytes_written: int,
    previous: Mapping[str, ContainerMetrics] | None = None,
    forget_after: float = FORGET_AFTER,
) -> str:
    """The metrics file's text: this run's gauges, and per container its samples (this run's where it took part,
    else previous's, keyed by container id)."""
    snapshotted = {r.container_id for r in records}
    failed_ids = {cid for cid, _ in failed} - snapshotted
    unchanged = sum(1 for r in records if r.status == "reused")
    counts = {"new": len(records) - unchanged, "unchanged": unchanged, "failed": len(failed_ids)}
    containers = build_container_metrics(previous or {}, records, failed, finished, forget_after)
    try:
        period = datetime.strptime(run_stamp, STAMP_FORMAT).replace(tzinfo=UTC).timestamp()
    except ValueError as e:
        raise ValueError(f"run_stamp {run_stamp!r} is not a snapshot stamp ({STAMP_FORMAT})") from e

    lines: list[str] = []
    _family(lines, RUN_CONTAINERS, ((f'{{status="{s}"}}', counts[s]) for s in STATUSES))
    _family(lines, RUN_DURATION, [("", max(0.0, finished - started))])
    _family(lines, RUN_WRITTEN, [("", bytes_written)])
    _family(lines, RUN_TIMESTAMP, [("", finished)])
    _family(lines, RUN_PERIOD, [("", period)])
    ordered = sorted(containers.values(), key=lambda c: (c.name, c.container_id))
    for metric, field in _FIELDS.items():
        samples = [(_container_labels(c), getattr(c, field)) for c in ordered]
        _family(lines, metric, [(labels, value) for labels, value in samples if value is not None])
    return "".join(line + "\n" for line in lines)


def build_container_metrics(
    previous: Mapping[str, ContainerMetrics],
    records: Iterable[SnapshotRecord],
    failed: Iterable[tuple[str, str]],
    finished: float,
    forget_after: float = FORGET_AFTER,
) -> dict[str, ContainerMetrics]:
    """previous updated with this run: a snapshotted container's success, a failed one's failure (its last
    success kept); containers not updated for forget_after seconds are left out."""
    containers = {
        cid: c for cid, c in previous.items() if c.container_id == cid and c.newest() >= finished - forget_after
    }
    for cid, name in failed:
        old = containers.get(cid, ContainerMetrics(cid, name))
        containers[cid] = replace(old, name=name, last_failure=finished)
    for record in records:
        old = containers.get(record.container_id, ContainerMetrics(record.container_id, record.name))
        containers[record.container_id] = replace(
            old,
            name=record.name,
            last_success=finished,
            last_duration=float(record.duration),
            last_archive_bytes=float(record.archive_size),
        )
    return containers


def read_container_metrics(text: str) -> dict[str, ContainerMetrics]:
    """The per-container samples of a metrics file this module wrote, keyed by container id. Anything else (other
    metrics, damaged or foreign lines, non-finite values) is ignored, never an error."""
    names: dict[str, str] = {}
    samples: dict[str, dict[str, float]] = {}
    for line in text.split("\n"):
        sample = _parse_sample(line)
        if sample is None:
            continue
        metric, labels, value = sample
        if metric not in _FIELDS or sorted(labels) != sorted(_LABELS) or not labels["container_id"]:
            continue
        cid = labels["container_id"]
        names[cid] = labels["name"]
        samples.setdefault(cid, {})[metric] = value
    return {
        cid: ContainerMetrics(
            cid,
            names[cid],
            last_success=found.get(LAST_SUCCESS),
            last_duration=found.get(LAST_DURATION),
            last_archive_bytes=found.get(LAST_ARCHIVE),
            last_failure=found.get(LAST_FAILURE),
        )
        for cid, found in samples.items()
    }


def escape_label_value(value: str) -> str:
    """value as a label value between double quotes: backslash, double quote and newline escaped, as the
    exposition format asks. A name is hostile input, so first what cannot be UTF-8 (undecodable bytes, which
    Python holds as surrogates) and control characters other than newline and tab (a carriage return, a line
    separator: some readers split lines there) are spelled out as Python escapes: b"caf\\xe9" shows as caf\\xe9.
    Every value then stays on its line, and the spelling is its own fixed point, so a value read back and written
    again is unchanged."""
    try:
        printable = value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that no undecodable byte made
        printable = value.encode("utf-8", "backslashreplace").decode("utf-8")
    printable = _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), printable)
    return printable.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _read_previous(path: Path) -> str:
    """The previous file's text, or "" when there is none or it cannot be ours (unreadable, too large)."""
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_PREVIOUS + 1)
    except FileNotFoundError:
        return ""
    except OSError as e:
        log.warning("%s: cannot read the previous metrics (%s); per-container metrics start afresh", path, e.strerror)
        return ""
    if len(data) > _MAX_PREVIOUS:
        log.warning(
            "%s: over %d bytes, not a metrics file of ours; per-container metrics start afresh", path, _MAX_PREVIOUS
        )
        return ""
    return data.decode("utf-8", "replace")


def _family(lines: list[str], metric: str, samples: Iterable[tuple[str, float]]) -> None:
    lines.append(f"# HELP {metric} {_HELP[metric]}")
    lines.append(f"# TYPE {metric} gauge")
    lines.extend(f"{metric}{labels} {_format_value(value)}" for labels, value in samples)


def _container_labels(container: ContainerMetrics) -> str:
    cid, name = escape_label_value(container.container_id), escape_label_value(container.name)
    return f'{{container_id="{cid}",name="{name}"}}'


def _format_value(value: float) -> str:
    """Whole numbers without a fraction (byte counts stay exact below 2**53); others as Python's shortest repr,
    which Go's ParseFloat (node_exporter's parser) reads back exactly."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


def _parse_sample(line: str) -> tuple[str, dict[str, str], float] | None:
    """(metric, labels, value) of one sample line, or None for comments, blanks and anything malformed."""
    match = _NAME.match(line)
    if match is None:
        return None
    metric, rest = match.group(), line[match.end() :]
    labels: dict[str, str] = {}
    if rest.startswith("{"):
        parsed = _parse_labels(rest)
        if parsed is None:
            return None
        labels, rest = parsed
    fields = rest.split()
    if not rest[:1].isspace() or len(fields) not in (1, 2) or not _NUMBER.fullmatch(fields[0]):
        return None
    value = float(fields[0])
    return (metric, labels, value) if math.isfinite(value) else None


def _parse_labels(text: str) -> tuple[dict[str, str], str] | None:
    """The labels of `{a="x",b="y"}rest` and rest; None unless well formed, each label once."""
    labels: dict[str, str] = {}
    i = 1
    while True:
        if text.startswith("}", i):
            return labels, text[i + 1 :]
        match = _NAME.match(text, i)
        if match is None or not text.startswith('="', match.end()):
            return None
        key, i = match.group(), match.end() + 2
        value: list[str] = []
        while i < len(text) and text[i] != '"':
            if text[i] == "\\":
                unescaped = _UNESCAPE.get(text[i + 1 : i + 2])
                if unescaped is None:
                    return None
                value.append(unescaped)
                i += 2
            else:
                value.append(text[i])
                i += 1
        if i >= len(text) or key in labels:
            return None
        labels[key] = "".join(value)
        i += 1
        if text.startswith(",", i):
            i += 1

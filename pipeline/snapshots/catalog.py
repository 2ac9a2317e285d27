"""The snapshot catalog: one JSON record per snapshot, and a JSON-lines index of them all for people and tools.

Each record is its own file (<output_dir>/catalog/records/<container-id>/<stamp>.json), written atomically: it is the
luigi target of that snapshot, so concurrent workers and hosts never contend for one file and a killed run
leaves every record whole. catalog.jsonl is rebuilt from the records after each run (grep- and jq-friendly);
SQLite was rejected because one shared database file needs cross-process locking that luigi targets avoid.
"""

import fcntl
import json
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from pipeline import jsoncheck
from pipeline.errors import StorageError
from pipeline.host.atomic import make_dirs, write_bytes_atomic

log = logging.getLogger(__name__)

INDEX_NAME = "catalog.jsonl"


@dataclass(frozen=True)
class SnapshotRecord:
    """One snapshot of one container; status "reused" means archive is an earlier snapshot's (nothing changed)."""

    container_id: str
    name: str
    stamp: str
    reference: str
    archive: str
    config_digest: str
    diff_ids: tuple[str, ...]
    layer_sizes: tuple[int, ...]
    archive_size: int
    fingerprint: str
    duration: float
    status: str  # "new" | "reused"
    reused_from: str = ""
    # Digest of what else the snapshot was made of: the image layers' keys and the container's metadata
    # (plan.ContainerState); "" in records from before it was kept, which are then never reused.
    source: str = ""
    # "store": the snapshot is reference in the snapshot store at archive (store.SnapshotStore); "" for a
    # standalone archive. deltas: how many delta layers the image has on its last full container layer.
    format: str = ""
    deltas: int = 0

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes, where: Path) -> "SnapshotRecord":
        try:
            doc = jsoncheck.loads(data)
            _check_record(doc)
            doc["diff_ids"] = tuple(doc["diff_ids"])
            doc["layer_sizes"] = tuple(doc["layer_sizes"])
            return cls(**doc)
        except (ValueError, KeyError, TypeError) as e:
            raise StorageError(f"{where}: damaged snapshot record ({e}); delete it and re-run the snapshot") from e


_RECORD_STRINGS = ("container_id", "name", "stamp", "reference", "archive", "config_digest", "fingerprint")


def _check_record(doc: Any) -> None:
    """Raise FieldError (a ValueError) unless doc has SnapshotRecord's fields with their types; a missing or extra
    field is left to the constructor's TypeError."""
    if not isinstance(doc, dict):
        raise jsoncheck.FieldError("the record", "a JSON object", doc)
    for key in (*_RECORD_STRINGS, "reused_from", "source", "format"):
        if key in doc:
            jsoncheck.string(doc[key], key)
    if doc.get("status") not in ("new", "reused"):
        raise jsoncheck.FieldError("status", '"new" or "reused"', doc.get("status"))
    diff_ids, sizes = jsoncheck.strings(doc.get("diff_ids"), "diff_ids"), doc.get("layer_sizes")
    if not isinstance(sizes, list) or diff_ids is None or len(sizes) != len(diff_ids):
        raise jsoncheck.FieldError("layer_sizes", "an array with one size per diff_id", sizes)
    for index, size in enumerate(sizes):
        jsoncheck.whole_number(size, f"layer_sizes[{index}]", 0)
    jsoncheck.whole_number(doc.get("archive_size"), "archive_size", 0)
    jsoncheck.whole_number(doc.get("deltas", 0), "deltas", 0)
    duration = doc.get("duration")
    if isinstance(duration, bool) or not isinstance(duration, (int, float)):
        raise jsoncheck.FieldError("duration", "a number of seconds", duration)


def catalog_dir(output_dir: Path) -> Path:
    return output_dir / "catalog"


def store_dir(output_dir: Path) -> Path:
    """The snapshot store (one OCI layout shared by every snapshot of the store format)."""
    return output_dir / "store"


def snapshots_dir(output_dir: Path) -> Path:
    """Where snapshot archives go: one directory per container (archive_path)."""
    return output_dir / "snapshots"


def archive_path(output_dir: Path, directory: str, stamp: str, fmt: str) -> Path:
    """<output_dir>/snapshots/<directory>/<stamp>.tar (a directory without .tar for oci-dir)."""
    return snapshots_dir(output_dir) / directory / (stamp if fmt == "oci-dir" else f"{stamp}.tar")


def run_summary_path(output_dir: Path, stamp: str, selection: str) -> Path:
    """The summary a SnapshotAll run writes last: its luigi target."""
    return catalog_dir(output_dir) / "runs" / f"{stamp}-{selection}.json"


def pruned_dir(output_dir: Path) -> Path:
    return catalog_dir(output_dir) / "pruned"


def record_path(output_dir: Path, container_id: str, stamp: str) -> Path:
    return catalog_dir(output_dir) / "records" / container_id / f"{stamp}.json"


def pruned_path(output_dir: Path, container_id: str, stamp: str) -> Path:
    """The marker retention leaves for a snapshot it pruned: that snapshot is done, not missing, so a run still
    in flight (or one re-run in its period) never takes it for work left to do."""
    return pruned_dir(output_dir) / container_id / stamp


def read_records(output_dir: Path, container_id: str | None = None) -> list[SnapshotRecord]:
    """All records (of one container, if given), oldest stamp first."""
    root = catalog_dir(output_dir) / "records"
    dirs = [root / container_id] if container_id else sorted(p for p in root.glob("*") if p.is_dir())
    records = []
    for directory in dirs:
        for path in sorted(directory.glob("*.json")):
            try:
                data = path.read_bytes()
            except FileNotFoundError:  # pruned by retention since it was listed
                continue
            records.append(SnapshotRecord.from_json(data, path))
    return sorted(records, key=lambda r: (r.stamp, r.name, r.container_id))


def previous_record(output_dir: Path, container_id: str, stamp: str) -> SnapshotRecord | None:
    """The container's latest snapshot taken before stamp whose archive still exists: records read newest first
    (a record's file is named by its stamp), so a long history costs no more than a short one."""
    directory = catalog_dir(output_dir) / "records" / container_id
    for path in sorted(directory.glob("*.json"), reverse=True):
        if path.stem >= stamp:
            continue
        try:
            data = path.read_bytes()
        except FileNotFoundError:  # pruned by retention since it was listed
            continue
        record = SnapshotRecord.from_json(data, path)
        if record.stamp < stamp and Path(record.archive).exists():
            return record
    return None


def read_record(output_dir: Path, container_id: str, stamp: str) -> SnapshotRecord:
    path = record_path(output_dir, container_id, stamp)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise StorageError(f"{path}: cannot read the snapshot record ({e.strerror}); re-run the snapshot") from e
    return SnapshotRecord.from_json(data, path)


def reuse_record(previous: SnapshotRecord, stamp: str, duration: float) -> SnapshotRecord:
    """The record of a snapshot whose container did not change: it points at the previous archive."""
    return replace(
        previous,
        stamp=stamp,
        duration=duration,
        status="reused",
        reused_from=previous.reused_from or previous.stamp,
    )


def failure_path(output_dir: Path, stamp: str, container_id: str) -> Path:
    """A container whose snapshot of stamp failed: its name and the one-line error (removed when it succeeds)."""
    return catalog_dir(output_dir) / "failed" / stamp / container_id


def record_failure(output_dir: Path, stamp: str, container_id: str, name: str, error: str) -> None:
    write_bytes_atomic(
        failure_path(output_dir, stamp, container_id), json.dumps({"name": name, "error": error}).encode()
    )


def clear_failure(output_dir: Path, stamp: str, container_id: str) -> None:
    failure_path(output_dir, stamp, container_id).unlink(missing_ok=True)


def read_failures(output_dir: Path, stamp: str) -> list[tuple[str, str]]:
    """(container id, name) of each container whose snapshot of stamp failed and has not succeeded since."""
    found = []
    for path in sorted((catalog_dir(output_dir) / "failed" / stamp).glob("*")):
        try:
            name = jsoncheck.loads(path.read_bytes()).get("name", "")
        except (OSError, ValueError, AttributeError):
            name = ""
        found.append((path.name, name if isinstance(name, str) else ""))
    return found


def with_duration(record: SnapshotRecord, seconds: float) -> SnapshotRecord:
    return replace(record, duration=round(seconds, 3))


def read_records_of_stamp(output_dir: Path, stamp: str) -> list[SnapshotRecord]:
    return [r for r in read_records(output_dir) if r.stamp == stamp]


def count_records_of_stamp(output_dir: Path, stamp: str) -> int:
    """How many containers have a record of this snapshot time (files counted, none read)."""
    return len(list((catalog_dir(output_dir) / "records").glob(f"*/{stamp}.json")))


@contextmanager
def locked(output_dir: Path) -> Iterator[None]:
    """Exclusive use of the catalog (flock), for what reads many records and deletes some: the index and
    retention. Records themselves are written without it (each is its own file, written atomically)."""
    directory = catalog_dir(output_dir)
    make_dirs(directory)
    fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def read_targets(paths: list[Path]) -> list[SnapshotRecord]:
    """The records at paths; one pruned meanwhile by an overlapping run's retention is left out, with a note."""
    records = []
    for path in paths:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            log.info("%s: pruned by another run's retention since it was written", path)
            continue
        records.append(SnapshotRecord.from_json(data, path))
    return records


def write_index(output_dir: Path) -> Path:
    """Rebuild catalog.jsonl from every record, atomically: each record's own line (as to_json wrote it), in
    read_records' order. A record that is not one such line is read in full, so a damaged one fails as there."""
    root = catalog_dir(output_dir) / "records"
    lines: list[tuple[tuple[str, str, str], bytes]] = []
    for path in root.glob("*/*.json"):
        try:
            data = path.read_bytes()
        except FileNotFoundError:  # pruned by retention since it was listed
            continue
        try:
            doc = json.loads(data)
            key = (doc["stamp"], doc["name"], doc["container_id"])
            if not all(isinstance(k, str) for k in key) or b"\n" in data or data != data.strip():
                raise ValueError
        except (ValueError, KeyError, TypeError):
            record = SnapshotRecord.from_json(data, path)  # the one-line error, or the record
            key, data = (record.stamp, record.name, record.container_id), record.to_json()
        lines.append((key, data))
    path = catalog_dir(output_dir) / INDEX_NAME
    write_bytes_atomic(path, b"".join(data + b"\n" for _, data in sorted(lines)))
    return path


def format_table(records: list[SnapshotRecord]) -> str:
    """The records as an aligned text table, one line each."""
    header = ("STAMP", "NAME", "CONTAINER", "STATUS", "SIZE", "SECONDS", "REFERENCE", "ARCHIVE")
    rows = [
        (
            r.stamp,
            r.name,
            r.container_id[:12],
            r.status,
            _human(r.archive_size),
            f"{r.duration:.2f}",
            r.reference,
            r.archive,
        )
        for r in records
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=True)) + "  " + row[-1]
        for row in [header, *rows]
    )


def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def main(argv: list[str] | None = None) -> int:
    """`pipeline-snapshots [OUTPUT_DIR]`: print the catalog as a table (OUTPUT_DIR defaults to ./images)."""
    args = sys.argv[1:] if argv is None else argv
    print(format_table(read_records(Path(args[0] if args else "images"))))
    return 0

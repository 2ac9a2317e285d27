import json
import os
import time
from pathlib import Path

from pipeline.catalog import SnapshotRecord, record_path
from pipeline.retention import plan_retention


def _record(output_dir: Path, stamp: str, diff_id: str) -> None:
    archive = output_dir / f"{stamp}.tar"
    archive.write_bytes(b"archive")
    record = SnapshotRecord("c" * 64, "web", stamp, f"web:{stamp}", str(archive), "sha256:" + "0" * 64,
                            (diff_id,), (1,), 7, "fp", 0.1, "new")  # fmt: skip
    path = record_path(output_dir, record.container_id, stamp)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(record.to_json())


def test_compressed_forms_of_kept_layers_stay_and_the_others_go_with_their_mappings(tmp_path: Path) -> None:
    out, cache = tmp_path / "out", tmp_path / "cache"
    out.mkdir()
    blobs = cache / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    kept, old, kept_gz, old_gz = ("1" * 64, "2" * 64, "3" * 64, "4" * 64)
    for name in (kept, old, kept_gz, old_gz):
        (blobs / name).write_bytes(b"blob")
        past = time.time() - 7200
        os.utime(blobs / name, (past, past))
    (cache / "compressed").mkdir()
    for diff_id, digest in ((kept, kept_gz), (old, old_gz)):
        mapping = {"diff_id": f"sha256:{diff_id}", "digest": f"sha256:{digest}"}
        (cache / "compressed" / f"{diff_id}-gzip-1.json").write_text(json.dumps(mapping))
    _record(out, "2026-11-28T0400", f"sha256:{old}")
    _record(out, "2026-11-28T0500", f"sha256:{kept}")

    plan = plan_retention(out, cache, keep=1, grace_seconds=60)

    doomed = {p.name for p in plan.paths}
    assert {old, old_gz, f"{old}-gzip-1.json", "2026-11-28T0400.tar"} <= doomed
    assert not {kept, kept_gz, f"{kept}-gzip-1.json", "2026-11-28T0500.tar"} & doomed

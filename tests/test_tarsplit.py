"""Reassembly of original layer tars from tar-split records: real podman layers rebuilt to their recorded digests,
and changed files, missing files, hostile paths and damaged records refused with the entry named."""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastcrc import crc64

from pipeline.errors import LayerError
from pipeline.layer.tarsplit import TarSplitMismatch, write_layer_from_tarsplit
from tests.support.podman_storage import PodmanStorage, build_podman_storage
from tests.support.tarsplit_records import (
    crc_payload,
    disassemble,
    file_entry,
    read_tar_split,
    segment,
    write_tar_split,
)

# --- real podman storage ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PodmanStorage]:
    storage = build_podman_storage(tmp_path_factory.mktemp("podman"))
    try:
        yield storage
    finally:
        shutil.rmtree(storage.runroot, ignore_errors=True)


def _stored_layers(podman: PodmanStorage) -> list[dict[str, Any]]:
    """layers.json records of the layers podman keeps tar-split records for (image layers, not containers')."""
    layers: list[dict[str, Any]] = json.loads((podman.root / "overlay-layers/layers.json").read_text())
    return [layer for layer in layers if _tar_split(podman, layer).exists()]


def _tar_split(podman: PodmanStorage, layer: dict[str, Any]) -> Path:
    return podman.root / "overlay-layers" / f"{layer['id']}.tar-split.gz"


def _diff(podman: PodmanStorage, layer: dict[str, Any]) -> Path:
    return podman.root / "overlay" / str(layer["id"]) / "diff"


@pytest.mark.overlay
@pytest.mark.tools("podman")
def test_base_layer_is_rebuilt_byte_for_byte_with_its_recorded_digest(podman: PodmanStorage, tmp_path: Path) -> None:
    [base] = [layer for layer in _stored_layers(podman) if not layer.get("parent")]
    out_path = tmp_path / "base.tar"
    with open(out_path, "wb") as out:
        record = write_layer_from_tarsplit(_diff(podman, base), _tar_split(podman, base), out)
    assert (record.diff_id, record.size) == (base["diff-digest"], base["diff-size"])
    assert hashlib.sha256(out_path.read_bytes()).hexdigest() == record.hex
    # podman save wrote the same layer tar, named by its diff_id.
    with tarfile.open(podman.podman_archive) as saved:
        member = saved.extractfile(f"{record.hex}.tar")
        assert member is not None
        assert member.read() == out_path.read_bytes()


@pytest.mark.overlay
@pytest.mark.tools("podman")
def test_layers_whose_whiteouts_overlay_stored_as_devices_are_rebuilt(podman: PodmanStorage) -> None:
    layers = _stored_layers(podman)
    assert len(layers) == 3  # imported base, podman commit of the builder, podman commit of web
    whiteouts = 0
    for layer in layers:
        for dirpath, _, filenames in os.walk(_diff(podman, layer)):
            whiteouts += sum(stat.S_ISCHR(os.lstat(os.path.join(dirpath, n)).st_mode) for n in filenames)
        record = write_layer_from_tarsplit(_diff(podman, layer), _tar_split(podman, layer), io.BytesIO())
        assert (record.diff_id, record.size) == (layer["diff-digest"], layer["diff-size"]), layer["id"]
    assert whiteouts >= 3  # lib/old.so, var/cache, etc/hostname, gone: .wh. entries in the records


@pytest.mark.overlay
@pytest.mark.tools("podman")
def test_changed_file_in_a_real_podman_layer_is_named(podman: PodmanStorage, tmp_path: Path) -> None:
    [base] = [layer for layer in _stored_layers(podman) if not layer.get("parent")]
    copy = tmp_path / "diff"
    shutil.copytree(_diff(podman, base), copy, symlinks=True)
    (copy / "data/hello.txt").write_bytes(b"HELLO from the base layer\n")  # same size
    changed = r"'data/hello.txt' \(record 56 of .*\) differs from the content recorded \(CRC-64 mismatch\)"
    with pytest.raises(TarSplitMismatch, match=changed):
        write_layer_from_tarsplit(copy, _tar_split(podman, base), io.BytesIO())


# --- tars made here, disassembled as tar-split does -------------------------------------------------------------


def _tar_of(layer_dir: Path) -> bytes:
    """layer_dir as tar with "./" names (tar -C dir .), plus a whiteout entry that has no file on disk."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.add(layer_dir, arcname=".")
        tar.addfile(tarfile.TarInfo("./etc/.wh.hostname"))
    return out.getvalue()


@pytest.fixture
def layer(tmp_path: Path) -> tuple[Path, Path, bytes]:
    """A layer_dir, its tar-split records and the original tar they came from."""
    layer_dir = tmp_path / "diff"
    (layer_dir / "etc").mkdir(parents=True)
    (layer_dir / "bin").mkdir()
    (layer_dir / "etc/passwd").write_bytes(b"root:x:0:0:root:/root:/bin/sh\n")
    (layer_dir / "etc/empty").write_bytes(b"")
    os.link(layer_dir / "etc/passwd", layer_dir / "etc/passwd-")
    os.symlink("etc/passwd", layer_dir / "passwd-link")
    (layer_dir / "bin/tool").write_bytes(bytes(range(256)) * 4096 + b"!")  # one byte past a 1 MiB read
    (layer_dir / os.fsdecode(b"caf\xe9.bin")).write_bytes(b"latin-1 name\n")  # recorded in name_raw
    tar = _tar_of(layer_dir)
    return layer_dir, write_tar_split(tmp_path / "layer.tar-split.gz", disassemble(tar)), tar


def test_original_tar_is_rebuilt_from_records_and_files(layer: tuple[Path, Path, bytes]) -> None:
    layer_dir, tar_split, tar = layer
    assert any("name_raw" in r for r in read_tar_split(tar_split))
    out = io.BytesIO()
    record = write_layer_from_tarsplit(layer_dir, tar_split, out)
    assert out.getvalue() == tar
    assert (record.diff_id, record.size) == ("sha256:" + hashlib.sha256(tar).hexdigest(), len(tar))


def test_crc64_is_gos_iso_table() -> None:
    # Go: crc64.Checksum([]byte("123456789"), crc64.MakeTable(crc64.ISO)), the catalogue's CRC-64/GO-ISO check.
    assert crc64.go_iso(b"123456789") == 0xB90956C775A41001
    # A chunked sum continues from the previous value, as the reader feeds it 1 MiB reads.
    assert crc64.go_iso(b"56789", initial=crc64.go_iso(b"1234")) == 0xB90956C775A41001


def test_file_changed_on_disk_with_the_same_size_is_named(layer: tuple[Path, Path, bytes]) -> None:
    layer_dir, tar_split, _ = layer
    data = bytearray((layer_dir / "bin/tool").read_bytes())
    data[-2] ^= 0xFF
    (layer_dir / "bin/tool").write_bytes(data)
    with pytest.raises(TarSplitMismatch) as caught:
        write_layer_from_tarsplit(layer_dir, tar_split, io.BytesIO())
    message = str(caught.value)
    assert message.startswith(f"{layer_dir}: './bin/tool' (record ") and "\n" not in message
    assert message.endswith(") differs from the content recorded (CRC-64 mismatch); pack the directory instead")
    assert isinstance(caught.value, LayerError)


def test_file_missing_from_the_layer_directory_is_named(layer: tuple[Path, Path, bytes]) -> None:
    layer_dir, tar_split, _ = layer
    (layer_dir / "etc/passwd").unlink()  # its hard link etc/passwd- is recorded as a link: it cannot stand in
    with pytest.raises(TarSplitMismatch, match=r"'./etc/passwd' \(record [0-9]+ of .*\) is missing from the layer"):
        write_layer_from_tarsplit(layer_dir, tar_split, io.BytesIO())


def test_file_of_another_size_is_named(layer: tuple[Path, Path, bytes]) -> None:
    layer_dir, tar_split, _ = layer
    with open(layer_dir / "etc/passwd", "ab") as f:
        f.write(b"x")
    with pytest.raises(TarSplitMismatch, match=r"'./etc/passwd' .* is 31 bytes on disk, the record says 30"):
        write_layer_from_tarsplit(layer_dir, tar_split, io.BytesIO())


def _rename(old: str, new: str) -> Callable[[list[dict[str, Any]]], None]:
    def edit(records: list[dict[str, Any]]) -> None:
        [entry] = [r for r in records if r.get("name") == old]
        entry["name"] = new

    return edit


def _set(entry_name: str, **fields: Any) -> Callable[[list[dict[str, Any]]], None]:
    def edit(records: list[dict[str, Any]]) -> None:
        [entry] = [r for r in records if r.get("name") == entry_name]
        entry.update(fields)

    return edit


def _first_segment(**fields: Any) -> Callable[[list[dict[str, Any]]], None]:
    return lambda records: records[0].update(fields)


_PASSWD = 14  # the record of ./etc/passwd's content: after the root, etc/, their headers and bin/'s


@pytest.mark.parametrize(
    ("edit", "named", "number", "reason"),
    [
        (_rename("./etc/passwd", "../outside"), "../outside", _PASSWD, "leaves the layer directory (..)"),
        (_rename("./etc/passwd", "etc/../../x"), "etc/../../x", _PASSWD, "leaves the layer directory (..)"),
        (_rename("./etc/passwd", "/etc/passwd"), "/etc/passwd", _PASSWD, "is an absolute path"),
        (_rename("./etc/passwd", "etc-link/passwd"), "etc-link/passwd", _PASSWD, "has a symlink in its path"),
        (_rename("./etc/passwd", "passwd-link"), "passwd-link", _PASSWD, "is a symlink on disk"),
        (_rename("./etc/passwd", "etc/passwd/x"), "etc/passwd/x", _PASSWD, "has a non-directory in its path"),
        (_rename("./etc/passwd", "fifo"), "fifo", _PASSWD, "is not a regular file on disk"),
        (_rename("./etc/passwd", "./"), "./", _PASSWD, "names the layer directory itself"),
        (_set("./etc/passwd", size=-1), None, _PASSWD, "has invalid size -1"),
        (_set("./etc/passwd", size="30"), None, _PASSWD, "has invalid size '30'"),
        (_set("./etc/passwd", payload="not base64!"), None, _PASSWD, "has a payload that is not valid base64"),
        (_set("./etc/passwd", payload="MTIzNA=="), None, _PASSWD, "has a 4-byte checksum, not a CRC-64"),
        (_set("./etc/passwd", name=7), None, _PASSWD, "has a name that is not a string"),
        (_set("./etc/passwd", name_raw=["x"]), None, _PASSWD, "has a name_raw that is not base64 text"),
        (_first_segment(type=3), None, 1, "has unknown type 3"),
        (_first_segment(type=True), None, 1, "has unknown type True"),
        (_first_segment(payload=12), None, 1, "has a payload that is not base64 text"),
    ],
)
def test_malformed_or_escaping_record_is_refused_naming_it(
    layer: tuple[Path, Path, bytes],
    tmp_path: Path,
    edit: Callable[[list[dict[str, Any]]], None],
    named: str | None,
    number: int,
    reason: str,
) -> None:
    layer_dir, tar_split, _ = layer
    # Files the hostile names point at, with the right content: only the path checks can refuse them.
    (tmp_path / "outside").write_bytes((layer_dir / "etc/passwd").read_bytes())
    (tmp_path / "x").write_bytes((layer_dir / "etc/passwd").read_bytes())
    os.symlink("etc", layer_dir / "etc-link")
    os.mkfifo(layer_dir / "fifo")  # opening it for reading would block
    records = read_tar_split(tar_split)
    assert records[_PASSWD - 1]["name"] == "./etc/passwd"
    edit(records)
    write_tar_split(tar_split, [{k: v for k, v in r.items() if k != "position"} for r in records])
    with pytest.raises(TarSplitMismatch) as caught:
        write_layer_from_tarsplit(layer_dir, tar_split, io.BytesIO())
    where = f"record {number} of {tar_split}"
    where = where if named is None else f"{named!r} ({where})"
    assert str(caught.value) == f"{layer_dir}: {where} {reason}; pack the directory instead"


def _gzip_lines(*lines: bytes) -> bytes:
    return gzip.compress(b"".join(line + b"\n" for line in lines))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (_gzip_lines(b'{"type":2,"payload":"","position":0}', b"{not json"), r"record 2 of .* is not JSON"),
        (_gzip_lines(b"[1, 2]"), r"record 1 of .* is not a JSON object"),
        (_gzip_lines(b""), r"record 1 of .* is not JSON"),  # a blank line
        (_gzip_lines(b"[" * 100_000), r"record 1 of .* is not JSON"),  # deeper than the parser's stack
        (_gzip_lines(), r"holds no records"),
        (b"plain text, not gzip\n", r"is damaged after record 0"),
        (_gzip_lines(b'{"type":2,"payload":"AAAA"}' * 50)[:-12], r"is damaged after record 0"),  # truncated
        (None, r"tar-split .* is missing; pack the directory instead"),
    ],
)
def test_damaged_or_missing_tar_split_is_refused(
    layer: tuple[Path, Path, bytes], content: bytes | None, message: str
) -> None:
    layer_dir, tar_split, _ = layer
    if content is None:
        tar_split.unlink()
    else:
        tar_split.write_bytes(content)
    with pytest.raises(TarSplitMismatch, match=f"^{layer_dir}: .*{message}"):
        write_layer_from_tarsplit(layer_dir, tar_split, io.BytesIO())


def test_missing_layer_directory_is_a_layer_error_not_a_mismatch(layer: tuple[Path, Path, bytes]) -> None:
    layer_dir, tar_split, _ = layer
    shutil.rmtree(layer_dir)
    with pytest.raises(LayerError, match="cannot open layer directory") as caught:
        write_layer_from_tarsplit(layer_dir, tar_split, io.BytesIO())
    assert not isinstance(caught.value, TarSplitMismatch)


# --- memory -----------------------------------------------------------------------------------------------------

_BIG = 200 << 20
_MEASURE = """
import os, resource, sys
from pathlib import Path
from pipeline.layer.tarsplit import write_layer_from_tarsplit

def peak_kib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

layer_dir, tar_split = map(Path, sys.argv[1:])
with open(os.devnull, "wb") as out:
    before = peak_kib()
    record = write_layer_from_tarsplit(layer_dir, tar_split, out)
print(record.diff_id, peak_kib() - before)
"""


def _write_big_layer(layer_dir: Path, tar_split: Path) -> str:
    """A layer with one 200 MB file and its tar-split records; returns the diff_id of its original tar."""
    layer_dir.mkdir()
    info = tarfile.TarInfo("big.bin")
    info.size = _BIG
    header = info.tobuf(tarfile.PAX_FORMAT)
    block = hashlib.sha256(b"seed").digest() * (1 << 15)  # 1 MiB
    digest = hashlib.sha256(header)
    crc = 0
    with open(layer_dir / "big.bin", "wb") as f:
        for _ in range(_BIG // len(block)):
            f.write(block)
            digest.update(block)
            crc = crc64.go_iso(block, initial=crc)
    end = bytes(-_BIG % 512) + bytes(1024)
    digest.update(end)
    payload = base64.b64encode(crc.to_bytes(8, "big")).decode()
    write_tar_split(tar_split, [segment(header), file_entry(b"big.bin", _BIG, payload), segment(end)])
    return "sha256:" + digest.hexdigest()


def test_reassembling_a_200_mb_file_keeps_memory_flat(tmp_path: Path) -> None:
    layer_dir, tar_split = tmp_path / "big", tmp_path / "big.tar-split.gz"
    expected = _write_big_layer(layer_dir, tar_split)
    # A fresh process: ru_maxrss is a high-water mark, which earlier tests in this one would already have raised.
    done = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(layer_dir), str(tar_split)],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    diff_id, grown_kib = done.stdout.split()
    assert diff_id == expected
    assert int(grown_kib) < 8 * 1024, f"peak RSS grew by {int(grown_kib) // 1024} MiB for a 200 MB file"


def test_segment_and_file_records_may_omit_optional_fields(tmp_path: Path) -> None:
    # Go's omitempty drops "size" from size-0 files; a File with no name and no size reads nothing.
    layer_dir = tmp_path / "diff"
    layer_dir.mkdir()
    (layer_dir / "a").write_bytes(b"abc")
    records = [segment(b"H" * 512), {"type": 1, "payload": None}, file_entry(b"a", 3, crc_payload(b"abc"))]
    tar_split = write_tar_split(tmp_path / "ts.gz", [*records, {"type": 2, "payload": None}])
    out = io.BytesIO()
    write_layer_from_tarsplit(layer_dir, tar_split, out)
    assert out.getvalue() == b"H" * 512 + b"abc"

"""Writes tar-split records (https://github.com/vbatts/tar-split, tar/asm/disassemble.go) for tars the tests make,
as containers-storage and docker keep them next to a layer's unpacked directory."""

from __future__ import annotations

import base64
import gzip
import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any

from fastcrc import crc64

FILE, SEGMENT = 1, 2  # tar/storage/entry.go


def crc_payload(data: bytes) -> str:
    """A File entry's payload: Go's crc64.ISO checksum as 8 big-endian bytes, base64-encoded."""
    return base64.b64encode(crc64.go_iso(data).to_bytes(8, "big")).decode()


def segment(raw: bytes) -> dict[str, Any]:
    return {"type": SEGMENT, "payload": base64.b64encode(raw).decode()}


def file_entry(name: bytes, size: int, payload: str | None) -> dict[str, Any]:
    entry: dict[str, Any] = {"type": FILE, "size": size, "payload": payload}
    try:
        entry["name"] = name.decode()
    except UnicodeDecodeError:  # entry.go SetName: names that are not UTF-8 go to name_raw
        entry["name_raw"] = base64.b64encode(name).decode()
    if not size:
        del entry["size"]  # Go's omitempty
    return entry


def disassemble(tar: bytes) -> list[dict[str, Any]]:
    """The records Go's disassembler keeps for tar: raw bytes up to each member's data, then a File entry."""
    records: list[dict[str, Any]] = []
    done = 0
    with tarfile.open(fileobj=io.BytesIO(tar), mode="r:") as archive:
        for member in archive.getmembers():
            records.append(segment(tar[done : member.offset_data]))
            data = tar[member.offset_data : member.offset_data + member.size] if member.isreg() else b""
            name = os.fsencode(member.name) + (b"/" if member.isdir() else b"")
            records.append(file_entry(name, len(data), crc_payload(data) if data else None))
            done = member.offset_data + len(data)
    records.append(segment(tar[done:]))
    return records


def write_tar_split(path: Path, records: list[dict[str, Any]]) -> Path:
    """records as a gzip'd stream of JSON lines numbered by position, as storage.NewJSONPacker writes them."""
    with gzip.open(path, "wb") as out:
        for position, record in enumerate(records):
            out.write(json.dumps({**record, "position": position}, separators=(",", ":")).encode() + b"\n")
    return path


def read_tar_split(path: Path) -> list[dict[str, Any]]:
    with gzip.open(path, "rb") as records:
        return [json.loads(line) for line in records]

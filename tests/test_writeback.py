"""host/writeback.py: a file written through WritebackFile holds exactly what was written, whatever the sizes of
the writes, and writeback is requested window by window as it grows (the closing fsync is the caller's)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.host.writeback import WritebackFile


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sizes=st.lists(st.integers(min_value=0, max_value=70_000), max_size=40), window=st.integers(1, 100_000))
def test_the_file_holds_exactly_what_was_written(
    tmp_path_factory: pytest.TempPathFactory, sizes: list[int], window: int
) -> None:
    path = tmp_path_factory.mktemp("writeback") / "blob"
    want = hashlib.sha256()
    try:
        with open(path, "wb", buffering=65536) as f:
            out = WritebackFile(f, window=window)
            for i, size in enumerate(sizes):
                data = bytes([i % 251]) * size
                want.update(data)
                out.write(memoryview(data) if i % 2 else data)
            out.flush()
            os.fsync(out.fileno())
            total = sum(sizes)
            assert out.tell() == total
            # Every full window written was handed to the kernel: at most one window is left unrequested.
            assert total - out._requested < window or total == 0  # noqa: SLF001 - the state under test
        assert hashlib.sha256(path.read_bytes()).hexdigest() == want.hexdigest()
    finally:
        path.unlink(missing_ok=True)


def test_a_file_opened_at_an_offset_requests_from_there(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    path.write_bytes(b"x" * 1000)
    with open(path, "r+b") as f:
        f.seek(1000)
        out = WritebackFile(f, window=4096)
        out.write(b"y" * 10_000)
        out.flush()
        assert out.tell() == 11_000
        assert out.seekable()  # what it does not define itself comes from the file
    assert path.read_bytes() == b"x" * 1000 + b"y" * 10_000

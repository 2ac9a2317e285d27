"""Progress a person can watch (issue 14): a commit whose stderr is a terminal draws one line per layer and for
the archive, in place, with bytes done of total, rate and time left, and a closing line with size, time and rate;
with stderr not a terminal, none of it."""

from __future__ import annotations

import multiprocessing
import os
import pty
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from pipeline.host import terminal
from tests.support.cli import REPO, commit_args, run_luigi
from tests.support.overlay_storage import build_rocker_storage

CLOSING = re.compile(r"\r([^\r\n]+): (\d+\.\d) MiB (packed|written) in (\d+\.\d) s \((\d+\.\d) MiB/s\)\x1b\[K\n")


def _read_all(parent: int) -> bytes:
    """Everything written to the terminal whose other side is parent, once every writer closed it (one read may
    return only part); closes parent."""
    chunks = []
    while True:
        try:
            chunk = os.read(parent, 65536)
        except OSError:  # EIO: every writer of the terminal is gone and all was read
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(parent)
    return b"".join(chunks)


def _run_on_a_terminal(argv: list[str]) -> tuple[int, str]:
    """Run argv with stderr (only) on a new pseudo-terminal; its exit code and what it drew there."""
    parent, child = pty.openpty()
    env = {k: v for k, v in os.environ.items() if k != "SOURCE_DATE_EPOCH"}
    process = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=child)
    os.close(child)
    drawn = _read_all(parent)
    return process.wait(timeout=300), drawn.decode(errors="replace").replace("\r\n", "\n")


@pytest.mark.overlay
def test_a_commit_on_a_terminal_draws_a_line_per_layer_and_for_the_archive(tmp_path: Path) -> None:
    storage = build_rocker_storage(tmp_path / "rocker")
    archive = tmp_path / "web.tar"
    argv = [sys.executable, "-m", "luigi", "--module", "pipeline"]
    argv += [*commit_args(storage.root, tmp_path, "--id", storage.container_id, "--output", str(archive))]
    code, drawn = _run_on_a_terminal([*argv, "--local-scheduler"])
    assert code == 0, drawn[-3000:]
    closing = [(m.group(1), m.group(3), float(m.group(2))) for m in CLOSING.finditer(drawn)]  # label, verb, MiB
    # The two image layers (by the directory they come from) and the container's own (by its name), packed; the
    # archive, written (by the container's name).
    assert sorted(verb for _, verb, _ in closing) == ["packed", "packed", "packed", "written"], closing
    assert ("web-1", "packed") in {(label, verb) for label, verb, _ in closing}, closing
    [written] = [size for label, verb, size in closing if verb == "written" and label == "web-1"]
    assert abs(written - archive.stat().st_size / (1 << 20)) < 0.1, (written, archive.stat().st_size)
    # Each line was first drawn in place with its total, rate and time left.
    assert re.search(r"\rweb-1: \d+\.\d of \d+\.\d MiB packed, \d+\.\d MiB/s, \d+:\d\d left\x1b\[K", drawn), drawn


@pytest.mark.overlay
def test_a_commit_not_on_a_terminal_draws_nothing(tmp_path: Path) -> None:
    storage = build_rocker_storage(tmp_path / "rocker")
    done = run_luigi(
        *commit_args(storage.root, tmp_path, "--id", storage.container_id, "--output", str(tmp_path / "a.tar"))
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "\x1b[K" not in done.stderr and " MiB/s" not in done.stderr
    assert not CLOSING.search(done.stderr)


def test_the_line_is_redrawn_at_most_five_times_a_second(monkeypatch: pytest.MonkeyPatch) -> None:
    parent, child = pty.openpty()
    with os.fdopen(child, "w") as tty:
        monkeypatch.setattr(sys, "stderr", tty)
        started = time.monotonic()
        calls = 0
        while time.monotonic() - started < 0.5:
            terminal.update("k", "layer", calls, 1 << 30)
            calls += 1
        terminal.finish("k")
    drawn = _read_all(parent).decode()
    redraws = drawn.count(" left\x1b[K")
    assert calls > 100 and 1 <= redraws <= 4, (calls, redraws)
    assert drawn.endswith("\x1b[K\r\n") and "MiB packed in 0." in drawn


def _draw_for(key: str, seconds: float, started: Any) -> None:
    """In a forked process: draw the progress of key for seconds, then its closing line; started is set once the
    first update was made."""
    begun = time.monotonic()
    done = 0
    while time.monotonic() - begun < seconds:
        terminal.update(key, key, done, 1 << 30)
        started.set()
        done += 1 << 20
        time.sleep(0.01)
    terminal.finish(key)


def test_workers_sharing_a_terminal_take_turns_at_the_line_in_place(monkeypatch: pytest.MonkeyPatch) -> None:
    """luigi's --workers 2 runs two layer tasks at once in two processes: the second one's line in place waits for
    the first one's work to end (one line redrawn by two processes would flicker between them)."""
    parent, child = pty.openpty()
    context = multiprocessing.get_context("fork")
    with os.fdopen(child, "w") as tty:
        monkeypatch.setattr(sys, "stderr", tty)
        first_started, second_started = context.Event(), context.Event()
        first = context.Process(target=_draw_for, args=("first", 1.0, first_started))
        second = context.Process(target=_draw_for, args=("second", 1.6, second_started))
        first.start()
        assert first_started.wait(10)
        second.start()
        for process in (first, second):
            process.join(30)
            assert process.exitcode == 0
    drawn = _read_all(parent).decode().replace("\r\n", "\n")
    first_closed = drawn.index("first: ") + drawn[drawn.index("first: ") :].index(" packed in ")
    second_in_place = [m.start() for m in re.finditer(r"\rsecond: [^\r]* left\x1b\[K", drawn)]
    assert drawn.count("\rfirst: ") >= 3 and second_in_place, drawn
    assert min(second_in_place) > first_closed, drawn  # never drawn while the first one held the line
    assert re.search(r"\rsecond: \d+\.\d MiB packed in 1\.\d s", drawn), drawn

"""Temporary real cgroups (v1 freezer and v2) holding stand-in container processes, for freezer tests."""

import errno
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import IS_ROOT

# The stand-in container: appends a counter line every 10 ms, so a frozen one is seen as a file that stops growing.
COUNTER_SCRIPT = """
import sys, time
n = 0
with open(sys.argv[1], "a", buffering=1) as f:
    while True:
        n += 1
        f.write(f"{n}\\n")
        time.sleep(0.01)
"""

SAMPLE_INTERVAL = 0.2  # 20 counter lines at the child's pace: long enough to see growth, short enough to wait for


def cgroup_mount(version: int) -> Path | None:
    """Where the hierarchy's root is mounted; parsed here, not by pipeline.host.freezer, so a bug there cannot hide."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        head, _, tail = line.partition(" - ")
        fields, fs = head.split(), tail.split()
        if fields[3] != "/":
            continue  # a bind mount of some cgroup: new cgroups would not land where find_freezer looks first
        if (version == 2 and fs[0] == "cgroup2") or (
            version == 1 and fs[0] == "cgroup" and "freezer" in fs[2].split(",")
        ):
            return Path(fields[4])
    return None


def unavailable(version: int) -> str | None:
    """Why real cgroups of this version cannot be tested here, or None when a probe cgroup could be made."""
    if not IS_ROOT:
        return "needs root to create cgroups"
    mount = cgroup_mount(version)
    if mount is None:
        return f"no cgroup v{version} {'freezer ' if version == 1 else ''}hierarchy is mounted"
    control = "freezer.state" if version == 1 else "cgroup.freeze"
    probe = mount / f"pipeline-probe-{uuid.uuid4().hex[:8]}"
    try:
        probe.mkdir()
    except OSError as e:
        return f"cannot create a cgroup under {mount} ({e.strerror})"
    try:
        if not (probe / control).is_file():
            return f"cgroups under {mount} have no {control} (kernel older than 5.2?)"
    finally:
        probe.rmdir()
    return None


UNAVAILABLE = {version: unavailable(version) for version in (1, 2)}
VERSIONS = [
    pytest.param(
        version,
        id=f"v{version}",
        marks=[
            pytest.mark.root,
            pytest.mark.skipif(UNAVAILABLE[version] is not None, reason=f"{UNAVAILABLE[version]}"),
        ],
    )
    for version in (1, 2)
]


@dataclass
class Cgroup:
    """A temporary cgroup and the processes a test started in it."""

    path: Path
    version: int
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    children: list["Cgroup"] = field(default_factory=list)

    def add(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(str(pid))

    def child(self, name: str) -> "Cgroup":
        """A cgroup made inside this one (removed with it), e.g. named after a container as its engine names it:
        `cgroup.child(container_id)` stands for docker's /docker/<id>, `cgroup.child(f"libpod-{id}.scope")` for
        podman's machine.slice/libpod-<id>.scope."""
        group = Cgroup(self.path / name, self.version)
        group.path.mkdir()
        self.children.append(group)
        return group

    def start_sleeper(self) -> subprocess.Popen[bytes]:
        """A process that only sleeps, moved into this cgroup."""
        process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        self.processes.append(process)
        self.add(process.pid)
        return process

    def freeze_directly(self) -> None:
        """Freeze the cgroup as an engine's pause does, not through pipeline.host.freezer; wait until it is frozen."""
        control, value = ("freezer.state", "FROZEN") if self.version == 1 else ("cgroup.freeze", "1")
        with open(self.path / control, "w") as f:
            f.write(value)
        deadline = time.monotonic() + 10
        while self.freezer_state() != "FROZEN":
            assert time.monotonic() < deadline, f"{self.path} never froze"
            time.sleep(0.01)

    def freezer_state(self) -> str:
        """FROZEN, FREEZING or THAWED, read from the kernel's files here, not through pipeline.host.freezer."""
        if self.version == 1:
            return (self.path / "freezer.state").read_text().strip()
        if "frozen 1" in (self.path / "cgroup.events").read_text().splitlines():
            return "FROZEN"
        return "FREEZING" if (self.path / "cgroup.freeze").read_text().strip() == "1" else "THAWED"

    def start_counter(self, counter: Path) -> subprocess.Popen[bytes]:
        process = subprocess.Popen([sys.executable, "-c", COUNTER_SCRIPT, str(counter)])
        self.processes.append(process)
        self.add(process.pid)
        wait_until_growing(counter)
        return process

    def pids(self) -> list[int]:
        try:
            return [int(pid) for pid in (self.path / "cgroup.procs").read_text().split()]
        except FileNotFoundError:
            return []

    def thaw_directly(self) -> None:
        # Written here rather than through Freezer.thaw, so cleanup works even when the module under test is broken.
        control, value = ("freezer.state", "THAWED") if self.version == 1 else ("cgroup.freeze", "0")
        with open(self.path / control, "w") as f:
            f.write(value)

    def remove(self) -> None:
        # Thaw first (and before the children, whose tasks a frozen ancestor keeps frozen): a task frozen by the v1
        # freezer does not act on SIGKILL until it is thawed.
        self.thaw_directly()
        for child in reversed(self.children):
            child.remove()
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for process in self.processes:
            process.kill()
            process.wait(timeout=10)
        deadline = time.monotonic() + 10
        while True:
            try:
                self.path.rmdir()
                return
            except OSError as e:
                # EBUSY while the killed tasks are still on their way out of the cgroup.
                if e.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)


class FreezerWatch:
    """Samples a cgroup's freezer state every few milliseconds from a thread, for as long as the block runs."""

    def __init__(self, cgroup: Cgroup) -> None:
        self.cgroup = cgroup
        self.states: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "FreezerWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.states.add(self.cgroup.freezer_state())
            except FileNotFoundError:
                return
            time.sleep(0.002)


def size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def grows(counter: Path) -> bool:
    before = size(counter)
    time.sleep(SAMPLE_INTERVAL)
    return size(counter) != before


def wait_until_growing(counter: Path) -> None:
    deadline = time.monotonic() + 10
    while not grows(counter):
        assert time.monotonic() < deadline, f"{counter} never started growing"

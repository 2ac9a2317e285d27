"""A real central luigi scheduler (`luigid`) on 127.0.0.1 for tests: a context manager and a pytest fixture.

luigid's JSON API is `GET /api/<method>?data=<json arguments>` answering `{"response": ...}` (luigi/server.py,
RPCHandler; the methods are luigi/scheduler.py's @rpc_method functions such as task_list).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

HOST = "127.0.0.1"
LUIGID = Path(sys.executable).with_name("luigid")  # the console script installed next to the venv's python
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0

# Only ever 127.0.0.1: an empty ProxyHandler ignores http_proxy and friends from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass(frozen=True)
class Luigid:
    """A running luigid: where it listens and where its state and log live."""

    port: int
    workdir: Path  # holds state.pickle, logs/luigi-server.log and the process's own output

    def flags(self) -> list[str]:
        """The luigi flags that schedule through this luigid instead of a local scheduler."""
        return ["--scheduler-host", HOST, "--scheduler-port", str(self.port)]

    def call(self, method: str, timeout: float = 5.0, **arguments: Any) -> Any:
        """Call one scheduler RPC method through the JSON API and return its response."""
        query = urllib.parse.urlencode({"data": json.dumps(arguments)})
        with _OPENER.open(f"http://{HOST}:{self.port}/api/{method}?{query}", timeout=timeout) as answer:
            return json.load(answer)["response"]

    def log(self) -> str:
        """What luigid logged and printed so far, for failure messages."""
        parts = [self.workdir / "logs" / "luigi-server.log", self.workdir / "luigid.out"]
        return "\n".join(p.read_text(errors="replace") for p in parts if p.exists())


def free_port() -> int:
    """A port nothing listens on right now (the kernel's pick for port 0); luigid binds it moments later."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
        return port


def scrubbed_env() -> dict[str, str]:
    """This process's environment without proxies, so luigi's clients talk to 127.0.0.1 directly."""
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    return env | {"no_proxy": HOST, "NO_PROXY": HOST}


@contextlib.contextmanager
def run_luigid(workdir: Path, *, attempts: int = 3) -> Iterator[Luigid]:
    """Start luigid on a free 127.0.0.1 port, wait until its API answers, and always stop it afterwards.

    It runs in `workdir` so no luigi.cfg of the repository applies to it. Another process may take the port
    between the probe and luigid's bind, so a luigid that exits while starting is retried on a new port.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "logs").mkdir(exist_ok=True)  # --logdir in the foreground only names the log file; it must exist
    failures = []
    for _ in range(attempts):
        server = Luigid(port=free_port(), workdir=workdir)
        process = _start(server)
        try:
            if _wait_until_answering(server, process):
                yield server
                return
            failures.append(f"port {server.port}: exited {process.returncode}:\n{server.log()}")
        finally:
            _stop(process)
    raise RuntimeError(f"luigid did not start ({attempts} attempts):\n" + "\n".join(failures))


@pytest.fixture(name="luigid")
def luigid_fixture(tmp_path: Path) -> Iterator[Luigid]:
    """The `luigid` fixture: a real luigid for one test, stopped when the test ends. Import it into a test module."""
    with run_luigid(tmp_path / "luigid") as server:
        yield server


def _start(server: Luigid) -> subprocess.Popen[bytes]:
    # No --pidfile: luigid writes one only with --background, which would also detach it from this process.
    command = [
        str(LUIGID),
        "--address", HOST,
        "--port", str(server.port),
        "--state-path", str(server.workdir / "state.pickle"),
        "--logdir", str(server.workdir / "logs"),
    ]  # fmt: skip
    with open(server.workdir / "luigid.out", "ab") as out:
        return subprocess.Popen(
            command,
            cwd=server.workdir,
            env=scrubbed_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _wait_until_answering(server: Luigid, process: subprocess.Popen[bytes]) -> bool:
    """True once the API answers; False if luigid exited first. Raises when it neither answers nor exits in time."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        with contextlib.suppress(OSError, ValueError):  # refused while binding; URLError is an OSError
            server.call("task_list", timeout=1.0, status="RUNNING")
            return True
        time.sleep(0.05)
    raise RuntimeError(f"luigid on port {server.port} did not answer within {START_TIMEOUT} s:\n{server.log()}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM (luigid saves its state and exits), then SIGKILL if it is still there after STOP_TIMEOUT."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=STOP_TIMEOUT)

"""A private, offline Docker Engine (Debian's docker.io 20.10) for tests, and a busybox image made without a pull.

The daemon never touches the host's networking (`--iptables=false --ip-forward=false --ip-masq=false
--bridge=none`; containers run with `--network none`) and keeps its state in private directories: a data-root
under the test's tmp dir, and an exec-root, pidfile and socket in a short directory (containerd's and libnetwork's
unix sockets live in the exec-root and must stay under the kernel's 108-byte sun_path limit).
It gets a containerd of its own, started here with a private config (`--containerd`): dockerd 20.10 would otherwise
use a system containerd whenever /run/containerd/containerd.sock exists, and the containerd it starts itself
creates /opt/containerd. (containerd 1.6 still puts its shims' sockets in /run/containerd/s/.)
The client always is /usr/bin/docker (another client may come first on PATH), with its own DOCKER_CONFIG.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

DOCKERD = Path("/usr/sbin/dockerd")
DOCKER = Path("/usr/bin/docker")
CONTAINERD = Path("/usr/bin/containerd")
BUSYBOX = Path("/bin/busybox")  # Debian's busybox-static: one static binary, so a rootfs needs nothing else
START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
# The applets the tests' containers use, each a symlink to busybox in /bin.
APPLETS = (
    "sh", "ls", "cat", "rm", "mkdir", "ln", "echo", "sleep", "mv", "touch", "chmod", "chown", "cp", "mknod",
    "mkfifo", "stat", "test", "true", "env", "rmdir",
)  # fmt: skip


def docker_missing_reason() -> str | None:
    """Why a private dockerd cannot run here (not root, or a program missing), or None if it can."""
    if os.geteuid() != 0:
        return "needs root: dockerd runs only as root here"
    missing = [str(p) for p in (DOCKERD, DOCKER, CONTAINERD, BUSYBOX) if not os.access(p, os.X_OK)]
    missing += [name for name in ("containerd-shim-runc-v2", "runc") if shutil.which(name) is None]
    if missing:
        return f"needs {', '.join(missing)} (./dev setup installs docker.io and busybox-static as root)"
    return None


@dataclass
class Dockerd:
    """A running private dockerd (and its containerd): its data-root, its socket, and how to talk to it."""

    root: Path  # --data-root: containers/, image/overlay2/, overlay2/ — what --storage-root points at
    socket: Path
    exec_root: Path
    state_dir: Path  # holds exec_root, the socket and the pidfile; a short path of its own
    log: Path  # dockerd's and containerd's output
    process: subprocess.Popen[bytes] | None  # dockerd (None until containerd answers)
    containerd: subprocess.Popen[bytes]
    client_env: dict[str, str] = field(repr=False)

    def run(self, *args: str, input: bytes | None = None, timeout: float = 120) -> str:
        """`/usr/bin/docker -H unix://SOCKET ARGS`; its stdout, or an AssertionError quoting command and stderr."""
        argv = [str(DOCKER), "-H", f"unix://{self.socket}", *args]
        try:
            done = subprocess.run(argv, input=input, capture_output=True, env=self.client_env, timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise AssertionError(f"cannot run {' '.join(argv)}: {exc}") from exc
        if done.returncode != 0:
            stderr = done.stderr.decode(errors="replace").strip()
            raise AssertionError(f"{' '.join(argv)} failed (exit {done.returncode}):\n{stderr}")
        return done.stdout.decode(errors="replace")

    def attempt(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """The same command without the check, for commands expected to fail."""
        argv = [str(DOCKER), "-H", f"unix://{self.socket}", *args]
        return subprocess.run(argv, capture_output=True, text=True, env=self.client_env, timeout=timeout)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        """Stop dockerd, then its containerd (each SIGTERM, wait, SIGKILL), then whatever they left: shims and
        container processes, and every mount under their directories (deepest first, lazily if busy)."""
        if self.process is not None and self.process.poll() is None:
            # dockerd gives each running container 10 s after SIGTERM (which a namespace's pid 1 such as `sleep`
            # ignores) before it kills it: kill the test's leftover containers first, best effort.
            with contextlib.suppress(AssertionError, OSError, subprocess.TimeoutExpired):
                running = self.attempt("ps", "-q", timeout=10).stdout.split()
                if running:
                    self.attempt("kill", *running, timeout=20)
        for process in (self.process, self.containerd):
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(STOP_TIMEOUT)
        _end_processes(*self._leftover_pids())
        for mount_point in _mounts_under((self.root, self.state_dir)):
            done = subprocess.run(["umount", mount_point], capture_output=True, check=False)
            if done.returncode != 0:
                subprocess.run(["umount", "-l", mount_point], capture_output=True, check=False)
        if not _mounts_under((self.state_dir,)):  # never remove files through a mount that survived
            shutil.rmtree(self.state_dir, ignore_errors=True)

    def _leftover_pids(self) -> tuple[list[int], list[int]]:
        """Processes this daemon started that outlived it: containerd and its shims (their command lines name our
        exec-root), and container processes (in the cgroup /docker/<id> of a container of our data-root)."""
        containers = self.root / "containers"
        ours = {p.name for p in containers.iterdir()} if containers.is_dir() else set()
        needle = os.fsencode(self.exec_root) + b"/"
        daemons: list[int] = []
        in_containers: list[int] = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes()
                cgroups = (entry / "cgroup").read_text()
            except OSError:
                continue
            if any(line.rpartition("/docker/")[2] in ours for line in cgroups.splitlines() if "/docker/" in line):
                in_containers.append(int(entry.name))
            elif needle in cmdline:
                daemons.append(int(entry.name))
        return daemons, in_containers


def _end_processes(daemons: list[int], in_containers: list[int]) -> None:
    """SIGKILL for container processes (a namespace's pid 1 ignores SIGTERM from outside); SIGTERM for daemons,
    SIGKILL for those still alive after 10 s. None of them is our child, so none can be waited for."""
    for pid, sig in [*((p, signal.SIGKILL) for p in in_containers), *((p, signal.SIGTERM) for p in daemons)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(pid) for pid in daemons):
        time.sleep(0.1)
    for pid in daemons:
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    """Whether pid runs (a zombie, dead but not yet reaped by its parent, does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _mounts_under(dirs: tuple[Path, ...]) -> list[str]:
    """Mount points at or below any of `dirs`, deepest first (from /proc/self/mountinfo, octal escapes decoded)."""
    prefixes = [str(d) for d in dirs]
    found: list[str] = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].encode().decode("unicode_escape")
            if any(point == p or point.startswith(p + "/") for p in prefixes):
                found.append(point)
    return sorted(set(found), key=len, reverse=True)


def _short_state_dir(base: Path) -> Path:
    """base/run when its socket paths stay short, else a fresh /tmp/pdk-XXXX."""
    if len(str(base)) <= 40:
        state = base / "run"
        state.mkdir()
        return state
    return Path(tempfile.mkdtemp(prefix="pdk-", dir="/tmp"))


def _containerd_config(root: Path, exec_root: Path) -> str:
    """containerd's config: what dockerd 20.10 writes for the containerd it manages (libcontainerd/supervisor),
    except that its root is `root` (outside dockerd's data-root), plus its opt plugin's directory, which would
    otherwise be /opt/containerd."""
    return f"""version = 2
root = "{root}"
state = "{exec_root}/containerd/daemon"
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
  address = "{exec_root}/containerd/containerd.sock"

[debug]
  address = "{exec_root}/containerd/containerd-debug.sock"

[plugins]
  [plugins."io.containerd.internal.v1.opt"]
    path = "{root}/opt"
"""


def start_dockerd(base: Path) -> Dockerd:
    """Start a private containerd and dockerd under `base`; wait (at most 60 s) until `docker info` answers."""
    root = base / "data"
    root.mkdir(parents=True)
    state = _short_state_dir(base)
    exec_root, socket, pidfile = state / "exec", state / "sock", state / "pid"
    containerd_socket = exec_root / "containerd/containerd.sock"
    assert len(str(exec_root / "containerd/containerd-debug.sock")) < 100, exec_root
    (exec_root / "containerd").mkdir(parents=True)
    # containerd's root lives beside the data-root, not in it (where dockerd puts the containerd it starts): it
    # rewrites its meta.db on its own schedule (after a container stops, for one), and the data-root is what the
    # pipeline reads and the tests check is never written while a commit runs.
    (base / "containerd.toml").write_text(_containerd_config(base / "containerd", exec_root))
    config = base / "daemon.json"  # an empty config, so the host's /etc/docker/daemon.json never applies
    config.write_text("{}\n")
    (base / "client").mkdir()
    client_env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
    client_env |= {"DOCKER_CONFIG": str(base / "client"), "DOCKER_BUILDKIT": "0"}  # the legacy builder: offline
    argv = [
        str(DOCKERD),
        "--iptables=false", "--ip-forward=false", "--ip-masq=false", "--bridge=none",
        "--storage-driver=overlay2",
        "--data-root", str(root),
        "--exec-root", str(exec_root),
        "--pidfile", str(pidfile),
        "-H", f"unix://{socket}",
        "--containerd", str(containerd_socket),
        "--config-file", str(config),
        "--shutdown-timeout", "2",
    ]  # fmt: skip
    log = base / "dockerd.log"
    with open(log, "wb") as out:
        containerd = subprocess.Popen(
            [str(CONTAINERD), "--config", str(base / "containerd.toml"), "--log-level", "warn"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=base,
        )  # fmt: skip
    daemon = Dockerd(root, socket, exec_root, state, log, None, containerd, client_env)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not containerd_socket.exists():
            _check_starting(daemon, containerd, "containerd", deadline)
        with open(log, "ab") as out:
            dockerd = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=base)
        daemon.process = dockerd
        while not (socket.exists() and daemon.attempt("info").returncode == 0):
            _check_starting(daemon, dockerd, "dockerd", deadline)
            _check_starting(daemon, containerd, "containerd", deadline)
        return daemon
    except BaseException:
        daemon.stop()
        raise


def _check_starting(daemon: Dockerd, process: subprocess.Popen[bytes], name: str, deadline: float) -> None:
    """Fail when `process` exited or the deadline passed while starting, with the log's end; else wait a little."""
    if process.poll() is not None:
        raise AssertionError(f"{name} exited ({process.returncode}) while starting:\n{daemon.log_tail()}")
    if time.monotonic() > deadline:
        raise AssertionError(f"{name} did not start within {START_TIMEOUT:.0f} s:\n{daemon.log_tail()}")
    time.sleep(0.1)


def _add(tar: tarfile.TarFile, name: str, kind: bytes, *, mode: int, data: bytes = b"", target: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.mtime, info.linkname = kind, mode, 1_700_000_000, target
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def busybox_rootfs_tar() -> bytes:
    """A minimal root filesystem as a tar: /bin/busybox, its applets as symlinks, /etc/passwd and /etc/group,
    /tmp (1777) and /root; owned by root. No dev/, proc/ or sys/: docker's init layer adds them to containers."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, mode in (("bin", 0o755), ("etc", 0o755), ("root", 0o700), ("tmp", 0o1777)):
            _add(tar, name, tarfile.DIRTYPE, mode=mode)
        _add(tar, "bin/busybox", tarfile.REGTYPE, mode=0o755, data=BUSYBOX.read_bytes())
        for applet in APPLETS:
            _add(tar, f"bin/{applet}", tarfile.SYMTYPE, mode=0o777, target="busybox")
        _add(tar, "etc/passwd", tarfile.REGTYPE, mode=0o644, data=b"root:x:0:0:root:/root:/bin/sh\n")
        _add(tar, "etc/group", tarfile.REGTYPE, mode=0o644, data=b"root:x:0:\n")
    return out.getvalue()


def import_busybox(d: Dockerd, ref: str) -> None:
    """`docker import` the busybox root filesystem as `ref` (one layer, no pull)."""
    d.run("import", "--change", 'CMD ["sh"]', "-", ref, input=busybox_rootfs_tar())

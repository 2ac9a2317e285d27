"""Runs the real command line (`luigi --module pipeline ...`) in a subprocess, as users do."""

import hashlib
import os
import resource
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def run_luigi(
    *args: str, env: dict[str, str] | None = None, timeout: float = 300, nofile: int | None = None
) -> subprocess.CompletedProcess[str]:
    """`luigi --module pipeline ARGS --local-scheduler` from the repository root (where luigi.cfg is); nofile, if
    given, is the command's limit of open files (RLIMIT_NOFILE, soft and hard)."""
    full_env = {k: v for k, v in os.environ.items() if k != "SOURCE_DATE_EPOCH"} | (env or {})
    command = [sys.executable, "-m", "luigi", "--module", "pipeline", *args, "--local-scheduler"]
    # Every scenario doubles as a check that the source storage is only ever read.
    root = Path(args[args.index("--storage-root") + 1]) if "--storage-root" in args else None
    before = tree_fingerprint(root) if root and root.exists() else None
    limit = None if nofile is None else (lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile)))
    result = subprocess.run(
        command, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout, preexec_fn=limit
    )
    if root and before is not None:
        assert tree_fingerprint(root) == before, f"the run wrote into the source storage {root}"
    return result


def commit_args(storage_root: Path, work: Path, *extra: str) -> list[str]:
    """CommitImage's flags pointing at a storage and at output/cache dirs under work."""
    return [
        "CommitImage",
        "--storage-root",
        str(storage_root),
        "--commit-output-dir",
        str(work / "out"),
        "--commit-cache-dir",
        str(work / "cache"),
        *extra,
    ]


def error_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("ERROR: ")]


def tree_fingerprint(root: Path) -> str:
    """A digest of everything under root: names, types, content, mode, owner, mtime, xattrs.

    At any depth: a loop rather than recursion, and relative to one directory fd at a time (a child opened by name,
    the parent again as ".."), so neither Python's recursion limit, PATH_MAX nor the open files limit matters."""
    h = hashlib.sha256()
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
    fd = os.open(root, flags)
    _hash_entry(h, b".", os.fstat(fd), fd)
    rel = b""  # the current directory below root
    rel_ends: list[int] = []  # where each ancestor's path ends in rel
    pending = [_hash_dir(h, fd, rel)]  # per level, the subdirectories still to hash, last first
    try:
        while pending:
            if not pending[-1]:
                pending.pop()
                if pending:
                    fd = _reopen(fd, b"..", flags | os.O_NOFOLLOW)
                    rel = rel[: rel_ends.pop()]
                continue
            name = pending[-1].pop()
            fd = _reopen(fd, name, flags | os.O_NOFOLLOW)
            rel_ends.append(len(rel))
            rel += b"/" + name
            pending.append(_hash_dir(h, fd, rel))
    finally:
        os.close(fd)
    return h.hexdigest()


def _reopen(fd: int, name: bytes, flags: int) -> int:
    try:
        return os.open(name, flags, dir_fd=fd)
    finally:
        os.close(fd)


def _hash_dir(h: "hashlib._Hash", fd: int, rel: bytes) -> list[bytes]:
    """Hash the entries of the directory open as fd (rel below the root); return its subdirectories, last first."""
    subdirs = []
    for name in sorted(os.fsencode(n) for n in os.listdir(fd)):
        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        _hash_entry(h, rel + b"/" + name, st, b"/proc/self/fd/%d/%s" % (fd, name))
        if stat.S_ISLNK(st.st_mode):
            h.update(os.readlink(name, dir_fd=fd))
        elif stat.S_ISREG(st.st_mode):
            with open(os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd), "rb") as f:
                h.update(hashlib.file_digest(f, "sha256").digest())
        elif stat.S_ISDIR(st.st_mode):
            subdirs.append(name)
    subdirs.reverse()
    return subdirs


def _hash_entry(h: "hashlib._Hash", rel: bytes, st: os.stat_result, xattrs_of: int | bytes) -> None:
    """xattrs_of: an fd (the root), or a /proc/self/fd path whose last component is never followed."""
    h.update(b"%s %o %d %d %d %d\n" % (rel, st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, st.st_rdev))
    follow = isinstance(xattrs_of, int)  # an fd is the entry itself
    for attr in sorted(os.listxattr(xattrs_of, follow_symlinks=follow)):
        h.update(attr.encode() + os.getxattr(xattrs_of, attr, follow_symlinks=follow))


# The failpoint reached just before the container's own layer is packed (inside the pause, if any).
CONTAINER_LAYER_PACK = "pack:PackContainerLayer@1"


def is_stopped(pid: int) -> bool:
    """Whether the process is stopped (SIGSTOP), as /proc/<pid>/stat says."""
    return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "T"


def resume(pid: int) -> None:
    """SIGCONT a run a failpoint stopped: its luigi process (pid) and the task processes its workers forked, which
    share its process group (pipeline/host/failpoint.py)."""
    os.killpg(pid, signal.SIGCONT)


def kill_run(process: subprocess.Popen[Any]) -> None:
    """SIGKILL a run that may be stopped, with every task process it forked when it leads a process group (an armed
    failpoint makes it one), and reap it."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):  # not a group of its own: the process alone
        process.kill()
    process.wait(timeout=30)


def start_commit_stopped_at_container_layer(args: list[str]) -> subprocess.Popen[str]:
    """`luigi --module pipeline ARGS`, SIGSTOPped where the container's layer is about to be packed; the caller
    resumes it (resume) and waits for it."""
    env = os.environ | {"PIPELINE_FAILPOINTS": f"{CONTAINER_LAYER_PACK}:stop"}
    command = [sys.executable, "-m", "luigi", "--module", "pipeline", *args, "--local-scheduler"]
    process = subprocess.Popen(command, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not is_stopped(process.pid):
        assert process.poll() is None and time.monotonic() < deadline, "the commit never reached the container layer"
        time.sleep(0.01)
    return process

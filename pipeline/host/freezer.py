"""Pauses a running container through its cgroup freezer while its layer is packed, as `docker commit` does.

Kernel interfaces: https://docs.kernel.org/admin-guide/cgroup-v1/freezer-subsystem.html (v1 freezer.state) and
https://docs.kernel.org/admin-guide/cgroup-v2.html#core-interface-files (v2 cgroup.freeze, cgroup.events).

The pid an engine records is not trusted to name the container: it may be stale (a number reused after the container
died) or forged. Only a cgroup named after the container's full id, the way its engine names it, is ever frozen
(container_cgroup_names), and a cgroup someone else froze (a paused container) is never frozen or thawed here.
"""

import json
import logging
import os
import re
import secrets
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pipeline import jsoncheck
from pipeline.errors import FreezerError
from pipeline.host import process
from pipeline.host.atomic import write_bytes_atomic

log = logging.getLogger(__name__)
_T = TypeVar("_T")

FREEZE_TIMEOUT = 10.0  # seconds; a healthy cgroup freezes in milliseconds
_POLL_INTERVAL = 0.01  # runc polls the freezer state at the same rate
MARKER_SUFFIX = ".freeze.json"
_PROC = Path("/proc")
_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
# mountinfo escapes space, tab, newline and backslash in paths as \ooo (proc(5)).
_MOUNTINFO_ESCAPE = re.compile(rb"\\([0-7]{3})")
# Docker, podman (containers/storage) and rocker all name containers by 64 hex characters (moby pkg/stringid,
# containers/storage pkg/stringid, rocker pkg/stringid GenerateRandomID): only a full id can name a cgroup.
_FULL_ID = re.compile(r"[0-9a-f]{64}")


def container_cgroup_names(container_id: str) -> frozenset[str]:
    """The names the engines give the cgroup of the container with this full id (one path component each).

    - docker, cgroupfs driver: `<cgroup parent>/<id>`, `/docker/<id>` by default; systemd driver: the runtime is
      handed `<slice>:docker:<id>` and makes it the unit `docker-<id>.scope` (`system.slice/docker-<id>.scope` by
      default). moby daemon/oci_linux.go WithCgroups (scopePrefix "docker", parent "/docker" or "system.slice",
      `filepath.Join(parent, c.ID)` or `parent + ":" + scopePrefix + ":" + c.ID`); the unit name is runc's
      libcontainer/cgroups/systemd/common.go getUnitName (`ScopePrefix + "-" + Name + ".scope"`).
    - podman, with containers/common's cgroup_manager (docs/containers.conf.5.md: "systemd" or "cgroupfs"): systemd
      `<parent>:libpod:<id>`, i.e. `libpod-<id>.scope` (`machine.slice/libpod-<id>.scope` by default); cgroupfs
      `<parent>/libpod-<id>` (`/libpod_parent/libpod-<id>` by default); `--cgroups split` `<own>/libpod-payload-<id>`.
      containers/podman libpod/container_internal_linux.go getOCICgroupPath, defaults in libpod/runtime_ctr.go.
      conmon, which watches the container from outside it, gets a cgroup of its own that is not one of these:
      `libpod-conmon-<id>.scope` or `<parent>/conmon` (libpod/oci_conmon_linux.go moveConmonToCgroupAndSignal);
      containers.conf `cgroups = "disabled"` leaves the container in podman's own cgroup, named after nothing.
    - rocker: `/<id>` in each hierarchy it uses (RedDragonet/rocker run.go `cgroup.NewCgroupManager(containerID)`,
      cgroup/subsystem/utils.go GetCgroupPath joins it to the hierarchy's mount point); rocker only manages cpuset,
      memory and cpu (cgroup/subsystem/subsystem.go), so its containers have no freezer cgroup of their own.
    """
    return frozenset(
        {
            container_id,
            f"docker-{container_id}.scope",
            f"libpod-{container_id}.scope",
            f"libpod-{container_id}",
            f"libpod-payload-{container_id}",
        }
    )


@dataclass(frozen=True)
class Freezer:
    """The freezer of one cgroup (v1 freezer.state or v2 cgroup.freeze)."""

    path: Path  # the cgroup directory
    version: int  # 1 or 2

    def __post_init__(self) -> None:
        if self.version not in (1, 2):
            raise ValueError(f"cgroup version must be 1 or 2, not {self.version!r}")

    def freeze(self, timeout: float = FREEZE_TIMEOUT) -> None:
        """Freeze every process of the cgroup and return only once the kernel reports them all frozen."""
        deadline = time.monotonic() + timeout
        try:
            if self.version == 2:
                _write_control(self.path / "cgroup.freeze", "1")
            while True:
                if self.version == 1:
                    # v1 reads FREEZING while some task has not stopped yet; writing FROZEN again retries those
                    # tasks (runc's freezer loop does the same).
                    _write_control(self.path / "freezer.state", "FROZEN")
                if self._reads_frozen():
                    return
                if time.monotonic() >= deadline:
                    break
                time.sleep(_POLL_INTERVAL)
        except OSError as e:
            self.thaw()
            raise FreezerError(
                f"{self.path}: cannot freeze the cgroup ({e.strerror}); check that it still exists and is writable"
            ) from e
        # Never leave a container half-frozen: the tasks that did stop would stay stopped with nobody to wake them.
        self.thaw()
        raise FreezerError(
            f"{self.path}: the cgroup's processes did not all freeze within {timeout:g} s (a process stuck in"
            " uninterruptible I/O holds the freezer up); retry once the container is idle"
        )

    def thaw(self) -> None:
        """Let the cgroup's processes run again; a cgroup that no longer exists has nothing left to thaw."""
        control, value = ("freezer.state", "THAWED") if self.version == 1 else ("cgroup.freeze", "0")
        try:
            _write_control(self.path / control, value)
        except FileNotFoundError as e:
            if self.path.is_dir():
                raise FreezerError(
                    f"{self.path}: no {control} in this cgroup; it is not a cgroup v{self.version}"
                ) from e
            log.debug("%s: cgroup is gone, nothing to thaw", self.path)
        except OSError as e:
            raise FreezerError(
                f"{self.path}: cannot thaw the cgroup ({e.strerror}); its processes stay paused until"
                f" `echo {value} > {self.path / control}` is run as root"
            ) from e

    def is_frozen(self) -> bool:
        """Whether every process of the cgroup is frozen (False for a cgroup that no longer exists)."""
        try:
            return self._reads_frozen()
        except FileNotFoundError:
            return False
        except OSError as e:
            raise FreezerError(f"{self.path}: cannot read the cgroup's freezer state ({e.strerror})") from e

    def is_paused(self) -> bool:
        """Whether someone has frozen the cgroup or asked for it: v1 freezer.state FROZEN or FREEZING (which it also
        reads while an ancestor is frozen), v2 cgroup.freeze 1 or cgroup.events "frozen 1" (an ancestor frozen)."""
        try:
            if self.version == 1:
                return (self.path / "freezer.state").read_text().strip() in ("FROZEN", "FREEZING")
            return (self.path / "cgroup.freeze").read_text().strip() == "1" or self._reads_frozen()
        except FileNotFoundError:
            return False
        except OSError as e:
            raise FreezerError(f"{self.path}: cannot read the cgroup's freezer state ({e.strerror})") from e

    def _reads_frozen(self) -> bool:
        if self.version == 1:
            # FREEZING (a freeze still in progress) counts as not frozen.
            return (self.path / "freezer.state").read_text().strip() == "FROZEN"
        return "frozen 1" in (self.path / "cgroup.events").read_text().splitlines()


def find_freezer(pid: int, container_id: str, *, cgroup_root: Path = Path("/sys/fs/cgroup")) -> Freezer | None:
    """The freezer of the container's own cgroup, found through pid, or None when it must not be frozen (the
    reason is what locate_freezer returns)."""
    found = locate_freezer(pid, container_id, cgroup_root=cgroup_root)
    return found if isinstance(found, Freezer) else None


def locate_freezer(pid: int, container_id: str, *, cgroup_root: Path = Path("/sys/fs/cgroup")) -> Freezer | str:
    """The freezer of the container's own cgroup, found through pid, or why there is none to freeze.

    The cgroup frozen is the one named after the container (container_cgroup_names): the outermost component of
    pid's cgroup path that names it, which is the cgroup the engine's own pause freezes. A pid whose cgroup names no
    such component (a reused or forged pid, a process outside the container), the root cgroup, conmon's cgroup and
    a cgroup holding this process are refused. A v1 freezer cgroup is preferred over the v2 one: on hybrid hosts it
    is the one the container runtime manages. Mount points come from /proc/self/mountinfo; cgroup_root's
    conventional layout (freezer/, unified/ or cgroup2 at cgroup_root itself) is only consulted when mountinfo
    lists no mount of that version.
    """
    if pid <= 0:
        return f"pid {pid} is no process"
    try:
        memberships = _read_memberships(_PROC / str(pid) / "cgroup")
    except (FileNotFoundError, ProcessLookupError):
        return f"pid {pid} is gone"
    own = _read_memberships(_PROC / "self" / "cgroup")
    mounts = _read_cgroup_mounts(_PROC / "self" / "mountinfo")
    reasons: list[str] = []
    for version in (1, 2):
        cgroup = memberships.get(version)
        if cgroup is None:
            continue
        found = f"its v{version} cgroup {cgroup}"
        target = container_cgroup(cgroup, container_id)
        if isinstance(target, _Refusal):
            reasons.append(f"{found} {target.why}")
            continue
        if _is_within(own.get(version), target):
            # Freezing a cgroup that holds this process would stop the commit itself, and with it the thaw.
            reasons.append(f"{found} also holds this commit process")
            continue
        candidates = [m for m in mounts if m.version == version] or _conventional_mounts(version, cgroup_root)
        control = "freezer.state" if version == 1 else "cgroup.freeze"
        for mount in candidates:
            relative = _relative_to(target, mount.root)
            if relative is not None and (mount.point / relative / control).is_file():
                return Freezer(mount.point / relative, version)
        reasons.append(f"{found} has no {control} under any mounted cgroup v{version} hierarchy")
    return "; ".join(reasons) or f"pid {pid} is in no v1 freezer or v2 cgroup"


@dataclass(frozen=True)
class _Refusal:
    why: str


def container_cgroup(cgroup: str, container_id: str) -> str | _Refusal:
    """The container's own cgroup within cgroup (a path as /proc/<pid>/cgroup gives it), or why there is none.

    It is cgroup up to its outermost component named after the container (container_cgroup_names): what the engine
    created for the container, where a process of the container may have made sub-cgroups below.
    """
    if not _FULL_ID.fullmatch(container_id):
        return _Refusal(f"cannot be told to be the container's: its id {container_id!r} is not a full 64-hex id")
    if cgroup.strip("/") == "":
        # The root cgroup holds every process not placed elsewhere: freezing it would stop the whole machine.
        return _Refusal("is the root cgroup")
    parts = cgroup.strip("/").split("/")
    names = container_cgroup_names(container_id)
    named = next((i for i, part in enumerate(parts) if part in names), None)
    if named is None:
        return _Refusal("is not named after the container")
    if "conmon" in parts[named + 1 :]:
        # Old podman (cgroupfs) put conmon below the container's cgroup: such a pid is conmon's, not the container's.
        return _Refusal("is conmon's, not the container's")
    return "/" + "/".join(parts[: named + 1])


@contextmanager
def paused(pid: int, marker_dir: Path, *, label: str, container_id: str) -> Iterator[Freezer | None]:
    """Keep the container's processes frozen for the duration of the block; yield the Freezer this block froze, or
    None when it froze nothing: no cgroup of the container's could be found through pid (one WARNING says what was
    found instead), or the container was paused already (frozen by its engine or another commit), in which case it
    is packed as it is and left frozen.

    The marker is written before freezing, so a commit killed while the container is frozen leaves what
    thaw_abandoned needs to thaw it; it is removed only once the thaw succeeded.
    """
    found = locate_freezer(pid, container_id)
    if not isinstance(found, Freezer):
        log.warning(
            "container %s (pid %d): not freezing it: %s; the commit proceeds unpaused, so a file written while the"
            " layer is packed makes it be packed once more, then the commit fails naming the file",
            label,
            pid,
            found,
        )
        yield None
        return
    freezer = found
    # Thawing what someone else froze would unpause the container behind its engine's back (docker pause, podman
    # pause, another commit). Not atomic: a pause that lands between this check and the freeze is thawed after.
    if freezer.is_paused():
        log.warning(
            "container %s (pid %d): already paused (%s is frozen, by its engine or another commit); packing it as it"
            " is, without freezing or thawing it",
            label,
            pid,
            freezer.path,
        )
        yield None
        return
    marker = _write_marker(marker_dir, freezer, pid, label, container_id)
    try:
        try:
            freezer.freeze()
        except FreezerError as e:
            raise FreezerError(f"container {label}: {e}") from e
        log.debug("container %s: froze %s (cgroup v%d)", label, freezer.path, freezer.version)
        yield freezer
    finally:
        freezer.thaw()
        marker.unlink(missing_ok=True)


def thaw_abandoned(marker_dir: Path) -> list[Path]:
    """Thaw the cgroups left frozen by commits that died, remove their markers and return the cgroups thawed.

    Only a cgroup the dead commit provably froze is thawed (_not_frozen_by); any other stays frozen, with a warning.
    """
    markers: dict[Path, _Marker] = {}
    for path in sorted(marker_dir.glob(f"*{MARKER_SUFFIX}")):
        try:
            markers[path] = _read_marker(path)
        except FileNotFoundError:
            continue  # its owner finished, or a concurrent run removed it
        except ValueError as e:
            log.warning("%s: malformed freeze marker (%s); removing it", path, e)
            path.unlink(missing_ok=True)
        except OSError as e:
            raise FreezerError(f"{path}: cannot read freeze marker ({e.strerror}); fix its permissions") from e
    verdicts = {path: _judge_owner(marker) for path, marker in markers.items()}
    # A cgroup a live commit has frozen stays frozen, even if a dead commit's marker names it too.
    held = {marker.freezer.path for path, marker in markers.items() if verdicts[path] == "live"}
    thawed: list[Path] = []
    for path, marker in markers.items():
        verdict = verdicts[path]
        if verdict in ("live", "foreign"):
            continue
        cgroup = marker.freezer.path
        if verdict == "dead" and cgroup not in held and cgroup not in thawed and marker.freezer.is_paused():
            refusal = _not_frozen_by(marker)
            if refusal is not None:
                control, value = ("freezer.state", "THAWED") if marker.freezer.version == 1 else ("cgroup.freeze", "0")
                log.warning(
                    "container %s: not thawing %s, named by the marker of commit process %d, which died: %s; if"
                    " the container should run, `echo %s > %s`",
                    marker.label,
                    cgroup,
                    marker.owner_pid,
                    refusal,
                    value,
                    cgroup / control,
                )
            else:
                log.warning(
                    "container %s: thawing %s, left frozen by commit process %d, which died",
                    marker.label,
                    cgroup,
                    marker.owner_pid,
                )
                marker.freezer.thaw()
                thawed.append(cgroup)
        path.unlink(missing_ok=True)
    return thawed


@dataclass(frozen=True)
class _Mount:
    root: str  # the cgroup mounted there, as /proc/<pid>/cgroup names it
    point: Path
    version: int


@dataclass(frozen=True)
class _Marker:
    freezer: Freezer
    label: str
    owner_pid: int
    # Written by this module but optional when read, so a hand-written marker with the documented fields works.
    owner_start: int | None
    host: str | None
    boot_id: str | None
    # Which container's cgroup the commit froze, and that cgroup's inode (so a cgroup made since at the same path,
    # which the commit never froze, is never thawed); None in markers written before they were recorded.
    container_id: str | None = None
    cgroup_inode: int | None = None


def _read_memberships(path: Path) -> dict[int, str]:
    """Cgroup version -> the process's cgroup path, from /proc/<pid>/cgroup (v1: the freezer line only)."""
    memberships: dict[int, str] = {}
    for line in path.read_bytes().splitlines():
        hierarchy, _, rest = line.partition(b":")
        controllers, _, cgroup = rest.partition(b":")
        if hierarchy == b"0" and controllers == b"":
            memberships[2] = os.fsdecode(cgroup)
        elif b"freezer" in controllers.split(b","):
            memberships[1] = os.fsdecode(cgroup)
    return memberships


def _read_cgroup_mounts(mountinfo: Path) -> list[_Mount]:
    """The v1 freezer and cgroup2 mounts listed in mountinfo (proc(5)); none if it cannot be read."""
    try:
        data = mountinfo.read_bytes()
    except OSError:
        return []
    mounts: list[_Mount] = []
    for line in data.splitlines():
        head, separator, tail = line.partition(b" - ")
        fields, fs_fields = head.split(b" "), tail.split(b" ")
        if not separator or len(fields) < 5 or len(fs_fields) < 3:
            continue
        if fs_fields[0] == b"cgroup2":
            version = 2
        elif fs_fields[0] == b"cgroup" and b"freezer" in fs_fields[2].split(b","):
            version = 1
        else:
            continue
        mounts.append(_Mount(_unescape(fields[3]), Path(_unescape(fields[4])), version))
    return mounts


def _conventional_mounts(version: int, cgroup_root: Path) -> list[_Mount]:
    if version == 1:
        return [_Mount("/", cgroup_root / "freezer", 1)]
    return [_Mount("/", cgroup_root / "unified", 2), _Mount("/", cgroup_root, 2)]


def _unescape(raw: bytes) -> str:
    return os.fsdecode(_MOUNTINFO_ESCAPE.sub(lambda m: bytes([int(m[1], 8)]), raw))


def _relative_to(cgroup: str, mount_root: str) -> str | None:
    """cgroup's path below a mount of mount_root, or None when the mount does not reach it."""
    root = mount_root.rstrip("/")
    if cgroup == root or cgroup == mount_root:
        return ""
    if cgroup.startswith(root + "/"):
        return cgroup[len(root) + 1 :]
    return None


def _is_within(member: str | None, cgroup: str) -> bool:
    return member is not None and (member == cgroup or member.startswith(cgroup.rstrip("/") + "/"))


def _write_control(path: Path, value: str) -> None:
    # No O_CREAT: a path that is not a cgroup (say, from a tampered marker) must fail rather than gain a file.
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _write_marker(marker_dir: Path, freezer: Freezer, pid: int, label: str, container_id: str) -> Path:
    owner = os.getpid()
    marker = marker_dir / f"{owner}-{pid}-{secrets.token_hex(4)}{MARKER_SUFFIX}"
    try:
        inode = freezer.path.stat().st_ino
    except OSError as e:
        raise FreezerError(f"{freezer.path}: cannot examine the container's cgroup ({e.strerror})") from e
    record = {
        "cgroup": str(freezer.path),
        "cgroup_inode": inode,
        "container_id": container_id,
        "version": freezer.version,
        "pid": pid,
        "label": label,
        "owner_pid": owner,
        # A pid alone cannot tell a dead owner from a newer process that reused its number, nor this machine's
        # commits from another's when marker_dir is shared; start time, boot id and host can.
        "owner_start": process.start_time(owner),
        "boot_id": _boot_id(),
        "host": socket.gethostname(),
    }
    write_bytes_atomic(marker, json.dumps(record, sort_keys=True).encode() + b"\n")
    return marker


def _read_marker(path: Path) -> _Marker:
    """The marker's record; ValueError when it is not one this module could have written."""
    record = jsoncheck.loads(path.read_bytes())
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    cgroup = _field(record, "cgroup", str)
    version = _field(record, "version", int)
    if not cgroup.startswith("/") or version not in (1, 2):
        raise ValueError(f"cgroup {cgroup!r} version {version!r}")
    return _Marker(
        freezer=Freezer(Path(cgroup), version),
        label=_field(record, "label", str),
        owner_pid=_field(record, "owner_pid", int),
        owner_start=_optional_field(record, "owner_start", int),
        host=_optional_field(record, "host", str),
        boot_id=_optional_field(record, "boot_id", str),
        container_id=_optional_field(record, "container_id", str),
        cgroup_inode=_optional_field(record, "cgroup_inode", int),
    )


def _field(record: dict[str, Any], key: str, kind: type[_T]) -> _T:
    value = record.get(key)
    if not isinstance(value, kind) or type(value) is not kind:  # exact type: JSON true is no integer 1
        raise ValueError(f"{key}: expected {kind.__name__}, got {value!r}")
    return value


def _optional_field(record: dict[str, Any], key: str, kind: type[_T]) -> _T | None:
    return None if record.get(key) is None else _field(record, key, kind)


def _judge_owner(marker: _Marker) -> str:
    """'live', 'dead' (thaw), 'rebooted' (drop: no freeze survives a reboot) or 'foreign' (another machine's)."""
    if marker.boot_id is not None and marker.boot_id != _boot_id():
        return "rebooted" if marker.host in (None, socket.gethostname()) else "foreign"
    if not process.is_alive(marker.owner_pid):  # gone, or killed and not yet reaped: it thaws nothing
        return "dead"
    if marker.owner_start is not None and process.start_time(marker.owner_pid) != marker.owner_start:
        return "dead"  # the number now names a newer process
    return "live"


def _not_frozen_by(marker: _Marker) -> str | None:
    """Why the frozen cgroup a dead commit's marker names may not be the one that commit froze, or None.

    A commit writes a marker only for a container's cgroup it found thawed and is about to freeze, with the cgroup's
    inode: the same path with another inode is a cgroup made since (the container restarted, or another one), which
    that commit never froze. A marker without them (written by hand, or before markers recorded them, when a paused
    container could get one too) proves nothing.
    """
    if marker.container_id is None or marker.cgroup_inode is None:
        return "the marker does not record which container's cgroup was frozen (an older or hand-written marker)"
    if not _FULL_ID.fullmatch(marker.container_id) or marker.freezer.path.name not in container_cgroup_names(
        marker.container_id
    ):
        return f"the cgroup is not named after container {marker.container_id}"
    try:
        inode = marker.freezer.path.stat().st_ino
    except OSError as e:
        return f"it cannot be examined ({e.strerror})"
    if inode != marker.cgroup_inode:
        return "it is a newer cgroup at that path (the container restarted since), which that commit never froze"
    return None


def _boot_id() -> str | None:
    try:
        return _BOOT_ID.read_text().strip()
    except OSError:
        return None


def main(argv: list[str] | None = None) -> int:
    """`pipeline-thaw CACHE_DIR/freezer`: thaw containers left frozen by killed commits."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: pipeline-thaw CACHE_DIR/freezer", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    thawed = thaw_abandoned(Path(args[0]))
    print(f"thawed {len(thawed)} cgroup(s)" + "".join(f"\n  {path}" for path in thawed))
    return 0

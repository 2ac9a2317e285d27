"""Packs: image archives assembled in place, so that a layer packed for a commit is written once, into the archive
itself, where the layer cache finds it afterwards.

A pack is one file of the cache (CacheLayout.pack) that becomes one commit's image archive. While layers are
packed, layer i has a slot of its own: SLOT bytes from i * SLOT, a hole until written, its tar at data_offset(i),
after a provisional ustar header naming it (seal), written once the data is durable. Assembling closes the file
up around the layers (collapse): every gap is removed from the file's extent map (host.extents), the last one
first, so each layer's data lands where an archive copied together would hold it, without copying; the caller
then writes the headers, padding and small members around them.

The pack's state file says how far assembly went: {"collapsing": size before} while gaps are removed (the file's
size then says which are gone: each removal shortens it by a known length), {"collapsed": size} once all are (the
headers and small members are being written), {"final": size, "mtime": ns} once the pack is the finished archive,
never written again (mtime: the file's as finished; another one means someone wrote into it).
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.host import extents
from pipeline.host.atomic import write_bytes_atomic
from pipeline.layer import tarheader
from pipeline.layer.tarheader import Header

SLOT = 1 << 36  # 64 GiB per layer: holes cost nothing; a larger layer is packed into the cache's blobs instead
HEADROOM = 2 * tarheader.ALIGNMENT  # a slot's room before its data: the provisional header, or the archive's own
MAX_SLOTS = 192  # 12 TiB of offsets, within ext4's 16 TiB file size limit
MAX_LAYER = SLOT - HEADROOM
# The packs this process is assembling (holding their lock): a lookup in one of them must not wait for its lock.
ASSEMBLING: set[str] = set()


class PackDamaged(PipelineError):
    """A pack whose layout matches no step of its assembly (edited, or truncated by hand)."""


def data_offset(slot: int) -> int:
    """Where layer slot's tar starts in a pack being packed."""
    return slot * SLOT + HEADROOM


def blob_member(digest: str) -> bytes:
    """The archive member name of a blob (docker save since Engine 25 and OCI layouts alike)."""
    return b"blobs/sha256/" + digest.removeprefix("sha256:").encode()


def clear_slot(fd: int, slot: int) -> None:
    """Empty slot of whatever an earlier, interrupted attempt left there."""
    start = slot * SLOT
    size = os.fstat(fd).st_size
    if size > start:
        extents.punch_hole(fd, start, min(SLOT, size - start))


def seal(fd: int, slot: int, digest: str, size: int) -> None:
    """Mark slot as holding the blob digest of size bytes at data_offset(slot); the caller made the data durable
    first, and fsyncs after."""
    header = tarheader.build_header(Header(blob_member(digest), tarheader.REGULAR, size=size))
    os.pwrite(fd, header, data_offset(slot) - len(header))


def holds(fd: int, offset: int, digest: str) -> bool:
    """Whether the ustar header right before offset names the blob digest (a sealed slot or an assembled member)."""
    if offset < tarheader.BLOCK_SIZE:
        return False
    block = os.pread(fd, tarheader.BLOCK_SIZE, offset - tarheader.BLOCK_SIZE)
    if len(block) != tarheader.BLOCK_SIZE or block[156:157] != tarheader.REGULAR:
        return False
    unsigned = block[:148] + b" " * 8 + block[156:]
    try:
        checksum = int(block[148:156].split(b"\0")[0].strip() or b"-1", 8)
    except ValueError:
        return False
    return checksum == sum(unsigned) and block[:100].rstrip(b"\0") == blob_member(digest)


def read_state(path: Path) -> dict[str, int]:
    try:
        doc = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return {}
    if not isinstance(doc, dict):
        return {}
    return {k: v for k, v in doc.items() if k in ("collapsing", "collapsed", "final", "mtime") and isinstance(v, int)}


def write_state(path: Path, **state: int) -> None:
    write_bytes_atomic(path, json.dumps(state, sort_keys=True).encode())


def finished_unchanged(packed: Path) -> bool | None:
    """Whether the finished pack still has the size and mtime it was finished with (None: not finished). Its
    ctime says nothing here: every link made or removed (the archive published, a person deleting it) moves it;
    writing into the file, as anyone editing an archive in place does, moves the mtime."""
    state = read_state(packed.with_suffix(".json"))
    if "final" not in state:
        return None
    st = packed.stat()
    return st.st_size == state["final"] and st.st_mtime_ns == state.get("mtime")


@dataclass(frozen=True)
class Region:
    """Bytes of a pack kept by assembly: `used` bytes at `current`, to go to `target` (<= current). The first
    region is the archive's start (current = target = 0)."""

    current: int
    target: int
    used: int


def collapse(fd: int, state_path: Path, regions: list[Region]) -> None:
    """Remove the gaps between regions, the last gap first, so that each region lands on its target; resumable
    from any point (the state file holds the size before; the size now says how many gaps are gone)."""
    steps = _steps(regions)
    state = read_state(state_path)
    if "collapsed" in state:
        return
    start = state.get("collapsing")
    size = os.fstat(fd).st_size
    if start is None:
        start = size
        os.fsync(fd)
        write_state(state_path, collapsing=start)
    sizes = [start]
    for _, length in steps:
        sizes.append(sizes[-1] - length)
    if size not in sizes:
        raise PackDamaged(
            f"{state_path.with_suffix('.tar')}: {size} bytes, which no step of its assembly leaves (changed by hand?);"
            f" delete it and {state_path.name}, then re-run"
        )
    for offset, length in steps[sizes.index(size) :]:
        if not extents.collapse_range(fd, offset, length):
            raise OSError(f"the filesystem refused to collapse {length} bytes at {offset}")
    os.fsync(fd)
    write_state(state_path, collapsed=sizes[-1])


def _steps(regions: list[Region]) -> list[tuple[int, int]]:
    """(offset, length) of each gap to remove, in the order removed (last first), in the coordinates of the file
    before any is: removing a later gap moves nothing before it."""
    steps = []
    for previous, region in zip(regions, regions[1:], strict=False):
        length = (region.current - previous.current) - (region.target - previous.target)
        offset = previous.current + _round_up(previous.used)
        if length < 0 or offset + length > region.current or region.target % tarheader.ALIGNMENT:
            raise ValueError(f"region {region} cannot be moved after {previous}")
        if length:
            steps.append((offset, length))
    return steps[::-1]


def _round_up(n: int) -> int:
    return -(-n // tarheader.ALIGNMENT) * tarheader.ALIGNMENT

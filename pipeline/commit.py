"""A commit of one container: resolving what the user asked for, then the config and archive it produces."""

import errno
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from pipeline import jsoncheck
from pipeline.engines.container import Container, Layer, Storage, resolve_container
from pipeline.errors import OutputError, PipelineError, SourceChanged
from pipeline.host import freezer
from pipeline.host.atomic import atomic_path, make_dirs, no_space_error
from pipeline.image import ocilayout
from pipeline.image.archive import Member, archive_size, read_member, write_image_archive
from pipeline.image.dockerfile import apply_changes
from pipeline.image.imageconfig import EMPTY_LAYER_DIFF_ID, CommitOptions, build_image_config, digest_of, encode_json
from pipeline.image.manifest import blob_name, build_manifest, build_repositories
from pipeline.image.reference import Reference, build_reference_from_name, parse_reference
from pipeline.layer.writer import LayerRecord, scan_layer
from pipeline.store import compression
from pipeline.store.cache import LayerCache
from pipeline.store.compression import CompressedBlob

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerSource:
    """One layer as this run found it: its layer_dir and a key that changes whenever its content may have.

    The key is the diff_id the engine recorded for an image layer; where the engine records none (rocker), the
    layer's real path with a metadata fingerprint of its directory; for the container's own layer, its id with
    the fingerprint of its upper dir. Cache records are named by the key, so a layer directory rebuilt in place
    or a container changed since is never taken for what was packed before. overlay_xattrs: where the layer's
    overlay markers live (container.Layer).
    """

    layer_dir: str
    key: str
    tar_split: str = ""
    diff_id: str = ""
    overlay_xattrs: str = "trusted"

    def as_param(self) -> tuple[str, ...]:
        # overlay_xattrs only when it is not the default, so the tasks of rootful storage keep the ids they had.
        extra = () if self.overlay_xattrs == "trusted" else (self.overlay_xattrs,)
        return (self.layer_dir, self.key, self.tar_split, self.diff_id, *extra)

    @classmethod
    def from_param(cls, value: Sequence[str]) -> "LayerSource":
        layer_dir, key, tar_split, diff_id, *extra = value
        return cls(layer_dir, key, tar_split, diff_id, *extra)


@dataclass(frozen=True)
class ContainerState:
    """What a commit of a container is made from, taken once per run: its layers' keys and the digest of its
    metadata (its settings, its base image's config, the --config file), so every target derived from them can
    be named by them."""

    lower: tuple[LayerSource, ...]
    upper: LayerSource
    metadata: str


def read_state(storage: Storage, container: Container, config_file: str = "") -> ContainerState:
    """The container's state at this moment (metadata walks only; no file content is read)."""
    lower = tuple(
        LayerSource(
            str(layer.layer_dir),
            layer.diff_id or f"dir:{os.path.realpath(layer.layer_dir)}:{scan_layer(layer.layer_dir).fingerprint}",
            str(layer.tar_split or ""),
            layer.diff_id,
            layer.overlay_xattrs,
        )
        for layer in container.lower_layers
    )
    upper_dir = container.layer.layer_dir
    upper = LayerSource(
        str(upper_dir),
        f"upper:{container.container_id}:{scan_layer(upper_dir).fingerprint}",
        overlay_xattrs=container.layer.overlay_xattrs,
    )
    settings = {k: v for k, v in asdict(container).items() if k not in ("running", "pid", "lower_layers", "layer")}
    doc = {
        "container": settings,
        "base": storage.read_base_config(container),
        "config_file": read_config_file(config_file),
    }
    # ASCII escapes: metadata from the storage may hold lone surrogates, which have no UTF-8 encoding.
    return ContainerState(lower, upper, digest_of(json.dumps(doc, sort_keys=True, default=str).encode()))


@dataclass(frozen=True)
class CommitPlan:
    """What a commit request resolves to: one container in its present state, one image reference, one archive
    path."""

    container_id: str
    reference: Reference
    output: Path
    state: ContainerState


def plan_commit(
    storage: Storage,
    id_text: str,
    image: str,
    output: str,
    output_dir: Path,
    fmt: str | None = "both",
    config_file: str = "",
) -> CommitPlan:
    """Resolve the user's id, image reference and output path (none when fmt is None: a push writes no archive),
    refusing anything invalid up front, and take the container's state."""
    container_id = resolve_container(storage, id_text)
    container = storage.read_container(container_id)
    reference = parse_reference(image) if image else build_reference_from_name(container.name, container_id)
    path = Path()
    if fmt is not None:
        path = Path(os.path.abspath(Path(output) if output else default_output(output_dir, reference, fmt)))
        check_writable(path, fmt)
    return CommitPlan(container_id, reference, path, read_state(storage, container, config_file))


def default_output(output_dir: Path, reference: Reference, fmt: str = "both") -> Path:
    """<output_dir>/<name with / as _>_<tag>.tar (no .tar for an OCI layout directory): one per reference."""
    suffix = "" if fmt == "oci-dir" else ".tar"
    return output_dir / f"{reference.name.replace('/', '_').replace(':', '_')}_{reference.tag}{suffix}"


def check_writable(path: Path, fmt: str = "both") -> None:
    """Refuse an output whose directory cannot be created or written, before any layer is packed."""
    if path.is_dir() and fmt != "oci-dir":
        raise OutputError(f"{path}: is a directory; give --output a file path such as {path / 'image.tar'}")
    ancestor = path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputError(f"{path}: cannot write under {ancestor}; choose another --output or output_dir")


OUTPUT_DIR_FLAG = "--commit-output-dir ([commit] output_dir)"
CACHE_DIR_FLAG = "--commit-cache-dir ([commit] cache_dir)"


def check_outside_storage(storage_root: str | Path, paths: dict[str, str | Path]) -> None:
    """Refuse, before anything is scanned or packed, any of paths (flag: path this run would write) that lies inside
    the storage root, which the pipeline only ever reads: it would change the storage, even a container's own diff/,
    whose next commit would then pack the archive into the image.

    Symlinks are resolved (realpath: the real path of the nearest existing ancestor, then the rest), so a symlink
    into the storage is caught too, and so is an ancestor that is the storage root's own inode (a bind mount of it).
    """
    root = os.path.realpath(storage_root)
    try:
        root_st = os.stat(root)
    except OSError:
        root_st = None  # no storage there: reading it fails later, naming it
    for flag, path in paths.items():
        given = os.path.abspath(path)
        real = os.path.realpath(given)
        inside = real == root or real.startswith(root.rstrip("/") + "/")
        for ancestor in (real, *(str(p) for p in Path(real).parents)):
            if inside or root_st is None:
                break
            try:
                inside = os.path.samestat(os.stat(ancestor), root_st)
            except OSError:
                continue
        if inside:
            through = "" if real == given else f" (through symlinks: {real})"
            raise OutputError(
                f"{flag} {given}: inside the storage root {storage_root}{through}, which the pipeline only reads;"
                f" give {flag.split()[0]} a path outside the storage root"
            )


def source_date_epoch() -> int | None:
    """SOURCE_DATE_EPOCH (https://reproducible-builds.org/specs/source-date-epoch/) or None."""
    text = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    if not text:
        return None
    if not text.isdigit():
        raise PipelineError(f"SOURCE_DATE_EPOCH={text!r} is not a whole number of seconds; fix or unset it")
    return int(text)


def build_config_bytes(
    storage: Storage,
    container_id: str,
    records: list[LayerRecord],
    epoch: int | None,
    options: CommitOptions | None = None,
) -> bytes:
    """The image config for container with these layers, as canonical JSON."""
    container = storage.read_container(container_id)
    config = build_image_config(
        container,
        storage.read_base_config(container),
        [r.diff_id for r in records],
        created=int(time.time()) if epoch is None else epoch,
        options=options,
    )
    return encode_json(config)


def image_layers(records: Sequence[LayerRecord], *, squash: bool) -> list[LayerRecord]:
    """The layers an image of these records holds: all but a container layer with no changes (an empty tar),
    which docker commit leaves out, marking its history entry empty_layer instead (moby daemon/images/
    image_commit.go: the diff_id is appended only when it is not layer.DigestSHA256EmptyTar)."""
    if not squash and len(records) > 1 and records[-1].diff_id == EMPTY_LAYER_DIFF_ID:
        return list(records[:-1])
    return list(records)


def read_diff_ids(config_path: Path) -> list[str] | None:
    """The rootfs.diff_ids of the image config at config_path, or None when it is missing or unreadable."""
    try:
        diff_ids = jsoncheck.loads(config_path.read_bytes())["rootfs"]["diff_ids"]
    except (OSError, ValueError, LookupError, TypeError):
        return None
    return diff_ids if isinstance(diff_ids, list) else None


def check_options(changes: tuple[str, ...], config_file: str, author: str = "", message: str = "") -> None:
    """Raise the error a bad --change, --config, --author or --message would cause later, now."""
    for flag, values in (("--author", [author]), ("--message", [message]), ("--change", list(changes))):
        for value in values:
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:  # bytes that are not UTF-8 reach argv as lone surrogates
                shown = value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
                raise PipelineError(
                    f"{flag} {shown!r}: not valid UTF-8, which an image config must be; give it as UTF-8 text"
                ) from None
    apply_changes(read_config_file(config_file), list(changes))


def read_config_file(path: str) -> dict[str, Any]:
    """--config FILE: image-config "config" keys (Cmd, Env, ...), or a whole image config holding them."""
    if not path:
        return {}
    try:
        doc = jsoncheck.loads(Path(path).read_bytes())
    except (OSError, ValueError) as e:
        raise PipelineError(f"--config {path}: cannot read it as JSON ({e}); fix the file") from e
    section = "config" if isinstance(doc, dict) and isinstance(doc.get("config"), dict) else ""
    if section:
        doc = doc[section]
    if not isinstance(doc, dict):
        raise PipelineError(f"--config {path}: must be a JSON object of image config keys such as Cmd and Env")
    with jsoncheck.fields_of(f"--config {path}", "fix the file", PipelineError):
        jsoncheck.check_config_section(doc, section)
    return doc


def build_manifest_bytes(config: bytes, blobs: Sequence[CompressedBlob], reference: Reference) -> bytes:
    return encode_json(build_manifest(digest_of(config), [b.digest for b in blobs], reference))


def layer_blobs(
    cache: LayerCache, records: Sequence[LayerRecord], algorithm: str, level: int | None
) -> list[CompressedBlob]:
    """The stored blob of each layer: the cached tar itself, or its gzip/zstd form (compressed once per cache)."""
    chosen = compression.default_level(algorithm) if level is None else level
    return [compression.compress_blob(cache.root, record, algorithm, chosen) for record in records]


def find_layer_blobs(
    cache: LayerCache, records: Sequence[LayerRecord], algorithm: str, level: int | None
) -> list[CompressedBlob] | None:
    """The stored blob of each layer if every one is already in the cache, else None; never compresses (for
    luigi's complete(), which must stay cheap)."""
    chosen = compression.default_level(algorithm) if level is None else level
    blobs = [compression.find_blob(cache.root, record, algorithm, chosen) for record in records]
    return None if any(b is None for b in blobs) else [b for b in blobs if b is not None]


def check_compression(algorithm: str, level: int | None, fmt: str) -> None:
    """Refuse a compression the chosen format cannot carry, or a level the algorithm does not have."""
    compression.check_algorithm(algorithm)
    if level is not None:
        compression.check_level(algorithm, level)
    if fmt in ("both", "docker") and algorithm not in compression.DOCKER_ARCHIVE_ALGORITHMS:
        raise PipelineError(
            f"--compression {algorithm}: a docker-archive ({fmt}) holds only plain or gzip layers; use"
            " --format oci or oci-dir, or --compression gzip"
        )


def build_repositories_bytes(config: bytes, reference: Reference) -> bytes:
    return encode_json(build_repositories(reference, digest_of(config)))


FORMATS = ("both", "docker", "oci", "oci-dir")


def write_commit_output(
    dest: Path,
    fmt: str,
    cache: LayerCache,
    layers: Sequence[CompressedBlob],
    config: bytes,
    docker_files: dict[str, bytes],
    reference: Reference,
    *,
    mtime: int,
) -> None:
    """Write the image in one of FORMATS: a docker-archive, an OCI archive, both in one tar (as `docker save`
    does since Engine 25), or an OCI layout directory whose layer blobs are hardlinks into the cache.

    docker_files holds manifest.json and repositories; layers go oldest first, then the small files.
    """
    blobs = []
    for layer in layers:
        path = cache.blob_path(layer.digest)
        if not path.is_file() or path.stat().st_size != layer.size:
            raise OutputError(f"{path}: cached layer is missing or damaged; re-run to repack it")
        blobs.append(path)
    manifest = encode_json(ocilayout.build_image_manifest(config, layers))
    oci_files = ocilayout.layout_files(config, manifest, encode_json(ocilayout.build_index(manifest, reference)))
    if fmt == "oci-dir":
        with atomic_path(dest) as temp:
            temp.mkdir()
            ocilayout.write_oci_dir(temp, blobs, oci_files)
        return
    small = {blob_name(digest_of(config)): config}
    if fmt in ("both", "oci"):
        small = oci_files
    if fmt in ("both", "docker"):
        small |= docker_files
    members = [Member(blob_name(layer.digest), path=b) for layer, b in zip(layers, blobs, strict=True)]
    members += [Member(name, data=data) for name, data in small.items()]
    needed = archive_size(members)
    check_free_space(dest, needed)
    with atomic_path(dest) as temp:
        try:
            write_image_archive(temp, members, mtime=mtime)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise no_space_error(dest, e, needed) from e
            raise OutputError(f"{dest}: cannot write the image archive ({e.strerror}); fix and re-run") from e


def build_archive_identity(
    fmt: str, config: bytes, layers: Sequence[CompressedBlob], reference: Reference, docker_manifest: bytes
) -> tuple[str, bytes]:
    """The archive member that says which image an archive of fmt holds, and its bytes: index.json (it names
    the manifest digest, which covers the config and every layer blob, and the tag), or manifest.json for a
    plain docker-archive. An archive holding exactly these bytes is the image this run would write."""
    if fmt == "docker":
        return "manifest.json", docker_manifest
    manifest = encode_json(ocilayout.build_image_manifest(config, layers))
    return "index.json", encode_json(ocilayout.build_index(manifest, reference))


def read_image_id(archive: Path) -> str | None:
    """The image id (config digest) of the image archive at archive, or None when it holds no readable image."""
    try:
        docker = read_member(archive, "manifest.json")
        if docker is not None:
            config_name = jsoncheck.loads(docker)[0]["Config"]
            return "sha256:" + str(config_name).rpartition("/")[2].removesuffix(".json")
        index = read_member(archive, "index.json")
        if index is None:
            return None
        manifest_digest = str(jsoncheck.loads(index)["manifests"][0]["digest"])
        manifest = read_member(archive, blob_name(manifest_digest))
        return None if manifest is None else str(jsoncheck.loads(manifest)["config"]["digest"])
    except (ValueError, LookupError, TypeError, AttributeError):
        return None


def check_free_space(dest: Path, needed: int) -> None:
    """Refuse before writing when dest's filesystem cannot hold needed bytes."""
    make_dirs(dest.parent)
    st = os.statvfs(dest.parent)
    free = st.f_bavail * st.f_frsize
    if free < needed:
        raise OutputError(
            f"{dest}: not enough space for the image archive (needs {needed} bytes, {free} free);"
            " free space or choose another --output"
        )


def archive_mtime(config: bytes) -> int:
    """The archive members' mtime: the image's creation time, so archives of one image are byte-identical."""
    created = json.loads(config)["created"]
    return int(datetime.fromisoformat(created).timestamp())


def pause_while_packing(container: Container, marker_dir: Path, *, enabled: bool) -> AbstractContextManager[object]:
    """Freeze a running container's cgroup while its layer is packed, as `docker commit` does by default.

    Only the cgroup named after the container's id is frozen, never the one its recorded pid merely sits in (a
    stale or forged pid may name any process), and a container already paused stays paused: its engine readers
    report a paused container as not running, and freezer.paused leaves any cgroup it finds frozen alone.
    Containers frozen by a commit that was killed are thawed first (their markers sit in marker_dir).
    """
    freezer.thaw_abandoned(marker_dir)
    if not enabled or not container.running or container.pid <= 0:
        return nullcontext()
    label = f"{container.name.lstrip('/')} ({container.short_id})"
    return freezer.paused(container.pid, marker_dir, label=label, container_id=container.container_id)


def pack_image_layer(
    cache: LayerCache,
    layer: Layer,
    *,
    clamp_mtime: int | None,
    report: Callable[[int, int], None],
) -> LayerRecord:
    """An image layer's blob: its original tar reassembled from tar-split when the engine kept one (so the
    image shares the base layer's diff_id and registries deduplicate it), else the directory packed."""
    if layer.tar_split is not None and layer.diff_id:
        record = cache.reassemble_layer(layer.layer_dir, layer.tar_split, layer.diff_id)
        if record is not None:
            return record
    return pack_scanned_layer(
        cache, layer.layer_dir, clamp_mtime=clamp_mtime, report=report, overlay_xattrs=layer.overlay_xattrs
    )


def pack_scanned_layer(
    cache: LayerCache,
    layer_dir: Path,
    *,
    clamp_mtime: int | None,
    report: Callable[[int, int], None],
    overlay_xattrs: str = "trusted",
) -> LayerRecord:
    """Scan layer_dir (fingerprint and size), then pack it, reporting (bytes done, bytes expected) as it goes.

    The fingerprint is taken before packing, so a layer changed meanwhile never looks unchanged later.
    """
    scan = scan_layer(layer_dir)
    record = cache.pack_layer(
        layer_dir,
        clamp_mtime=clamp_mtime,
        progress=lambda done: report(done, scan.file_bytes),
        overlay_xattrs=overlay_xattrs,
    )
    return replace(record, fingerprint=scan.fingerprint)


def pack_container_layer(
    cache: LayerCache,
    layer_dir: Path,
    *,
    clamp_mtime: int | None,
    report: Callable[[int, int], None],
    overlay_xattrs: str = "trusted",
) -> LayerRecord:
    """The container's upper dir packed, its fingerprint taken before packing and again after, so the record
    describes one state of the container: an entry added, removed or rewritten meanwhile (even one packing had
    already passed) makes the layer be packed once more, and a second change is an error."""
    for attempt in (1, 2):
        record = pack_scanned_layer(
            cache, layer_dir, clamp_mtime=clamp_mtime, report=report, overlay_xattrs=overlay_xattrs
        )
        if scan_layer(layer_dir).fingerprint == record.fingerprint:
            return record
        if attempt == 1:
            log.warning("%s: the container's layer changed while it was packed; packing it again", layer_dir)
    raise SourceChanged(
        f"{layer_dir}: the container's layer changed while it was packed (twice); pause the container"
        " (--pause true) or stop writes to it, then re-run"
    )

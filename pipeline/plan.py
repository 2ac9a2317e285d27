"""What a commit request resolves to: the container, its state taken once (the keys of its layers and the digest of its
metadata), the image reference and the output path, with every option checked before any layer is packed."""

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline import jsoncheck
from pipeline.engines.container import Container, Layer, Storage, resolve_container
from pipeline.errors import OutputError, PipelineError
from pipeline.host import extents
from pipeline.image.dockerfile import apply_changes
from pipeline.image.imageconfig import digest_of
from pipeline.image.reference import Reference, build_reference_from_name, parse_reference
from pipeline.layer import tarheader
from pipeline.layer.writer import LayerScan, scan_layer
from pipeline.store import compression, pack
from pipeline.store.layout import CacheLayout

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
    planned_bytes: int = 0  # a layer scanned when planned: its file bytes (with the key's fingerprint, that scan)

    def as_param(self) -> tuple[str, ...]:
        # The optional fields only when set, so the tasks of rootful storage keep the ids they had.
        extra: tuple[str, ...] = () if self.overlay_xattrs == "trusted" else (self.overlay_xattrs,)
        if self.planned_bytes:
            extra = (self.overlay_xattrs, str(self.planned_bytes))
        return (self.layer_dir, self.key, self.tar_split, self.diff_id, *extra)

    @classmethod
    def from_param(cls, value: Sequence[str]) -> "LayerSource":
        layer_dir, key, tar_split, diff_id, *extra = value
        overlay_xattrs = extra[0] if extra else "trusted"
        return cls(layer_dir, key, tar_split, diff_id, overlay_xattrs, int(extra[1]) if len(extra) > 1 else 0)

    def planned_scan(self) -> LayerScan | None:
        """The scan of the layer taken when the run was planned (its fingerprint is in the key), if any."""
        head, sep, digest = self.key.rpartition(":sha256:")
        if not self.planned_bytes or not sep or not head.startswith(("dir:", "upper:")):
            return None
        return LayerScan("sha256:" + digest, 0, self.planned_bytes)


@dataclass(frozen=True)
class ContainerState:
    """What a commit of a container is made from, taken once per run: its layers' keys and the digest of its
    metadata (its settings, its base image's config, the --config file), so every target derived from them can
    be named by them."""

    lower: tuple[LayerSource, ...]
    upper: LayerSource
    metadata: str


def read_state(
    storage: Storage,
    container: Container,
    config_file: str = "",
    image_keys: dict[str, tuple[str, int]] | None = None,
) -> ContainerState:
    """The container's state at this moment (metadata walks only; no file content is read). image_keys, if
    given, holds the keys of image layers already scanned in this run (real path: key) and gets the new ones: the
    containers of a fleet share their image layers, which need scanning once per run, not once per container."""
    known = {} if image_keys is None else image_keys

    def image_layer(layer: Layer) -> LayerSource:
        key, planned_bytes = layer.diff_id, 0
        if not key:
            real = os.path.realpath(layer.layer_dir)
            if real not in known:
                scan = scan_layer(layer.layer_dir)
                known[real] = (f"dir:{real}:{scan.fingerprint}", scan.file_bytes)
            key, planned_bytes = known[real]
        return LayerSource(
            str(layer.layer_dir), key, str(layer.tar_split or ""), layer.diff_id, layer.overlay_xattrs, planned_bytes
        )

    lower = tuple(image_layer(layer) for layer in container.lower_layers)
    upper_dir = container.upper_layer.layer_dir
    upper_scan = scan_layer(upper_dir)
    upper = LayerSource(
        str(upper_dir),
        upper_key(container.container_id, upper_scan.fingerprint),
        overlay_xattrs=container.upper_layer.overlay_xattrs,
        planned_bytes=upper_scan.file_bytes,
    )
    layers = ("lower_layers", "upper_layer")  # keyed above, by content
    settings = {k: v for k, v in asdict(container).items() if k not in ("running", "pid", *layers)}
    doc = {
        "container": settings,
        "base": storage.read_base_config(container),
        "config_file": read_config_file(config_file),
    }
    # ASCII escapes: metadata from the storage may hold lone surrogates, which have no UTF-8 encoding.
    return ContainerState(lower, upper, digest_of(json.dumps(doc, sort_keys=True, default=str).encode()))


def upper_key(container_id: str, fingerprint: str) -> str:
    """The key of a container's upper dir in one state: its id and the fingerprint of its metadata."""
    return f"upper:{container_id}:{fingerprint}"


@dataclass(frozen=True)
class CommitPlan:
    """What a commit request resolves to: one container in its present state, one image reference, one archive
    path."""

    container_id: str
    reference: Reference
    output: Path
    state: ContainerState
    config_file: str = ""  # absolute
    name: str = ""  # the container's name, for people (task ids, logs)


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
    state = read_state(storage, container, config_file)
    return CommitPlan(container_id, reference, path, state, config_file, container.name.lstrip("/"))


@dataclass(frozen=True)
class CommitRequest:
    """What the user asked for: a container by id prefix or name, the image's reference, where its files go
    (output None: a push, no archive) and the options that change the image."""

    id_text: str
    image: str = ""
    output: str | None = ""
    output_dir: str = "images"
    cache_dir: str = ".cache/pipeline"
    fmt: str = "both"
    config_file: str = ""
    iidfile: str = ""
    changes: tuple[str, ...] = ()
    author: str = ""
    message: str = ""
    compression: str = "none"
    compression_level: int | None = None


def plan_request(storage: Storage, storage_root: str | Path, request: CommitRequest) -> CommitPlan:
    """Check every part of request before anything is scanned or packed, then resolve it (plan_commit).

    The storage is only ever read, so nothing this run writes may lie inside it; a bad option fails now, not
    after the layers were packed."""
    writes: dict[str, str | Path] = {CACHE_DIR_FLAG: request.cache_dir}
    if request.output is not None:
        writes |= {"--output": request.output} if request.output else {OUTPUT_DIR_FLAG: request.output_dir}
    writes |= {"--iidfile": request.iidfile} if request.iidfile else {}
    check_outside_storage(storage_root, writes)
    check_options(request.changes, request.config_file, request.author, request.message)
    check_compression(request.compression, request.compression_level, None if request.output is None else request.fmt)
    return plan_commit(
        storage,
        request.id_text,
        request.image,
        request.output or "",
        Path(request.output_dir),
        None if request.output is None else request.fmt,
        os.path.abspath(request.config_file) if request.config_file else "",
    )


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


def check_compression(algorithm: str, level: int | None, fmt: str | None) -> None:
    """Refuse a compression the chosen format cannot carry (None: a push), or a level the algorithm lacks."""
    compression.check_algorithm(algorithm)
    if level is not None:
        compression.check_level(algorithm, level)
    if fmt in ("both", "docker") and algorithm not in compression.DOCKER_ARCHIVE_ALGORITHMS:
        raise PipelineError(
            f"--compression {algorithm}: a docker-archive ({fmt}) holds only plain or gzip layers; use"
            " --format oci or oci-dir, or --compression gzip"
        )


FORMATS = ("both", "docker", "oci", "oci-dir")


def assembles_in_place(request: CommitRequest, resolved: CommitPlan, *, layers: int) -> bool:
    """Whether the commit's archive can be assembled in place (store.pack), each layer written once, into the
    archive itself: a tar of uncompressed layers, the cache on a filesystem that collapses ranges (ext4, XFS),
    the archive on that same filesystem (it becomes the archive by a hardlink), and few enough layers."""
    if request.fmt == "oci-dir" or request.compression != "none" or not 0 < layers <= pack.MAX_SLOTS:
        return False
    pack_dir = CacheLayout(Path(request.cache_dir)).pack_dir
    try:
        pack_dir.mkdir(parents=True, exist_ok=True)
        if _device(pack_dir) != _device(resolved.output.parent):
            return False
    except OSError:
        return False
    return extents.can_collapse(pack_dir, tarheader.ALIGNMENT)


def _device(path: Path) -> int:
    """The device of path, or of its nearest existing ancestor."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path.stat().st_dev

"""A push of one image: its blobs (skipped when present, mounted from another repository when this registry
has them there, else uploaded), then its manifest; and the record of what each registry already holds.

Spec: https://github.com/opencontainers/distribution-spec/blob/main/spec.md (push, cross-repository mount).
"""

import fcntl
import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import jsoncheck
from pipeline.errors import InvalidReference, OutputError, RegistryError
from pipeline.host.atomic import make_dirs, write_bytes_atomic
from pipeline.image.imageconfig import digest_of, encode_json
from pipeline.image.ocilayout import CONFIG_MEDIA_TYPE, build_image_manifest
from pipeline.image.reference import Reference, parse_reference
from pipeline.layer.writer import LayerRecord
from pipeline.registry.client import Blob, Registry
from pipeline.store.cache import LayerCache
from pipeline.store.compression import compress_blob, default_level
from pipeline.store.layout import CacheLayout

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Image:
    """What a push sends: the manifest bytes and the blobs it names, layers oldest first."""

    manifest: bytes
    config: Blob
    layers: tuple[Blob, ...]

    @property
    def digest(self) -> str:
        return digest_of(self.manifest)


@dataclass(frozen=True)
class PushResult:
    reference: str
    digest: str
    uploaded: tuple[str, ...]
    mounted: tuple[str, ...]
    present: tuple[str, ...]  # already in the repository


def parse_push_reference(text: str) -> Reference:
    """HOST[:PORT]/REPO[:TAG], checked against Docker's grammar; the registry host is required."""
    reference = parse_reference(text)
    if reference.domain is None:
        raise InvalidReference(
            f"invalid image reference {text!r} for a push: it names no registry host;"
            f" use e.g. --image registry.example.com/{reference.path}:{reference.tag}"
        )
    return reference


def prepare_image(
    config: bytes,
    records: Sequence[LayerRecord],
    cache: LayerCache,
    *,
    compression: str = "none",
    level: int | None = None,
) -> Image:
    """The OCI image of a commit: its config, its cached layers (compressed once per cache when asked), the
    manifest."""
    diff_ids = json.loads(config).get("rootfs", {}).get("diff_ids")
    if diff_ids != [r.diff_id for r in records]:
        raise OutputError(
            f"{cache.root}: the commit's image config lists other layers than its layer records (a layer was packed"
            " again since); remove the commit's files under commits/ there and re-run"
        )
    chosen = default_level(compression) if level is None else level
    stored = [compress_blob(cache.root, r, compression, chosen) for r in records]
    layers = tuple(Blob(b.digest, b.size, b.media_type, path=cache.blob_file(b.digest, b.size)) for b in stored)
    manifest = encode_json(build_image_manifest(config, stored))
    return Image(manifest, Blob(digest_of(config), len(config), CONFIG_MEDIA_TYPE, data=config), layers)


class PushedBlobs:
    """Which repositories of one registry got which blobs from pushes of this cache (<cache>/pushed/<host>.json),
    so a blob already in another repository is mounted instead of uploaded. A hint: a wrong entry costs an upload."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def in_cache(cls, cache_dir: Path, host: str) -> "PushedBlobs":
        return cls(CacheLayout(cache_dir).pushed_blobs(host))

    def sources(self, digest: str) -> list[str]:
        found = _read_json(self.path).get(digest, [])
        return [r for r in found if isinstance(r, str)] if isinstance(found, list) else []

    def add(self, repository: str, digests: Iterable[str]) -> None:
        def change(record: dict[str, Any]) -> None:
            for digest in digests:
                known = record.get(digest)
                repositories = [r for r in known if r != repository] if isinstance(known, list) else []
                record[digest] = [repository, *repositories]  # the latest first: the likeliest to still hold it

        _update_json(self.path, change)


class PushedTags:
    """Which manifest digest each tag pushed from this cache was given (<cache>/pushed/<host>.tags.json).

    A push's luigi target compares with this record, so deciding whether a push is done never calls the registry
    (luigi's complete() must stay cheap and offline). A tag moved in the registry by someone else since is not
    noticed; remove this file to push every tag again."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def in_cache(cls, cache_dir: Path, host: str) -> "PushedTags":
        return cls(CacheLayout(cache_dir).pushed_tags(host))

    def digest(self, repository: str, tag: str) -> str | None:
        found = _read_json(self.path).get(f"{repository}:{tag}")
        return found if isinstance(found, str) else None

    def add(self, repository: str, tag: str, digest: str) -> None:
        _update_json(self.path, lambda record: record.update({f"{repository}:{tag}": digest}))


def _read_json(path: Path) -> dict[str, Any]:
    """A push record, or {} when it is missing or unreadable (records are hints: the push proceeds without)."""
    try:
        record = jsoncheck.loads(path.read_bytes())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        log.warning("%s: unreadable (%s); pushing without it", path, e)
        return {}
    return record if isinstance(record, dict) else {}


def _update_json(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    """Read-modify-write a push record under a flock, so concurrent pushes never drop each other's entries."""
    make_dirs(path.parent)
    fd = os.open(path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        record = _read_json(path)
        change(record)
        write_bytes_atomic(path, encode_json(record))
    finally:
        os.close(fd)


def push_image(
    registry: Registry,
    reference: Reference,
    image: Image,
    pushed: PushedBlobs | None = None,
    tags: PushedTags | None = None,
) -> PushResult:
    """Push image to reference: each blob the repository lacks is mounted from another repository known to hold it,
    or uploaded; then the manifest is PUT under the tag."""
    for blob in image.layers:
        assert blob.path is not None
        size = blob.path.stat().st_size if blob.path.is_file() else -1
        if size != blob.size:
            raise OutputError(f"{blob.path}: cached layer is missing or damaged; re-run to pack it again")
    repository = reference.path
    uploaded: list[str] = []
    mounted: list[str] = []
    present: list[str] = []
    for blob in (*image.layers, image.config):
        if registry.blob_exists(repository, blob.digest):
            present.append(blob.digest)
            continue
        source = next((s for s in (pushed.sources(blob.digest) if pushed else []) if s != repository), None)
        done, session = _mount(registry, repository, blob.digest, source) if source else (False, None)
        if done:
            mounted.append(blob.digest)
            log.info("mounted %s from %s into %s/%s", blob.digest, source, registry.host, repository)
            continue
        registry.upload_blob(repository, blob, session)
        uploaded.append(blob.digest)
        log.info("uploaded %s (%d bytes) to %s/%s", blob.digest, blob.size, registry.host, repository)
    digest = registry.put_manifest(repository, reference.tag, image.manifest)
    if pushed is not None:
        pushed.add(repository, [b.digest for b in (*image.layers, image.config)])
    if tags is not None:
        tags.add(repository, reference.tag, digest)
    counts = len(uploaded), len(mounted), len(present)
    log.info("pushed %s as %s: %d blobs uploaded, %d mounted, %d already there", reference, digest, *counts)
    return PushResult(str(reference), digest, tuple(uploaded), tuple(mounted), tuple(present))


def _mount(registry: Registry, repository: str, digest: str, source: str) -> tuple[bool, str | None]:
    """(True, None) when mounted, else (False, the upload URL the registry opened instead, if any)."""
    try:
        session = registry.mount_blob(repository, digest, source)
    except RegistryError as e:  # a mount only saves an upload
        log.warning("%s; uploading it instead", e)
        return False, None
    return session is None, session

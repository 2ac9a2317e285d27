"""Assembling a commit's image from its packed layers: the config, docker's manifest.json and repositories, the OCI
manifest and index, and the archive (or layout directory) in one of plan.FORMATS."""

import errno
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path

from pipeline import jsoncheck
from pipeline.engines.container import Storage
from pipeline.errors import OutputError
from pipeline.host.atomic import atomic_path, make_dirs, no_space_error
from pipeline.image import ocilayout
from pipeline.image.archive import (
    BlobMoved,
    Member,
    PackTaken,
    archive_size,
    assemble_in_place,
    copy_archive,
    read_member,
    source_member,
    write_image_archive,
)
from pipeline.image.dockerarchive import blob_name, build_docker_manifest, build_repositories
from pipeline.image.imageconfig import CommitOptions, build_image_config, digest_of, encode_json
from pipeline.image.reference import Reference
from pipeline.layer.writer import LayerRecord
from pipeline.store import compression
from pipeline.store.cache import LayerCache
from pipeline.store.compression import StoredBlob

log = logging.getLogger(__name__)


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


def read_diff_ids(config_path: Path) -> list[str] | None:
    """The rootfs.diff_ids of the image config at config_path, or None when it is missing or unreadable."""
    try:
        diff_ids = jsoncheck.loads(config_path.read_bytes())["rootfs"]["diff_ids"]
    except (OSError, ValueError, LookupError, TypeError):
        return None
    return diff_ids if isinstance(diff_ids, list) else None


def build_manifest_bytes(config: bytes, blobs: Sequence[StoredBlob], reference: Reference) -> bytes:
    return encode_json(build_docker_manifest(digest_of(config), [b.digest for b in blobs], reference))


def layer_blobs(
    cache: LayerCache, records: Sequence[LayerRecord], algorithm: str, level: int | None
) -> list[StoredBlob]:
    """The stored blob of each layer: the cached tar itself, or its gzip/zstd form (compressed once per cache)."""
    chosen = compression.default_level(algorithm) if level is None else level
    return [compression.compress_blob(cache.root, record, algorithm, chosen) for record in records]


def find_layer_blobs(
    cache: LayerCache, records: Sequence[LayerRecord], algorithm: str, level: int | None
) -> list[StoredBlob] | None:
    """The stored blob of each layer if every one is already in the cache, else None; never compresses (for
    luigi's complete(), which must stay cheap)."""
    chosen = compression.default_level(algorithm) if level is None else level
    blobs = [compression.find_blob(cache.root, record, algorithm, chosen) for record in records]
    return None if any(b is None for b in blobs) else [b for b in blobs if b is not None]


def build_repositories_bytes(config: bytes, reference: Reference) -> bytes:
    return encode_json(build_repositories(reference, digest_of(config)))


def write_commit_output(
    dest: Path,
    fmt: str,
    cache: LayerCache,
    layers: Sequence[StoredBlob],
    config: bytes,
    docker_files: dict[str, bytes],
    reference: Reference,
    *,
    mtime: int,
    progress: Callable[[int, int], None] | None = None,
    packed: Path | None = None,
) -> None:
    """Write the image in one of FORMATS: a docker-archive, an OCI archive, both in one tar (as `docker save`
    does since Engine 25), or an OCI layout directory whose layer blobs are hardlinks into the cache.

    docker_files holds manifest.json and repositories; layers go oldest first, then the small files. packed: the
    pack (store.pack) the layers were packed into, layer i into slot i: the archive is assembled there, in place,
    and becomes dest by a hardlink (the cache keeps it, and finds the layers in it).
    """
    manifest = encode_json(ocilayout.build_image_manifest(config, layers))
    oci_files = ocilayout.layout_files(config, manifest, encode_json(ocilayout.build_index(manifest, reference)))
    if fmt == "oci-dir":
        blobs = [cache.blob_file(layer.digest, layer.size) for layer in layers]
        with atomic_path(dest) as temp:
            temp.mkdir()
            ocilayout.write_oci_dir(temp, blobs, oci_files)
        return

    def members() -> list[Member]:
        """Each layer's blob where it is now."""
        found = []
        for layer in layers:
            source = cache.locate(layer.digest, layer.size)
            if source is not None and source.assembling and source.path != packed:
                cache.forget_pointer(layer.digest)  # in another commit's unfinished archive: packed again next run
                source = None
            if source is None:
                path = cache.blob_path(layer.digest)
                raise OutputError(f"{path}: cached layer is missing or damaged; re-run to repack it")
            found.append(source_member(blob_name(layer.digest), source))
        return found

    small = {blob_name(digest_of(config)): config}
    if fmt in ("both", "oci"):
        small = oci_files
    if fmt in ("both", "docker"):
        small |= docker_files
    small_members = [Member(name, data=data) for name, data in small.items()]
    needed = archive_size(members() + small_members)
    in_place = needed - sum(layer.size for layer in layers)  # the layers are in the pack already
    for attempt in range(1, _ATTEMPTS + 1):
        try:
            _write_archive(dest, cache, packed, members, small_members, needed, in_place, mtime, progress)
            return
        except BlobMoved as e:
            # Another commit assembled the pack a layer was read from, moving it: its new place is recorded.
            if attempt == _ATTEMPTS:
                raise
            log.info("%s; reading it from its new place", e)


_ATTEMPTS = 3


def _write_archive(
    dest: Path,
    cache: LayerCache,
    packed: Path | None,
    members: Callable[[], list[Member]],
    small_members: list[Member],
    needed: int,
    needed_in_place: int,
    mtime: int,
    progress: Callable[[int, int], None] | None,
) -> None:
    """The archive at dest: assembled in packed (when given and it can be), else copied together."""
    report = None if progress is None else (lambda done: progress(done, needed))
    try:
        if packed is not None:
            check_free_space(dest, needed_in_place)

            def point(offsets: list[tuple[str, int]]) -> None:
                for name, offset in offsets:
                    digest = "sha256:" + name.rpartition("/")[2]
                    if not cache.blob_path(digest).exists():
                        cache.point(digest, packed, offset)

            try:
                assemble_in_place(
                    packed, lambda: [(m, slot) for slot, m in enumerate(members())], small_members, mtime=mtime,
                    progress=report, placed=point,
                )  # fmt: skip
            except PackTaken as e:
                log.info("%s; copying the layers from there", e)
            else:
                publish(packed, dest)
                return
        check_free_space(dest, needed)
        with atomic_path(dest) as temp:
            write_image_archive(temp, members() + small_members, mtime=mtime, progress=report)
    except BlobMoved:
        raise
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise no_space_error(dest, e, needed) from e
        raise OutputError(f"{dest}: cannot write the image archive ({e.strerror}); fix and re-run") from e


def publish(packed: Path, dest: Path) -> None:
    """Make the finished archive packed appear at dest: hardlinked, so not a byte is written, while no other
    archive shares it (a person editing one archive in place must not change another); copied otherwise."""
    try:
        if os.path.samefile(packed, dest):
            return
    except FileNotFoundError:
        pass
    with atomic_path(dest) as temp:
        if os.stat(packed).st_nlink == 1:
            try:
                os.link(packed, temp)
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                    raise
                copy_archive(packed, temp)
        else:
            copy_archive(packed, temp)


def build_archive_identity(
    fmt: str, config: bytes, layers: Sequence[StoredBlob], reference: Reference, docker_manifest: bytes
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

"""Builds OCI image-layout documents (oci-layout, index.json, the image manifest) and writes layout directories.

Spec: https://github.com/opencontainers/image-spec/blob/main/image-layout.md and manifest.md; Docker Engine 25
puts the same documents next to manifest.json in `docker save` archives.
"""

import errno
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.host.atomic import fsync_dir, make_dirs
from pipeline.image.dockerarchive import blob_name
from pipeline.image.imageconfig import digest_of, encode_json
from pipeline.image.reference import Reference
from pipeline.store.compression import StoredBlob

MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
INDEX_MEDIA_TYPE = "application/vnd.oci.image.index.v1+json"
CONFIG_MEDIA_TYPE = "application/vnd.oci.image.config.v1+json"
LAYER_MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYOUT = encode_json({"imageLayoutVersion": "1.0.0"})


def build_image_manifest(config: bytes, layers: Sequence[StoredBlob]) -> dict[str, Any]:
    """The image manifest: the config, then each layer blob as stored (plain tar, tar+gzip or tar+zstd)."""
    return {
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "config": {"mediaType": CONFIG_MEDIA_TYPE, "digest": digest_of(config), "size": len(config)},
        "layers": [{"mediaType": b.media_type, "digest": b.digest, "size": b.size} for b in layers],
    }


def build_index(manifest: bytes, reference: Reference) -> dict[str, Any]:
    """index.json naming the image the way `docker save` does: the tag for OCI tools, the full name for
    containerd."""
    return {
        "schemaVersion": 2,
        "mediaType": INDEX_MEDIA_TYPE,
        "manifests": [
            {
                "mediaType": MANIFEST_MEDIA_TYPE,
                "digest": digest_of(manifest),
                "size": len(manifest),
                "annotations": {
                    "io.containerd.image.name": full_name(reference),
                    "org.opencontainers.image.ref.name": reference.tag,
                },
            }
        ],
    }


def full_name(reference: Reference) -> str:
    """docker.io/library/busybox:latest for busybox:latest, as containerd names images."""
    if reference.domain:
        return str(reference)
    path = reference.path if "/" in reference.path else f"library/{reference.path}"
    return f"docker.io/{path}:{reference.tag}"


def write_oci_dir(dest: Path, blobs: list[Path], small: dict[str, bytes]) -> None:
    """Fill the empty directory dest with an OCI layout: blobs hardlinked from the cache (copied only across
    filesystems), and the small files (config and manifest blobs, oci-layout, index.json) written."""
    blob_dir = dest / "blobs" / "sha256"
    make_dirs(blob_dir)
    for blob in blobs:
        target = blob_dir / blob.name
        if target.exists():
            continue
        try:
            os.link(blob, target)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                raise
            shutil.copyfile(blob, target)
    for name, data in small.items():
        path = dest / name
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    fsync_dir(blob_dir)
    fsync_dir(dest)


def layout_files(config: bytes, manifest: bytes, index: bytes) -> dict[str, bytes]:
    """The small files of a layout, by path: config and manifest blobs, oci-layout, index.json."""
    return {
        blob_name(digest_of(config)): config,
        blob_name(digest_of(manifest)): manifest,
        "oci-layout": OCI_LAYOUT,
        "index.json": index,
    }

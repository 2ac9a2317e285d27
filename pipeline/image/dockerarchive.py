"""Builds docker-archive's own documents: manifest.json (not an OCI image manifest) and the legacy repositories.

Spec: moby's image/tarexport (manifestItem; "repositories" is {name: {tag: id}}).
"""

from typing import Any

from pipeline.image.reference import Reference


def blob_name(digest: str) -> str:
    """Where a blob sits inside an archive: the OCI layout's path, which docker save uses since Engine 25."""
    algorithm, _, hex_digest = digest.partition(":")
    return f"blobs/{algorithm}/{hex_digest}"


def build_docker_manifest(config_digest: str, layer_digests: list[str], reference: Reference) -> list[dict[str, Any]]:
    return [
        {
            "Config": blob_name(config_digest),
            "RepoTags": [str(reference)],
            "Layers": [blob_name(d) for d in layer_digests],
        }
    ]


def build_repositories(reference: Reference, image_id: str) -> dict[str, dict[str, str]]:
    return {reference.name: {reference.tag: image_id.removeprefix("sha256:")}}

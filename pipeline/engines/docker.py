"""Reads Docker Engine's storage with the overlay2 graph driver: containers/<id>/config.v2.json and the layer store.

Layout: https://github.com/moby/moby — container/container.go and container/state.go (config.v2.json),
layer/filestore.go and layer/layer_store.go (image/overlay2/layerdb/{sha256,mounts}), image/fs.go
(image/overlay2/imagedb/content/sha256/<image-id>), daemon/graphdriver/overlay2/overlay.go (overlay2/<cache-id>/diff).
"""

import hashlib
import re
from pathlib import Path
from typing import Any

from pipeline.engines.container import (
    Container,
    Layer,
    MobyLayout,
    check_id_text,
    checked_layer_dir,
    overlay_xattrs_of,
    parse_json_object,
    pick_docker_config,
    pick_image_config,
    read_json_object,
    read_moby_state,
    read_storage_file,
)
from pipeline.errors import ContainerNotFound, StorageError
from pipeline.jsoncheck import check_image_config, fields_of, optional, string

_CONTAINER_ID = re.compile(r"[0-9a-f]{64}")
# layer/filestore.go stringIDRegexp: what a mount-id, init-id or cache-id file may hold.
_CACHE_ID = re.compile(r"[0-9a-f]{64}(-init)?")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
# layer/layer_store.go maxLayerDepth: docker refuses to stack more image layers than this.
_MAX_DEPTH = 125


class DockerStorage(MobyLayout):
    """Docker's storage under root (default /var/lib/docker), overlay2 driver only; never written to."""

    engine = "docker"

    container_id_pattern = _CONTAINER_ID

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self._layerdb = root / "image" / "overlay2" / "layerdb"

    def read_container(self, container_id: str) -> Container:
        check_id_text(container_id)
        path = self._containers / container_id / "config.v2.json"
        if not _CONTAINER_ID.fullmatch(container_id) or not path.is_file():
            raise ContainerNotFound(f"{path}: no such container; list them with docker ps --all")
        doc = read_json_object(path, f"container {container_id}")
        with fields_of(path, "the container's metadata is corrupt"):
            driver = optional(doc, "Driver", "Driver", string, "") or "overlay2"
        if driver != "overlay2":
            raise StorageError(
                f"{path}: container {container_id} uses the storage driver {driver!r}; only overlay2 is supported"
                " (the containerd image store keeps layers elsewhere)"
            )
        state, config = doc.get("State", {}), doc.get("Config", {})
        if not isinstance(state, dict) or not isinstance(config, dict):
            raise StorageError(f"{path}: 'State' and 'Config' must be objects; the container's metadata is corrupt")
        image_config = pick_image_config(config, path)
        moby = read_moby_state(doc, state, config, path)
        with fields_of(path, "the container's metadata is corrupt"):
            image = moby.image or optional(doc, "Image", "Image", string, "")
        return Container(
            container_id=container_id,
            name=moby.name,
            created=moby.created,
            running=moby.running,
            pid=moby.pid,
            image=image,
            lower_layers=tuple(self._read_image_layers(container_id)),
            upper_layer=self._read_container_layer(container_id),
            config=image_config,
            # config.v2.json's Config is the container's whole Config with the image's defaults merged in at
            # create time (daemon/create.go), which docker commit writes as the image's config.
            full_config=pick_docker_config(config, path),
        )

    def read_base_config(self, container: Container) -> dict[str, Any] | None:
        path = self._containers / container.container_id / "config.v2.json"
        image_id = read_json_object(path, f"container {container.container_id}").get("Image")
        if not image_id:
            return None
        if not isinstance(image_id, str) or not _DIGEST.fullmatch(image_id):
            raise StorageError(
                f"{path}: Image {image_id!r} is not a sha256 digest; the container's metadata is corrupt"
            )
        hex_id = image_id.removeprefix("sha256:")
        content = self.root / "image" / "overlay2" / "imagedb" / "content" / "sha256" / hex_id
        data = read_storage_file(content, f"config of image {hex_id}")
        # image/fs.go checks the same on every read: an image id is the digest of its config.
        if hashlib.sha256(data).hexdigest() != hex_id:
            raise StorageError(f"{content}: does not hash to its image id; the image store is corrupt (docker pull)")
        doc = parse_json_object(data, content, f"config of image {hex_id}")
        with fields_of(content, "the image store is corrupt (docker pull)"):
            check_image_config(doc)
        return doc

    def _read_container_layer(self, container_id: str) -> Layer:
        # layer_store.go: the container's writable layer is mount-id; its parent in the graph driver is init-id
        # ("<mount-id>-init", /etc/hosts and the like), and docker commit diffs against that, so the init layer
        # is never part of the image and is not read here.
        mount_id = _read_id(self._layerdb / "mounts" / container_id / "mount-id", _CACHE_ID, required=True)
        layer_dir = checked_layer_dir(self._layers_root, mount_id, container_id)
        # Rootless dockerd (data-root owned by the user) mounts overlay2 with "userxattr": user.overlay.* markers.
        return Layer(mount_id, layer_dir, overlay_xattrs=overlay_xattrs_of(self.root))

    def _read_image_layers(self, container_id: str) -> list[Layer]:
        """The image layers under the container's writable layer, oldest first, by their chain ids' parent files."""
        mounts = self._layerdb / "mounts" / container_id
        layers: list[Layer] = []
        named_by = mounts / "parent"  # the file that names the next chain id, for errors
        chain_id = _read_id(named_by, _DIGEST, required=False)
        while chain_id:
            if len(layers) >= _MAX_DEPTH:
                raise StorageError(
                    f"{self._layerdb}: the layers of container {container_id} go deeper than docker allows"
                    f" ({_MAX_DEPTH}); the layer store is corrupt"
                )
            layer_meta = self._layerdb / "sha256" / chain_id.removeprefix("sha256:")
            if not layer_meta.is_dir():
                raise StorageError(
                    f"{layer_meta}: layer {chain_id} of container {container_id} is missing (named by {named_by});"
                    " the layer store is incomplete"
                )
            cache_id = _read_id(layer_meta / "cache-id", _CACHE_ID, required=True)
            layer_dir = checked_layer_dir(self._layers_root, cache_id, container_id, listed_in=layer_meta)
            # layer/filestore.go: the tar the layer was applied from survives as tar-split.json.gz, with "diff".
            # "diff" is the layer's diff_id, which also keys the layer in the cache.
            tar_split = layer_meta / "tar-split.json.gz"
            diff = _read_id(layer_meta / "diff", _DIGEST, required=False)
            layers.append(
                Layer(
                    cache_id,
                    layer_dir,
                    tar_split=tar_split if tar_split.is_file() else None,
                    diff_id=diff,
                    overlay_xattrs=overlay_xattrs_of(self.root),
                )
            )
            named_by = layer_meta / "parent"
            chain_id = _read_id(named_by, _DIGEST, required=False)
        layers.reverse()
        return layers


def _read_id(path: Path, pattern: re.Pattern[str], *, required: bool) -> str:
    """The id or digest a layer store file holds (filestore.go trims whitespace), or "" when optional and absent."""
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        if required:
            raise StorageError(
                f"{path}: missing; the layer store is incomplete (is this a docker overlay2 root?)"
            ) from None
        return ""
    except (OSError, UnicodeDecodeError) as e:
        raise StorageError(f"{path}: unreadable ({e}); the layer store is corrupt") from e
    if not pattern.fullmatch(text):
        raise StorageError(f"{path}: holds {text[:80]!r}, not a valid id; the layer store is corrupt")
    return text

"""Reads rocker's storage: overlay2/<id>/{diff,lower}, containers/<id>/config.json and its image store.

Layout: ../shared/ROCKER.md ("rocker's on-disk layout").
"""

import os
import re
from pathlib import Path
from typing import Any

from pipeline.engines.container import (
    Container,
    Layer,
    MobyLayout,
    check_id_text,
    checked_layer_dir,
    pick_image_config,
    read_json_object,
    read_moby_state,
)
from pipeline.errors import StorageError
from pipeline.jsoncheck import (
    FieldError,
    check_image_config,
    fields_of,
    optional,
    string,
)

_LAYER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,254}")


class RockerStorage(MobyLayout):
    """rocker's storage under root (default /var/lib/rocker); never written to."""

    engine = "rocker"

    container_id_pattern = _LAYER_ID

    def read_container(self, container_id: str) -> Container:
        check_id_text(container_id)
        path = self._containers / container_id / "config.json"
        doc = read_json_object(path, f"container {container_id}")
        state = doc.get("State") or {}
        config = doc.get("Config") or {}
        if not isinstance(state, dict) or not isinstance(config, dict):
            raise StorageError(f"{path}: 'State' and 'Config' must be objects; the container's metadata is corrupt")
        if isinstance(config.get("Volumes"), list):
            # rocker records its `-v HOST:CONTAINER` bind mounts here as a list (../shared/ROCKER.md): run-time
            # mounts of host directories, which docker commit never turns into image VOLUMEs either.
            config = {k: v for k, v in config.items() if k != "Volumes"}
        image_config = pick_image_config(config, path)
        moby = read_moby_state(doc, state, config, path)
        return Container(
            container_id=container_id,
            name=moby.name,
            created=moby.created,
            running=moby.running,
            pid=moby.pid,
            image=moby.image,
            lower_layers=tuple(self._read_lower(container_id)),
            upper_layer=Layer(container_id, checked_layer_dir(self._layers_root, container_id, container_id)),
            config=image_config,
        )

    def read_base_config(self, container: Container) -> dict[str, Any] | None:
        store = self.root / "image" / "overlay2"
        wanted_layers = [f"sha256:{layer.layer_id}" for layer in container.lower_layers]
        name, _, tag = container.image.partition(":")
        try:
            candidates = sorted(os.listdir(store / "repositories"))
        except FileNotFoundError:
            return None
        by_layers = None
        for image_id in candidates:
            if not _LAYER_ID.fullmatch(image_id):
                continue
            record = store / "repositories" / image_id
            repo = read_json_object(record, f"image {image_id}")
            layers = _layer_digests(repo, record)
            named = container.image and (
                repo.get("ID") == container.image
                or (repo.get("Repository") == name and repo.get("Tag", "latest") == (tag or "latest"))
            )
            if named:
                return self._read_image_config(store, str(repo.get("ID") or image_id), record)
            if by_layers is None and layers == wanted_layers:
                by_layers = (str(repo.get("ID") or image_id), record)
        return self._read_image_config(store, *by_layers) if by_layers else None

    def _read_image_config(self, store: Path, image_id: str, record: Path) -> dict[str, Any]:
        """The config of the image that the repositories/ record names."""
        hex_id = image_id.removeprefix("sha256:")
        if not _LAYER_ID.fullmatch(hex_id):
            raise StorageError(f"{record}: image id {image_id[:80]!r} is not a valid id; the store is corrupt")
        path = store / "imagedb" / "content" / "sha256" / hex_id
        doc = read_json_object(path, f"image {hex_id} (named by {record})")
        with fields_of(path, "the image config is corrupt; fix or remove the image"):
            check_image_config(doc)
        return doc

    def _read_lower(self, container_id: str) -> list[Layer]:
        path = self._layers_root / container_id / "lower"
        try:
            text = path.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return []
        except (OSError, UnicodeDecodeError) as e:
            raise StorageError(f"{path}: cannot read the container's lower file ({e})") from e
        layers = []
        for item in text.split(":") if text else []:
            layer_id, _, rest = item.partition("/")
            if rest != "diff" or not _LAYER_ID.fullmatch(layer_id) or ".." in layer_id:
                raise StorageError(
                    f"{path}: entry {item!r} is not '<layer-id>/diff' inside overlay2/; the container's"
                    " lower file is malformed or points outside the storage root"
                )
            layers.append(Layer(layer_id, checked_layer_dir(self._layers_root, layer_id, container_id, listed_in=path)))
        return layers


def _layer_digests(repo: dict[str, Any], path: Path) -> list[str]:
    """The layer digests an image record of repositories/ lists (image_layer_info.Layers[].Digest), oldest first."""
    with fields_of(path, "the image store is corrupt; fix or remove the record"):
        optional(repo, "ID", "ID", string, "")
        info = repo.get("image_layer_info")
        if info is None:
            return []
        if not isinstance(info, dict):
            raise FieldError("image_layer_info", "an object", info)
        entries = info.get("Layers")
        if entries is not None and not isinstance(entries, list):
            raise FieldError("image_layer_info.Layers", "an array of objects", entries)
        digests = []
        for index, entry in enumerate(entries or []):
            if not isinstance(entry, dict):
                raise FieldError(f"image_layer_info.Layers[{index}]", "an object", entry)
            digests.append(string(entry.get("Digest"), f"image_layer_info.Layers[{index}].Digest"))
        return digests

"""Reads rocker's storage: overlay2/<id>/{diff,lower}, containers/<id>/config.json and its image store.

Layout: ../shared/ROCKER.md ("rocker's on-disk layout").
"""

import json
import os
import re
from pathlib import Path
from typing import Any

from pipeline.container import (
    Container,
    Layer,
    check_id_text,
    checked_layer_dir,
    list_container_dirs,
    pick_image_config,
)
from pipeline.errors import StorageError

_LAYER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,254}")


class RockerStorage:
    """rocker's storage under root (default /var/lib/rocker); never written to."""

    engine = "rocker"

    def __init__(self, root: Path) -> None:
        self.root = root
        self._layers_root = root / "overlay2"
        self._containers = root / "containers"

    def list_containers(self) -> list[str]:
        return list_container_dirs(self._containers, _LAYER_ID)

    def read_container(self, container_id: str) -> Container:
        check_id_text(container_id)
        path = self._containers / container_id / "config.json"
        doc = _read_json_object(path, f"container {container_id}")
        state = doc.get("State") or {}
        config = doc.get("Config") or {}
        if not isinstance(state, dict) or not isinstance(config, dict):
            raise StorageError(f"{path}: 'State' and 'Config' must be objects; the container's metadata is corrupt")
        image_config = pick_image_config(config, path)
        return Container(
            container_id=container_id,
            name=str(doc.get("Name") or ""),
            created=str(doc.get("Created") or ""),
            running=bool(state.get("Running", False)),
            pid=int(state.get("Pid") or 0),
            image=str(config.get("Image") or ""),
            lower_layers=tuple(self._read_lower(container_id)),
            layer=Layer(container_id, checked_layer_dir(self._layers_root, container_id, container_id)),
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
            repo = _read_json_object(store / "repositories" / image_id, f"image {image_id}")
            info = repo.get("image_layer_info") or {}
            layers = [entry.get("Digest") for entry in info.get("Layers", [])] if isinstance(info, dict) else []
            named = container.image and (
                repo.get("ID") == container.image
                or (repo.get("Repository") == name and repo.get("Tag", "latest") == (tag or "latest"))
            )
            if named:
                return self._read_image_config(store, str(repo.get("ID") or image_id))
            if by_layers is None and layers == wanted_layers:
                by_layers = str(repo.get("ID") or image_id)
        return self._read_image_config(store, by_layers) if by_layers else None

    def _read_image_config(self, store: Path, image_id: str) -> dict[str, Any]:
        hex_id = image_id.removeprefix("sha256:")
        if not _LAYER_ID.fullmatch(hex_id):
            raise StorageError(f"{store}/repositories: image id {image_id!r} is not a valid id; the store is corrupt")
        return _read_json_object(store / "imagedb" / "content" / "sha256" / hex_id, f"image {hex_id}")

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


def _read_json_object(path: Path, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise StorageError(f"{path}: missing; {what} is not in this storage (check --storage-root)") from None
    except (OSError, ValueError) as e:
        raise StorageError(f"{path}: {what} has unreadable or malformed JSON ({e}); fix or remove it") from e
    if not isinstance(doc, dict):
        raise StorageError(f"{path}: {what} must be a JSON object; fix or remove it")
    return doc

"""Reads podman's containers-storage (overlay driver) and the container settings podman keeps in libpod's database.

Layout: https://github.com/containers/storage — containers.go (overlay-containers/containers.json), layers.go
(overlay-layers/layers.json, volatile-layers.json), images.go and store.go (overlay-images/images.json, big-data files),
drivers/overlay/overlay.go (overlay/<layer-id>/diff). Settings: https://github.com/containers/podman —
libpod/container_config.go, stored by libpod/boltdb_state.go (format: https://github.com/etcd-io/bbolt, page.go and
bucket.go) or libpod/sqlite_state.go, and mapped to an image config as libpod/container_commit.go does.
"""

import base64
import hashlib
import logging
import re
import shutil
import sqlite3
import tempfile
from pathlib import Path
from typing import Any

from pipeline.engines.boltdb import BoltFile
from pipeline.engines.container import (
    Container,
    Layer,
    check_id_text,
    checked_layer_dir,
    overlay_xattrs_of,
    parse_json_object,
    read_storage_file,
)
from pipeline.errors import ContainerNotFound, StorageError
from pipeline.jsoncheck import (
    check_image_config,
    date,
    fields_of,
    loads,
    optional,
    pid,
    string,
    string_map,
    whole_number,
)

log = logging.getLogger(__name__)

# containers/storage names containers, layers and images with 64 hex chars (pkg/stringid); nothing else may reach a
# path. A config is addressed by its digest.
_ID = re.compile(r"[0-9a-f]{64}")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
# store.go makeBigDataBaseName keeps a big-data key as the file name only when it uses these characters.
_PLAIN_BIG_DATA_NAME = re.compile(r"[.0-9a-z]*")
# libpod/define/containerstate.go: ContainerStateRunning. A paused container (5) is already frozen; freezing and
# thawing it again would unpause it, so it does not count as running here.
_STATE_RUNNING = 3
_PORT = re.compile(r"[0-9]{1,5}")
_PROTOCOLS = ("tcp", "udp", "sctp")  # what netavark and podman's --expose/--publish take
# libpod ContainerConfig keys podman commit copies as they are, and the Docker image-config key each becomes.
_LIST_KEYS = {"entrypoint": "Entrypoint", "command": "Cmd"}


class PodmanStorage:
    """podman's containers-storage under root (default /var/lib/containers/storage); never written to."""

    engine = "podman"

    def __init__(self, root: Path) -> None:
        self.root = root
        self._containers_json = root / "overlay-containers" / "containers.json"
        self._layers_root = root / "overlay"

    def list_containers(self) -> list[str]:
        return sorted(self._read_containers())

    def read_container(self, container_id: str) -> Container:
        check_id_text(container_id)
        record = self._read_container_record(container_id)
        layer_id = _id_field(record, "layer", self._containers_json, f"container {container_id}")
        layers = self._read_layer_chain(container_id, layer_id)
        names = record.get("names")
        name = names[0] if isinstance(names, list) and names and isinstance(names[0], str) else ""
        # The libpod database holds what podman commit reads (libpod/container_commit.go): containers-storage itself
        # only records ids, names and layers. userdata/config.json is not used: podman writes it only once the
        # container is initialised, so a created container has none, and it lacks the entrypoint/command split.
        settings = self._read_libpod(container_id)
        if settings is None:
            log.warning(
                "container %s (%s): not in podman's database (a buildah or other containers-storage container?);"
                " the image gets the base image's settings only",
                name or container_id[:12],
                container_id[:12],
            )
            config: dict[str, Any] = {}
            state: dict[str, Any] = {}
        else:
            config, state = settings
        with fields_of(f"{self._containers_json}: container {container_id}", "the store is corrupt"):
            created = optional(record, "created", "created", date, "")
            stored_image = optional(record, "image", "image", string, "")
        with fields_of(f"{self._libpod_path()}: container {container_id}", "the database is corrupt"):
            running = optional(state, "state", "state.state", whole_number, 0) == _STATE_RUNNING
            process = optional(state, "pid", "state.pid", pid, 0)
            image = optional(config, "rootfsImageName", "config.rootfsImageName", string, "")
        return Container(
            container_id=container_id,
            name=name,
            created=created,
            running=running,
            pid=process,
            image=image or _image_name(record) or stored_image,
            lower_layers=tuple(layers[:-1]),
            upper_layer=layers[-1],
            config=_build_image_settings(config, f"container {container_id} in {self._libpod_path()}"),
        )

    def read_base_config(self, container: Container) -> dict[str, Any] | None:
        record = self._read_container_record(container.container_id)
        if record.get("image") in (None, ""):
            return None  # made from a root file system directory, not from an image
        what = f"container {container.container_id}"
        image_id = _id_field(record, "image", self._containers_json, what)
        images_json = self.root / "overlay-images" / "images.json"
        images = {image["id"]: image for image in _read_records(images_json, "images")}
        if image_id not in images:
            raise StorageError(
                f"{images_json}: image {image_id} of {what} is not listed; the store is inconsistent (podman image ls)"
            )
        key = self._config_key(image_id)
        data = self._read_big_data(image_id, key)
        if "sha256:" + hashlib.sha256(data).hexdigest() != key:
            raise StorageError(
                f"{self._big_data_path(image_id, key)}: config of image {image_id} does not match its digest {key};"
                " the store is corrupt (podman pull the image again)"
            )
        path = self._big_data_path(image_id, key)
        doc = _parse_object(data, path, f"config of image {image_id}")
        with fields_of(path, "the store is corrupt (podman pull the image again)"):
            check_image_config(doc)
        return doc

    # --- containers-storage -----------------------------------------------------------------------------------

    def _read_containers(self) -> dict[str, dict[str, Any]]:
        if not self._containers_json.parent.is_dir():
            raise StorageError(
                f"{self.root}: no overlay-containers/ directory; not a containers-storage root with the overlay driver"
                " (check --storage-root, podman's default is /var/lib/containers/storage)"
            )
        return {record["id"]: record for record in _read_records(self._containers_json, "containers")}

    def _read_container_record(self, container_id: str) -> dict[str, Any]:
        record = self._read_containers().get(container_id)
        if record is None:
            raise ContainerNotFound(
                f"{self._containers_json}: no container {container_id}; list them with podman ps --all --external"
            )
        return record

    def _read_layer_chain(self, container_id: str, layer_id: str) -> list[Layer]:
        """The container's layers, oldest first: its image's layers by parent links, then its own."""
        layers_dir = self.root / "overlay-layers"
        # layers.go keeps layers created volatile (podman run --rm) in volatile-layers.json next to layers.json.
        records: dict[str, dict[str, Any]] = {}
        for path in (layers_dir / "layers.json", layers_dir / "volatile-layers.json"):
            records.update({record["id"]: record for record in _read_records(path, "layers")})
        chain: list[Layer] = []
        current = layer_id
        while current:
            if any(layer.layer_id == current for layer in chain):
                raise StorageError(
                    f"{layers_dir}/layers.json: layer {current} is its own ancestor; the layer store is corrupt"
                )
            record = records.get(current)
            if record is None:
                raise StorageError(
                    f"{layers_dir}/layers.json: layer {current} of container {container_id} is not listed;"
                    " the store is inconsistent"
                )
            flags = record.get("flags")
            # layers.go flags a layer "incomplete" until its content is fully written (an interrupted pull).
            if isinstance(flags, dict) and flags.get("incomplete"):
                raise StorageError(
                    f"{layers_dir}/layers.json: layer {current} of container {container_id} is incomplete"
                    " (an interrupted pull or commit); remove and pull its image again"
                )
            chain.append(self._layer(current, record, container_id, layers_dir))
            has_parent = record.get("parent") not in (None, "")
            current = _id_field(record, "parent", layers_dir / "layers.json", f"layer {current}") if has_parent else ""
        chain.reverse()
        return chain

    def _layer(self, layer_id: str, record: dict[str, Any], container_id: str, layers_dir: Path) -> Layer:
        # layers.go stores the tar a layer was applied from as <id>.tar-split.gz, next to its diff-digest.
        tar_split = layers_dir / f"{layer_id}.tar-split.gz"
        digest = record.get("diff-digest")
        # The diff digest also keys the layer in the cache, with or without tar-split records.
        recorded = isinstance(digest, str) and _DIGEST.fullmatch(digest) is not None
        return Layer(
            layer_id,
            checked_layer_dir(self._layers_root, layer_id, container_id),
            tar_split=tar_split if tar_split.is_file() and recorded else None,
            diff_id=str(digest) if recorded else "",
            # Rootless podman (graphroot owned by the user) mounts with "userxattr": user.overlay.* markers.
            overlay_xattrs=overlay_xattrs_of(self.root),
        )

    def _config_key(self, image_id: str) -> str:
        """The big-data key of an image's config: its digest, as the image's manifest names it."""
        if self._big_data_path(image_id, "manifest").exists():
            manifest_data = self._read_big_data(image_id, "manifest")
            manifest = _parse_object(manifest_data, self._big_data_path(image_id, "manifest"), "image manifest")
            descriptor = manifest.get("config")
            digest = descriptor.get("digest") if isinstance(descriptor, dict) else None
            if isinstance(digest, str) and _DIGEST.fullmatch(digest):
                return digest
        # Images without a manifest or config descriptor: containers/image gives them the config digest as id.
        return f"sha256:{image_id}"

    def _big_data_path(self, image_id: str, key: str) -> Path:
        name = key if _PLAIN_BIG_DATA_NAME.fullmatch(key) else "=" + base64.b64encode(key.encode()).decode()
        return self.root / "overlay-images" / image_id / name

    def _read_big_data(self, image_id: str, key: str) -> bytes:
        return read_storage_file(self._big_data_path(image_id, key), f"{key!r} of image {image_id}")

    # --- libpod's database ------------------------------------------------------------------------------------

    def _libpod_path(self) -> Path:
        # Podman 5 picks BoltDB while a bolt_state.db exists and SQLite (<graphroot>/db.sql) otherwise.
        bolt = self.root / "libpod" / "bolt_state.db"
        return bolt if bolt.exists() else self.root / "db.sql"

    def _read_libpod(self, container_id: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """The container's libpod config and state documents, or None when the database does not know it."""
        path = self._libpod_path()
        if not path.exists():
            return None
        if path.name == "db.sql":
            found = _read_sqlite_container(path, container_id)
        else:
            db = BoltFile(_read_file(path, "podman's database"), path)
            config = db.get(b"ctr", container_id.encode(), b"config")
            found = None if config is None else (config, db.get(b"ctr", container_id.encode(), b"state") or b"{}")
        if found is None:
            return None
        what = f"container {container_id}"
        return (
            _parse_object(found[0], path, f"config of {what}"),
            _parse_object(found[1], path, f"state of {what}"),
        )


def _build_image_settings(config: dict[str, Any], where: str) -> dict[str, Any]:
    """Docker image-config keys from a libpod ContainerConfig, as podman commit sets them (container_commit.go)."""
    settings: dict[str, Any] = {}
    if not config:
        return settings
    # podman create stores the image's entrypoint and command in the container unless overridden, so a missing one
    # means none: podman commit then clears the base image's, and so does None here.
    for key, image_key in _LIST_KEYS.items():
        settings[image_key] = _string_list(config.get(key), key, where) or None
    spec = config.get("spec")
    process = spec.get("process") if isinstance(spec, dict) else None
    if isinstance(process, dict):
        if process.get("env") is not None:
            settings["Env"] = _string_list(process["env"], "spec.process.env", where)
        if isinstance(process.get("cwd"), str) and process["cwd"]:
            settings["WorkingDir"] = process["cwd"]
    if isinstance(config.get("user"), str) and config["user"]:
        settings["User"] = config["user"]
    labels = config.get("labels")
    if labels:
        if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
            raise StorageError(f"{where}: 'labels' must map strings to strings; the database is corrupt")
        with fields_of(where, "the database is corrupt"):
            settings["Labels"] = string_map(labels, "labels")
    ports = _exposed_ports(config, where)
    if ports:
        settings["ExposedPorts"] = ports
    return settings


def _exposed_ports(config: dict[str, Any], where: str) -> dict[str, dict[str, Any]]:
    """Exposed ("port": [protocols]) and published ports ({container_port, protocol}) as "port/proto" keys."""
    ports: dict[str, dict[str, Any]] = {}
    exposed = config.get("exposedPorts") or {}
    published = config.get("newPortMappings") or []
    if not isinstance(exposed, dict) or not isinstance(published, list):
        raise StorageError(f"{where}: 'exposedPorts' or 'newPortMappings' is malformed; the database is corrupt")
    for port, protocols in exposed.items():
        if not _PORT.fullmatch(port) or not 0 < int(port) <= 65535:
            raise StorageError(f"{where}: exposed port {port[:20]!r} is not a port number; the database is corrupt")
        for protocol in _string_list(protocols, "exposedPorts", where):
            ports[f"{int(port)}/{_protocol(protocol, where)}"] = {}
    for mapping in published:
        port = mapping.get("container_port") if isinstance(mapping, dict) else None
        # type(): JSON true is no port.
        if type(port) is not int or not 0 < port <= 65535 or not isinstance(mapping.get("protocol") or "", str):
            raise StorageError(f"{where}: a 'newPortMappings' entry is malformed; the database is corrupt")
        # netavark's PortMapping may name several protocols, comma-separated.
        for protocol in (mapping.get("protocol") or "tcp").split(","):
            ports[f"{port}/{_protocol(protocol, where)}"] = {}
    return ports


def _protocol(text: str, where: str) -> str:
    if text not in _PROTOCOLS:
        raise StorageError(f"{where}: port protocol {text[:20]!r} is not tcp, udp or sctp; the database is corrupt")
    return text


def _string_list(value: Any, key: str, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise StorageError(f"{where}: {key!r} must be a list of strings; the database is corrupt")
    return value


def _image_name(record: dict[str, Any]) -> str:
    # containers.json keeps podman's own metadata as a JSON string ({"image-name": ..., "name": ...}).
    try:
        metadata = loads(record.get("metadata") or "{}")
    except (TypeError, ValueError):
        return ""
    name = metadata.get("image-name") if isinstance(metadata, dict) else None
    return name if isinstance(name, str) else ""


def _id_field(record: dict[str, Any], key: str, path: Path, what: str) -> str:
    value = record.get(key)
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise StorageError(f"{path}: {what} has {key} {value!r}, not a 64-hex id; the store is corrupt")
    return value


def _read_file(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise StorageError(f"{path}: cannot read {what} ({e.strerror}); check --storage-root") from e


def _read_records(path: Path, what: str) -> list[dict[str, Any]]:
    """A containers-storage list file: a JSON array of objects with 64-hex ids; a missing file lists nothing."""
    if not path.exists():
        return []
    try:
        doc = loads(_read_file(path, what))
    except ValueError as e:
        raise StorageError(f"{path}: {what} list is malformed JSON ({e}); the store is corrupt") from e
    if not isinstance(doc, list) or not all(isinstance(r, dict) for r in doc):
        raise StorageError(f"{path}: {what} list must be a JSON array of objects; the store is corrupt")
    for record in doc:
        _id_field(record, "id", path, f"an entry of the {what} list")
    return doc


def _read_sqlite_container(path: Path, container_id: str) -> tuple[bytes, bytes] | None:
    """Config and state JSON of one container from libpod's SQLite database (libpod/sqlite_state_internal.go)."""
    # Even a read-only connection writes the -shm index of a WAL database, so the query runs on a private copy.
    with tempfile.TemporaryDirectory(prefix="pipeline-libpod-") as tmp:
        copy = Path(tmp) / path.name
        try:
            shutil.copyfile(path, copy)
            if (wal := path.with_name(path.name + "-wal")).exists():
                shutil.copyfile(wal, copy.with_name(copy.name + "-wal"))
            connection = sqlite3.connect(copy)
        except (OSError, sqlite3.Error) as e:
            raise StorageError(f"{path}: cannot read podman's database ({e}); check --storage-root") from e
        try:
            row = connection.execute(
                "SELECT ContainerConfig.JSON, ContainerState.JSON FROM ContainerConfig"
                " LEFT JOIN ContainerState ON ContainerState.ID = ContainerConfig.ID WHERE ContainerConfig.ID = ?",
                (container_id,),
            ).fetchone()
        except sqlite3.Error as e:
            raise StorageError(f"{path}: podman's database cannot be queried ({e}); it is corrupt or too new") from e
        finally:
            connection.close()
    if row is None:
        return None
    return str(row[0]).encode(), str(row[1] or "{}").encode()


def _parse_object(data: bytes, path: Path, what: str) -> dict[str, Any]:
    return parse_json_object(data, path, what, "the store is corrupt")

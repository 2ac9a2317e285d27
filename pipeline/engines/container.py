"""What every engine reader answers about a container: its layers, oldest first, and its configuration."""

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pipeline.errors import ContainerNotFound, StorageError
from pipeline.jsoncheck import boolean, check_config_value, date, fields_of, loads, optional, pid, string

# Engines name containers by hex ids (64 chars) and users type prefixes; names add [A-Za-z0-9_.-] (docker's rule).
_ID_OR_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,254}")


@dataclass(frozen=True)
class Layer:
    """One overlay layer: its id in the engine's storage and its layer_dir (a diff/ directory).

    diff_id is the digest the engine recorded for the layer ("" where it records none, as rocker): it identifies
    the layer's content in the cache. Engines that kept the layer's original tar as tar-split records name them,
    so the layer can be reassembled byte for byte (to that diff_id) instead of re-packed. overlay_xattrs is the
    namespace of its overlay markers: "trusted" (trusted.overlay.*), or "user" (user.overlay.*) for storage an
    engine mounts with "userxattr" (overlay_xattrs_of); the other namespace holds no markers (whiteout.py).
    """

    layer_id: str
    layer_dir: Path
    tar_split: Path | None = None
    diff_id: str = ""
    overlay_xattrs: str = "trusted"


@dataclass(frozen=True)
class Container:
    """A container as stored: lower (image) layers oldest first, then its own writable layer."""

    container_id: str
    name: str
    created: str
    running: bool
    pid: int
    image: str
    lower_layers: tuple[Layer, ...]
    upper_layer: Layer
    # The container's own settings in Docker image-config keys (Cmd, Env, ...), applied over the base image's.
    config: dict[str, Any] = field(default_factory=dict)
    # The container's whole Docker Config (DOCKER_CONFIG_FIELDS; null values kept), where the engine records it
    # with the image's defaults already merged in at create time (moby daemon/create.go): docker commit writes
    # exactly that, so it replaces the base image's config instead of being merged over it. None where the engine
    # records only some settings (rocker, podman): then `config` is merged over the base image's config.
    full_config: dict[str, Any] | None = None

    @property
    def short_id(self) -> str:
        return self.container_id[:12]


class Storage(Protocol):
    """One engine's on-disk storage, read-only."""

    engine: str
    root: Path

    def list_containers(self) -> list[str]:
        """All container ids, sorted."""
        ...

    def read_container(self, container_id: str) -> Container:
        """The container with exactly this id."""
        ...

    def read_base_config(self, container: Container) -> dict[str, Any] | None:
        """The base image's Docker config JSON, or None when the storage does not record it."""
        ...


class MobyLayout:
    """The directories docker's overlay2 storage and rocker's (its ancestor) share: containers/<id>/ holds each
    container's metadata, overlay2/<layer>/ each layer; subclasses say which ids name a container."""

    container_id_pattern: re.Pattern[str]

    def __init__(self, root: Path) -> None:
        self.root = root
        self._containers = root / "containers"
        self._layers_root = root / "overlay2"

    def list_containers(self) -> list[str]:
        return list_container_dirs(self._containers, self.container_id_pattern)


def read_json_object(path: Path, what: str, remedy: str = "fix or remove it") -> dict[str, Any]:
    """The JSON object in the storage file at path (what names it in errors), read as Go reads JSON."""
    return parse_json_object(read_storage_file(path, what), path, what, remedy)


def read_storage_file(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise StorageError(f"{path}: missing; {what} is not in this storage (check --storage-root)") from None
    except OSError as e:
        raise StorageError(f"{path}: cannot read {what} ({e.strerror})") from e


def parse_json_object(data: bytes, path: Path, what: str, remedy: str = "fix or remove it") -> dict[str, Any]:
    """data (from path) as a JSON object; anything else is one StorageError naming the file and saying remedy."""
    try:
        doc = loads(data)
    except ValueError as e:
        raise StorageError(f"{path}: {what} has malformed JSON ({e}); {remedy}") from e
    if not isinstance(doc, dict):
        raise StorageError(f"{path}: {what} must be a JSON object; {remedy}")
    return doc


def check_id_text(text: str) -> None:
    """Refuse ids that could address anything but a container (paths, traversal, NUL, empty)."""
    if not _ID_OR_NAME.fullmatch(text) or ".." in text:
        raise ContainerNotFound(
            f"invalid container id {text!r}: give a container id, a unique prefix of one, or a container name"
            " (letters, digits, '_', '.', '-')"
        )


def resolve_container(storage: Storage, text: str) -> str:
    """The full id of the container text names, in docker's and podman's order: an exact full id, then an exact
    name, then a unique id prefix (so a name that is also a prefix of another container's id names its own)."""
    check_id_text(text)
    ids = storage.list_containers()
    if text in ids:
        return text
    unreadable: list[StorageError] = []
    matches = [i for i in ids if _name_of(storage, i, unreadable) == text]
    if not matches:
        matches = [i for i in ids if i.startswith(text)]
    if len(matches) == 1:
        return matches[0]
    if not matches and unreadable:
        # The container meant may be the one whose metadata is damaged: that error says what to fix.
        raise unreadable[0]
    if not matches:
        known = ", ".join(i[:12] for i in ids[:10]) or "none"
        raise ContainerNotFound(
            f"no container matches {text!r} in {storage.root} ({storage.engine}); known containers: {known}"
        )
    names = ", ".join(i[:16] for i in matches[:10])
    raise ContainerNotFound(f"container id {text!r} is ambiguous: it matches {names}; type more of the id")


def _name_of(storage: Storage, container_id: str, unreadable: list[StorageError]) -> str | None:
    # Another container's damaged metadata must not stop this one being found by its name or id.
    try:
        return storage.read_container(container_id).name.lstrip("/")
    except StorageError as e:
        unreadable.append(e)
        return None


# Container config keys that mean the same in a Docker image config, with the JSON type each must have; docker
# commit copies them from the container's config, which already holds the image's defaults merged at create time.
IMAGE_CONFIG_TYPES: dict[str, type] = {
    "Cmd": list,
    "Entrypoint": list,
    "Env": list,
    "WorkingDir": str,
    "User": str,
    "Labels": dict,
    "ExposedPorts": dict,
    "Volumes": dict,
    "StopSignal": str,
    "Healthcheck": dict,
    "OnBuild": list,
    "Shell": list,
}


def pick_image_config(config: dict[str, Any], where: Path) -> dict[str, Any]:
    """The image-config keys of a container's config, each checked for its JSON type."""
    picked = {}
    for key, kind in IMAGE_CONFIG_TYPES.items():
        value = config.get(key)
        if value is not None:
            if not isinstance(value, kind):
                raise StorageError(f"{where}: Config.{key} must be a JSON {kind.__name__}; fix or recreate it")
            with fields_of(where, "fix or recreate it"):
                check_config_value(key, value, f"Config.{key}")  # items too: Env of strings, ports as keys
            picked[key] = value
    return picked


@dataclass(frozen=True)
class ConfigField:
    """One field of moby's api/types/container.Config: its JSON type, and how encoding/json writes it empty."""

    kind: type
    # `json:",omitempty"`: left out when false, "", null or empty (a pointer field only when null).
    omitempty: bool = False
    pointer: bool = False

    def zero(self) -> Any:
        """What Go writes for the field when it was never set: "" and false, null for slices, maps, pointers."""
        return self.kind() if self.kind in (str, bool) else None

    def omitted(self, value: Any) -> bool:
        if self.pointer:
            return value is None
        return self.omitempty and (value is None or value is False or value == "" or value == [] or value == {})


# moby's api/types/container.Config (v20.10), in its order: docker commit writes the container's Config, every one
# of these fields, as the image's "config" (daemon/commit.go CreateImageFromContainer hands container.Config to
# image/image.go NewChildImage), so Hostname, Tty, Image and the rest come from the container, not the base image.
DOCKER_CONFIG_FIELDS: dict[str, ConfigField] = {
    "Hostname": ConfigField(str),
    "Domainname": ConfigField(str),
    "User": ConfigField(str),
    "AttachStdin": ConfigField(bool),
    "AttachStdout": ConfigField(bool),
    "AttachStderr": ConfigField(bool),
    "ExposedPorts": ConfigField(dict, omitempty=True),
    "Tty": ConfigField(bool),
    "OpenStdin": ConfigField(bool),
    "StdinOnce": ConfigField(bool),
    "Env": ConfigField(list),
    "Cmd": ConfigField(list),
    "Healthcheck": ConfigField(dict, pointer=True),
    "ArgsEscaped": ConfigField(bool, omitempty=True),
    "Image": ConfigField(str),
    "Volumes": ConfigField(dict),
    "WorkingDir": ConfigField(str),
    "Entrypoint": ConfigField(list),
    "NetworkDisabled": ConfigField(bool, omitempty=True),
    "MacAddress": ConfigField(str, omitempty=True),
    "OnBuild": ConfigField(list),
    "Labels": ConfigField(dict),
    "StopSignal": ConfigField(str, omitempty=True),
    "StopTimeout": ConfigField(int, pointer=True),
    "Shell": ConfigField(list, omitempty=True),
}


def pick_docker_config(config: dict[str, Any], where: Path) -> dict[str, Any]:
    """The DOCKER_CONFIG_FIELDS of a docker container's Config as recorded, null values kept (null is "none" there:
    the image's defaults were merged in when the container was created), each checked for its JSON type."""
    picked = {}
    for key, spec in DOCKER_CONFIG_FIELDS.items():
        if key not in config:
            continue
        value = config[key]
        # bool is an int in Python; a JSON true is no StopTimeout.
        if value is not None and (not isinstance(value, spec.kind) or (spec.kind is int and isinstance(value, bool))):
            raise StorageError(f"{where}: Config.{key} must be a JSON {spec.kind.__name__}; fix or recreate it")
        with fields_of(where, "fix or recreate it"):
            check_config_value(key, value, f"Config.{key}")  # items too: Env of strings, ports as keys, int64
        picked[key] = value
    return picked


def checked_layer_dir(layers_root: Path, layer_id: str, container_id: str, *, listed_in: Path | None = None) -> Path:
    """<layers_root>/<layer_id>/diff, refused unless it is a directory whose real path stays inside layers_root."""
    layer_dir = layers_root / layer_id / "diff"
    source = f" (listed in {listed_in})" if listed_in else ""
    real = Path(os.path.realpath(layer_dir))
    if not real.is_relative_to(os.path.realpath(layers_root)):
        raise StorageError(
            f"{layer_dir}: layer of container {container_id}{source} resolves to {real}, outside the storage root;"
            " refusing to read it"
        )
    if not real.is_dir():
        raise StorageError(
            f"{layer_dir}: layer {layer_id} of container {container_id}{source} has no diff/ directory;"
            " the storage is incomplete or uses another storage driver than overlay"
        )
    return layer_dir


def overlay_xattrs_of(storage_root: Path) -> str:
    """The xattr namespace of the overlay markers in an engine's storage: "user" when the storage root belongs to an
    unprivileged user, else "trusted".

    An engine running rootless mounts overlayfs in a user namespace with "userxattr", so the kernel writes and reads
    its markers as user.overlay.* (Documentation/filesystems/overlayfs.rst, "userxattr"): containers/storage's
    overlay driver adds "userxattr" when unshare.IsRootless() (drivers/overlay/overlay.go) and unpacks layers with
    user.overlay.* markers then (pkg/archive GetOverlayXattrName); moby's overlay2 likewise when running in a user
    namespace (daemon/graphdriver/overlayutils GetOverlayXattr). Such an engine creates its storage root as, and for,
    the unprivileged user (~/.local/share/containers/storage, ~/.local/share/docker); one running as root creates
    it as root. The root's owner is asked, not a layer_dir's: a container may chown its own upper dir (its "/").
    fuse-overlayfs (a storage.conf mount_program) has markers of its own and .wh.* files, refused when packed.
    """
    try:
        owner = storage_root.stat().st_uid
    except OSError as e:
        raise StorageError(f"{storage_root}: cannot read the storage root ({e.strerror}); check --storage-root") from e
    return "trusted" if owner == 0 else "user"


def list_container_dirs(containers_dir: Path, pattern: re.Pattern[str]) -> list[str]:
    """The sorted names of the directories in containers_dir that match pattern (engines keep one per container)."""
    try:
        names = os.listdir(containers_dir)
    except OSError as e:
        raise StorageError(f"{containers_dir}: cannot list containers ({e.strerror}); check --storage-root") from e
    return sorted(n for n in names if pattern.fullmatch(n) and (containers_dir / n).is_dir())


@dataclass(frozen=True)
class MobyState:
    """What moby's container struct (docker's config.v2.json, and rocker's config.json, which copies it) says of a
    container besides its layers: container/container.go and container/state.go."""

    name: str
    created: str
    running: bool  # running and not paused: a paused container is frozen already, and is never frozen again
    pid: int
    image: str  # Config.Image: what the container was created from


def read_moby_state(doc: dict[str, Any], state: dict[str, Any], config: dict[str, Any], path: Path) -> MobyState:
    """The fields of MobyState, each type-checked; a wrong one is a StorageError naming path and field."""
    with fields_of(path, "the container's metadata is corrupt; fix or recreate it"):
        # Running and Paused are both true for a paused container (docker's state.go; `rocker stop` sets Paused
        # and leaves Running, container/utils.go StopContainer): either way the pid is not one to freeze.
        running = optional(state, "Running", "State.Running", boolean, False)
        paused = optional(state, "Paused", "State.Paused", boolean, False)
        return MobyState(
            name=optional(doc, "Name", "Name", string, ""),
            created=optional(doc, "Created", "Created", date, ""),
            running=running and not paused,
            pid=optional(state, "Pid", "State.Pid", pid, 0),
            image=optional(config, "Image", "Config.Image", string, ""),
        )

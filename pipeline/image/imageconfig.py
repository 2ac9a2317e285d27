"""Builds the image config JSON (Docker image spec v1.2, compatible with the OCI image config).

Spec: https://github.com/opencontainers/image-spec/blob/main/config.md and moby's image/spec/spec.md.
"""

import hashlib
import json
import platform
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pipeline.engines.container import DOCKER_CONFIG_FIELDS, Container
from pipeline.image.dockerfile import apply_changes

# moby layer/empty.go DigestSHA256EmptyTar: the diff_id of a tar with no entries (1024 zero bytes), which is what a
# container layer with no changes packs to. docker commit keeps no such layer: its history entry says empty_layer.
EMPTY_LAYER_DIFF_ID = "sha256:5f70bf18a086007016e948b04aed3b82103a36bea41755b6cddfaf10ace3c6ef"

# Go's GOARCH names, which image configs use, for what the kernel reports.
_GOARCH = {
    "x86_64": "amd64",
    "amd64": "amd64",
    "aarch64": "arm64",
    "arm64": "arm64",
    "armv7l": "arm",
    "armv6l": "arm",
    "i686": "386",
    "i386": "386",
    "ppc64le": "ppc64le",
    "s390x": "s390x",
    "riscv64": "riscv64",
}


def encode_json(doc: Any) -> bytes:
    """Canonical JSON bytes (sorted keys, no spaces, UTF-8) so equal documents hash equal."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def host_architecture() -> str:
    machine = platform.machine().lower()
    return _GOARCH.get(machine, machine)


def format_created(epoch: int) -> str:
    """RFC 3339 in UTC, as image configs carry it."""
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class CommitOptions:
    """docker commit's metadata options: --author, --message, --change (in order), --config, --squash."""

    author: str = ""
    message: str = ""
    changes: tuple[str, ...] = ()
    extra_config: dict[str, Any] = field(default_factory=dict)  # image-config "config" keys from --config FILE
    squash: bool = False
    # The history of the image this one extends by one layer (an incremental snapshot's previous snapshot), in
    # place of the base image's; None for a commit on the base image.
    previous_history: tuple[dict[str, Any], ...] | None = None


def build_image_config(
    container: Container,
    base: dict[str, Any] | None,
    diff_ids: list[str],
    *,
    created: int,
    options: CommitOptions | None = None,
) -> dict[str, Any]:
    """The config of the committed image: the base image's settings, the container's own, then --config and
    --change, in that order (later wins), as docker commit applies them.

    diff_ids are those of the layers the image keeps, oldest first: the lower layers', then the container's. A
    caller that leaves out a container layer with no changes (its tar is EMPTY_LAYER_DIFF_ID) gets docker's
    empty-layer history entry for it.

    What moby v20.10 writes (daemon/commit.go CreateImageFromContainer, daemon/images/image_commit.go CommitImage,
    image/image.go NewChildImage) and where this differs on purpose:
    - "config": the container's Config with --change applied; see _container_config. Our canonical JSON sorts keys.
    - "created", and the new history entry's: whole seconds (SOURCE_DATE_EPOCH gives byte-identical configs);
      docker writes the commit time with nanoseconds.
    - "container_config" (the container's Config before --change) and "docker_version" are not written. Neither is
      in Docker's image spec v1.2 nor the OCI config; docker load, run and history never read them; image inspect
      deprecated ContainerConfig in Docker 25 and drops it from API 1.45 (Docker 26) on, and the containerd image
      store (daemon/containerd/image_commit.go) writes neither. A docker_version would name an engine that did not
      make the image. Older engines' image inspect shows them empty (DockerVersion "", ContainerConfig zeroed).
    - "container", "author", "architecture" (the base's, else the host's), "variant", "os.version" and
      "os.features" (the base's): as docker.
    """
    options = options or CommitOptions()
    base = base or {}
    container_config = _container_config(container, base)
    config = merge_config(container_config, options.extra_config)
    config = apply_changes(config, list(options.changes))
    if container.full_config is not None:
        config = _docker_json_shape(config)
    created_text = format_created(created)
    if options.previous_history is None:
        history = _build_history(container, base, created_text)
    else:
        history = [dict(h) for h in options.previous_history]
    empty_layer = not options.squash and len(diff_ids) == sum(1 for h in history if not h.get("empty_layer"))
    history.append(_commit_history_entry(container, container_config, created_text, empty_layer=empty_layer))
    if options.squash:
        by = history[-1].get("created_by")
        history = [{"created": created_text, "created_by": f"{by}, squashed" if by else "squashed"}]
    if options.author:
        history[-1]["author"] = options.author
    if options.message:
        history[-1]["comment"] = options.message
    image: dict[str, Any] = {
        "architecture": base.get("architecture") or host_architecture(),
        "os": base.get("os") or "linux",
        "created": created_text,
        "container": container.container_id,
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": list(diff_ids)},
        "history": history,
    }
    # NewChildImage carries the base's platform details over with its architecture.
    for key in ("variant", "os.version", "os.features"):
        if base.get(key):
            image[key] = base[key]
    if options.author:
        image["author"] = options.author
    return image


def _container_config(container: Container, base: dict[str, Any]) -> dict[str, Any]:
    """The config the container runs with, before --config and --change: what docker commit starts from."""
    if container.full_config is not None:
        # docker keeps the container's whole Config, the image's defaults merged in at create time, and commit
        # writes it as it is: a null Entrypoint or Cmd (`--entrypoint ''`) stays null, Hostname, Tty, AttachStdout
        # and the like are the container's, and Image is what it was created from as the operator typed it.
        # daemon/commit.go merge() gives a container without labels an empty map, so Labels is never null.
        return {**container.full_config, "Labels": container.full_config.get("Labels") or {}}
    base_config = base.get("config") if isinstance(base.get("config"), dict) else {}
    config = {**(base_config or {}), **container.config}
    # The base's own Config.Image names the image *it* was built from (a stale id here); docker writes the
    # reference the container was created from. Where the engine records none, the stale one is dropped.
    config.pop("Image", None)
    if container.image:
        config["Image"] = container.image
    return config


def _docker_json_shape(config: dict[str, Any]) -> dict[str, Any]:
    """config as Go's encoding/json writes moby's container.Config: every field, null or zero when unset (an
    ENTRYPOINT change clears Cmd to null), omitempty fields left out when empty; other keys (--config) kept."""
    shaped = {}
    for key, spec in DOCKER_CONFIG_FIELDS.items():
        value = config.get(key)
        if value is None:
            value = spec.zero()
        if not spec.omitted(value):
            shaped[key] = value
    return shaped | {k: v for k, v in config.items() if k not in DOCKER_CONFIG_FIELDS}


def merge_config(config: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """config with extra's keys over it; Env is merged by variable name and maps (Labels, ExposedPorts,
    Volumes) key by key, so a config file adds to what the image has instead of replacing it."""
    merged = {**config, **extra}
    for key, value in extra.items():
        old = config.get(key)
        if key == "Env" and isinstance(old, list) and isinstance(value, list):
            env = {item.partition("=")[0]: item for item in old + value}
            merged[key] = list(env.values())
        elif isinstance(old, dict) and isinstance(value, dict):
            merged[key] = {**old, **value}
    return merged


def _build_history(container: Container, base: dict[str, Any], created: str) -> list[dict[str, Any]]:
    """The lower layers' history entries. The spec pairs every non-empty history entry with one diff_id, in
    order; keep the base's own history only when it pairs exactly with the lower layers, else describe each
    layer ourselves."""
    base_history = base.get("history")
    history: list[dict[str, Any]]
    if (
        isinstance(base_history, list)
        and all(isinstance(h, dict) for h in base_history)
        and (sum(1 for h in base_history if not h.get("empty_layer")) == len(container.lower_layers))
    ):
        history = [dict(h) for h in base_history]
    else:
        history = [
            {"created": created, "created_by": f"layer {layer.layer_id} of image {container.image or '(none)'}"}
            for layer in container.lower_layers
        ]
    return history


def _commit_history_entry(
    container: Container, container_config: dict[str, Any], created: str, *, empty_layer: bool
) -> dict[str, Any]:
    """The history entry of the container's layer. docker's created_by is the container's Cmd (before --change)
    joined by spaces, without its Entrypoint, and left out when the Cmd is empty (image/image.go NewChildImage);
    a layer whose tar is the empty tar is marked empty_layer and adds no diff_id (layer.IsEmpty)."""
    entry: dict[str, Any] = {"created": created}
    cmd = container_config.get("Cmd")
    created_by = " ".join(str(arg) for arg in cmd) if isinstance(cmd, list) else ""
    if not created_by and container.full_config is None:
        # The engine may simply not record the command: name the container instead of saying nothing.
        name = container.name.lstrip("/") or container.short_id
        created_by = f"commit of container {name} ({container.container_id})"
    if created_by:
        entry["created_by"] = created_by
    if empty_layer:
        entry["empty_layer"] = True
    return entry

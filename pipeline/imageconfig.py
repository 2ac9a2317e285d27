"""Builds the image config JSON (Docker image spec v1.2, compatible with the OCI image config).

Spec: https://github.com/opencontainers/image-spec/blob/main/config.md and moby's image/spec/spec.md.
"""

import hashlib
import json
import platform
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pipeline.container import Container
from pipeline.dockerfile import apply_changes

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


def build_image_config(
    container: Container,
    base: dict[str, Any] | None,
    diff_ids: list[str],
    *,
    created: int,
    options: CommitOptions | None = None,
) -> dict[str, Any]:
    """The config of the committed image: the base image's settings, the container's own, then --config and
    --change, in that order (later wins), as docker commit applies them."""
    options = options or CommitOptions()
    base = base or {}
    base_config = base.get("config") if isinstance(base.get("config"), dict) else {}
    config = merge_config({**(base_config or {}), **container.config}, options.extra_config)
    config = apply_changes(config, list(options.changes))
    created_text = format_created(created)
    history = _build_history(container, base, created_text)
    if options.squash:
        history = [{"created": created_text, "created_by": f"{history[-1]['created_by']}, squashed"}]
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
    if options.author:
        image["author"] = options.author
    return image


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
    # The spec pairs every non-empty history entry with one diff_id, in order; keep the base's own history
    # only when it pairs exactly with the lower layers, else describe each layer ourselves.
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
    name = container.name.lstrip("/") or container.short_id
    history.append({"created": created, "created_by": f"commit of container {name} ({container.container_id})"})
    return history

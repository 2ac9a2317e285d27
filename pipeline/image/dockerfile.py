"""Applies `docker commit --change` instructions (Dockerfile syntax) to an image config.

Reference: https://docs.docker.com/reference/dockerfile/ and `docker commit --change`, which accepts CMD,
ENTRYPOINT, ENV, EXPOSE, LABEL, ONBUILD, USER, VOLUME, WORKDIR and STOPSIGNAL.
"""

import json
import posixpath
import re
import shlex
from typing import Any

from pipeline import jsoncheck
from pipeline.errors import InvalidChange

INSTRUCTIONS = ("CMD", "ENTRYPOINT", "ENV", "EXPOSE", "LABEL", "ONBUILD", "USER", "VOLUME", "WORKDIR", "STOPSIGNAL")
_PORT = re.compile(r"(\d{1,5})(?:-(\d{1,5}))?(?:/(tcp|udp|sctp))?")


def apply_changes(config: dict[str, Any], changes: list[str]) -> dict[str, Any]:
    """A copy of the image config's "config" section with the instructions applied in order."""
    result: dict[str, Any] = json.loads(json.dumps(config))  # a deep copy of plain JSON
    for change in changes:
        _apply(result, change.strip())
    return result


def _apply(config: dict[str, Any], change: str) -> None:
    keyword, _, rest = change.partition(" ")
    keyword, rest = keyword.upper(), rest.strip()
    if keyword not in INSTRUCTIONS:
        raise InvalidChange(
            f"--change {change!r}: {keyword or 'empty'} is not allowed; use one of {', '.join(INSTRUCTIONS)}"
        )
    if not rest:
        raise InvalidChange(f"--change {change!r}: {keyword} needs an argument")
    if keyword in ("CMD", "ENTRYPOINT"):
        config["Cmd" if keyword == "CMD" else "Entrypoint"] = _command(rest, change)
        if keyword == "ENTRYPOINT":
            config.pop("Cmd", None)  # as in a Dockerfile, a new ENTRYPOINT drops the inherited CMD
    elif keyword == "ENV":
        env = {item.partition("=")[0]: item for item in config.get("Env") or []}
        for key, value in _pairs(rest, change):
            env[key] = f"{key}={value}"
        config["Env"] = list(env.values())
    elif keyword == "LABEL":
        config["Labels"] = {**(config.get("Labels") or {}), **dict(_pairs(rest, change))}
    elif keyword == "EXPOSE":
        ports = dict(config.get("ExposedPorts") or {})
        for port in rest.split():
            ports.update(dict.fromkeys(_ports(port, change), {}))
        config["ExposedPorts"] = ports
    elif keyword == "VOLUME":
        paths = _json_list(rest, change) if rest.startswith("[") else rest.split()
        config["Volumes"] = {**(config.get("Volumes") or {}), **dict.fromkeys(paths, {})}
    elif keyword == "WORKDIR":
        config["WorkingDir"] = posixpath.normpath(posixpath.join(config.get("WorkingDir") or "/", rest))
    elif keyword == "USER":
        config["User"] = rest
    elif keyword == "STOPSIGNAL":
        config["StopSignal"] = rest
    else:  # ONBUILD
        inner = rest.partition(" ")[0].upper()
        if inner in ("ONBUILD", "FROM", "MAINTAINER"):
            raise InvalidChange(f"--change {change!r}: ONBUILD {inner} is not allowed")
        config["OnBuild"] = [*(config.get("OnBuild") or []), rest]


def _command(text: str, change: str) -> list[str]:
    # Exec form is a JSON array; anything else is shell form, run by /bin/sh -c as Docker does.
    return _json_list(text, change) if text.startswith("[") else ["/bin/sh", "-c", text]


def _json_list(text: str, change: str) -> list[str]:
    try:
        value = jsoncheck.loads(text)  # also refuses nesting deeper than Python's stack
    except ValueError:
        value = None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidChange(f"--change {change!r}: {text} is not a JSON array of strings")
    return value


def _pairs(text: str, change: str) -> list[tuple[str, str]]:
    """key=value pairs with shell quoting, or the legacy single `key value` form."""
    try:
        words = shlex.split(text)
    except ValueError as e:
        raise InvalidChange(f"--change {change!r}: {e}") from e
    if words and "=" not in words[0]:
        if len(words) < 2:
            raise InvalidChange(f"--change {change!r}: expected key=value or 'key value'")
        return [(words[0], text.split(None, 1)[1].strip())]
    pairs = []
    for word in words:
        key, sep, value = word.partition("=")
        if not sep or not key:
            raise InvalidChange(f"--change {change!r}: {word!r} is not key=value")
        pairs.append((key, value))
    return pairs


def _ports(text: str, change: str) -> list[str]:
    match = _PORT.fullmatch(text)
    if not match or not 0 < int(match[1]) <= 65535:
        raise InvalidChange(f"--change {change!r}: {text!r} is not a port, a port range or port/protocol")
    first, last, protocol = int(match[1]), int(match[2] or match[1]), match[3] or "tcp"
    if last < first or last > 65535:
        raise InvalidChange(f"--change {change!r}: {text!r} is not a valid port range")
    return [f"{port}/{protocol}" for port in range(first, last + 1)]

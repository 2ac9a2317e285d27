"""JSON the pipeline did not write itself (the engines' storage, --config FILE, cache and catalog records): parsed as
Go's encoding/json reads it, and image-config fields checked for the types every consumer of an image requires.

Every engine writes its files with Go's encoding/json, and docker load, podman load, skopeo, umoci and containerd
read image configs with it. Go refuses NaN and Infinity and numbers beyond float64, and reads a lone UTF-16
surrogate escape as U+FFFD; Python's json module accepts all three, and a lone surrogate then has no UTF-8 encoding,
so an image config holding one cannot even be written. Parsing as Go does keeps such values out; the field checks
keep out values of the wrong type (an Env item that is a number, a Label that is an object, an ExposedPorts key that
is no port), which Go consumers refuse when they load the image.

Specs: RFC 8259 (JSON); https://github.com/opencontainers/image-spec/blob/main/config.md (and schema/
config-schema.json); moby's api/types/container.Config and image/spec/spec.md (Docker image spec v1.2).
"""

import json
import math
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from typing import Any, TypeVar

from pipeline.errors import PipelineError, StorageError

# No engine nests its metadata deeper than about ten levels (a libpod config's OCI spec is the deepest); anything
# far deeper is damage, and would exhaust Python's recursion limit in every later json.dumps.
MAX_DEPTH = 64
_FLOAT64_MAX = float.fromhex("0x1.fffffffffffffp+1023")
_SURROGATE = re.compile("[\ud800-\udfff]")
INT64 = (-(2**63), 2**63 - 1)
# Linux's PID_MAX_LIMIT (include/linux/threads.h): no process id is larger.
PID_MAX = 4_194_304
# dockerfile.py's EXPOSE grammar: a port or a range, optionally with its protocol (tcp is the default).
_PORT = re.compile(r"([0-9]{1,5})(?:-([0-9]{1,5}))?(?:/(tcp|udp|sctp))?")
# Go's time.RFC3339(Nano) layout, which time.Time's UnmarshalJSON requires.
_RFC3339 = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})(\.[0-9]+)?(Z|[+-]([0-9]{2}):([0-9]{2}))"
)

T = TypeVar("T")


def loads(data: bytes | str) -> Any:
    """The JSON document in data, as Go's encoding/json reads it; ValueError says why it is not one.

    Refused: malformed JSON and text that is not UTF-8 (or UTF-16/32), NaN and Infinity, numbers beyond float64,
    nesting deeper than MAX_DEPTH (also where Python's parser would exhaust the stack). Lone surrogate escapes in
    strings and keys become U+FFFD, as Go reads them.
    """
    try:
        doc = json.loads(data, parse_constant=_refuse_constant, parse_float=_float64, parse_int=_within_float64)
    except RecursionError:
        raise ValueError(f"nested deeper than {MAX_DEPTH} levels") from None
    return _checked_tree(doc)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _float64(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"the number {_short(text)} is beyond the range of a float64")
    return value


def _within_float64(text: str) -> int:
    # Checked on the digits first: Python refuses to convert more than 4300 of them anyway.
    value = int(text) if len(text) <= 310 else None
    if value is None or abs(value) > _FLOAT64_MAX:
        raise ValueError(f"the number {_short(text)} is beyond the range of a float64")
    return value


def _checked_tree(doc: Any) -> Any:
    """doc with lone surrogates replaced (in place), refused when deeper than MAX_DEPTH; iterative, as the depth is
    what is being checked."""
    if isinstance(doc, str):
        return _without_surrogates(doc)
    stack: list[tuple[Any, int]] = [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ValueError(f"nested deeper than {MAX_DEPTH} levels")
        if isinstance(node, dict):
            if any(_SURROGATE.search(key) for key in node):
                items = list(node.items())
                node.clear()
                node.update((_without_surrogates(key), value) for key, value in items)
            children: Iterator[tuple[Any, Any]] = iter(node.items())
        elif isinstance(node, list):
            children = enumerate(node)
        else:
            continue
        for index, child in children:
            if isinstance(child, str):
                if _SURROGATE.search(child):
                    node[index] = _without_surrogates(child)
            elif isinstance(child, (dict, list)):
                stack.append((child, depth + 1))
    return doc


def _without_surrogates(text: str) -> str:
    return _SURROGATE.sub("\ufffd", text)


# --- field checks ---------------------------------------------------------------------------------------------


class FieldError(ValueError):
    """A value of the wrong type or form; the message names its field (as `Config.Env[2]`) and what it must be."""

    def __init__(self, field: str, expected: str, value: Any) -> None:
        super().__init__(f"{field} must be {expected}, not {describe(value)}")
        self.field = field


@contextmanager
def fields_of(where: object, advice: str, error: type[PipelineError] = StorageError) -> Iterator[None]:
    """Turn a FieldError raised inside into error(f"{where}: <field> must be ...; {advice}")."""
    try:
        yield
    except FieldError as e:
        raise error(f"{where}: {e}; {advice}") from None


def describe(value: Any) -> str:
    """A short, printable description of a JSON value for an error message."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return f"the number {_short(repr(value))}"
    if isinstance(value, str):
        return f"the string {_short(ascii(value))}"
    return "an array" if isinstance(value, list) else "an object" if isinstance(value, dict) else type(value).__name__


def _short(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def key_field(field: str, key: str) -> str:
    """The field name of one key of a map, e.g. Config.Labels["a.b"]."""
    return f"{field}[{_short(ascii(key))}]"


def optional(doc: Mapping[str, Any], key: str, field: str, check: Callable[[Any, str], T], default: T) -> T:
    """doc[key] checked, or default when it is missing or null."""
    value = doc.get(key)
    return default if value is None else check(value, field)


def string(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise FieldError(field, "a string", value)
    return value


def boolean(value: Any, field: str) -> bool:
    if not isinstance(value, bool):
        raise FieldError(field, "true or false", value)
    return value


def whole_number(value: Any, field: str, low: int = INT64[0], high: int = INT64[1]) -> int:
    # type() rather than isinstance: JSON true is no number; a float (even 3.0) is no Go integer either.
    if type(value) is not int or not low <= value <= high:
        raise FieldError(field, f"a whole number from {low} to {high}", value)
    return value


def pid(value: Any, field: str) -> int:
    """A process id as an engine records it: 0 (none) up to Linux's PID_MAX_LIMIT."""
    return whole_number(value, field, 0, PID_MAX)


def date(value: Any, field: str) -> str:
    """An RFC 3339 date and time, as Go's time.Time reads and writes it."""
    match = _RFC3339.fullmatch(value) if isinstance(value, str) else None
    if match is not None:
        year, month, day, hour, minute, second = (int(g) for g in match.groups()[:6])
        try:
            datetime(year, month, day, hour, minute, second)
        except ValueError:
            match = None
        if match is not None and match[9] is not None and (int(match[9]) > 23 or int(match[10]) > 59):
            match = None
    if match is None:
        raise FieldError(field, "an RFC 3339 date such as 2024-01-02T03:04:05Z", value)
    return str(value)


def strings(value: Any, field: str) -> list[str] | None:
    """An array of strings, or null."""
    if value is None:
        return None
    if not isinstance(value, list):
        raise FieldError(field, "an array of strings", value)
    for index, item in enumerate(value):
        string(item, f"{field}[{index}]")
    return value


def string_map(value: Any, field: str) -> dict[str, str] | None:
    """An object of strings (non-empty keys), or null: Labels."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise FieldError(field, "an object of strings", value)
    for key, item in value.items():
        if not key:
            raise FieldError(field, "an object without empty keys", value)
        string(item, key_field(field, key))
    return value


def object_set(value: Any, field: str, key_check: Callable[[str, str], None] | None = None) -> dict[str, Any] | None:
    """An object whose values are objects ({} in practice), or null: Volumes, ExposedPorts (Go's
    map[string]struct{})."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise FieldError(field, "an object of {} values", value)
    for key, item in value.items():
        if not key:
            raise FieldError(field, "an object without empty keys", value)
        if key_check is not None:
            key_check(key, field)
        if not isinstance(item, dict):
            raise FieldError(key_field(field, key), "an object ({})", item)
    return value


def port_key(key: str, field: str) -> None:
    """An ExposedPorts key: port, port/protocol or a range of them (1-65535, tcp, udp or sctp)."""
    match = _PORT.fullmatch(key)
    first, last = (int(match[1]), int(match[2] or match[1])) if match else (0, 0)
    if not 0 < first <= last <= 65535:
        raise FieldError(f"each key of {field}", "a port spec such as 80/tcp, 53/udp or 8080", key)


def healthcheck(value: Any, field: str) -> dict[str, Any] | None:
    """moby's container.HealthConfig: Test, durations in nanoseconds, Retries."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise FieldError(field, "an object", value)
    strings(value.get("Test"), f"{field}.Test")
    for key in ("Interval", "Timeout", "StartPeriod", "StartInterval", "Retries"):
        optional(value, key, f"{field}.{key}", whole_number, 0)
    return value


def _nullable(check: Callable[[Any, str], Any]) -> Callable[[Any, str], Any]:
    # Go reads a JSON null into a string or bool field as "unset", without an error.
    return lambda value, field: None if value is None else check(value, field)


# The fields of an image config's "config" (OCI ImageConfig and moby's container.Config, a superset), each with its
# check. Other keys pass: consumers ignore properties they do not know.
_STRING_FIELDS = ("Hostname", "Domainname", "User", "Image", "WorkingDir", "MacAddress", "StopSignal")
_BOOL_FIELDS = ("AttachStdin", "AttachStdout", "AttachStderr", "Tty", "OpenStdin", "StdinOnce", "ArgsEscaped")
_LIST_FIELDS = ("Env", "Cmd", "Entrypoint", "OnBuild", "Shell")
CONFIG_FIELDS: dict[str, Callable[[Any, str], Any]] = {
    **dict.fromkeys(_STRING_FIELDS, _nullable(string)),
    **dict.fromkeys((*_BOOL_FIELDS, "NetworkDisabled"), _nullable(boolean)),
    **dict.fromkeys(_LIST_FIELDS, strings),
    "Labels": string_map,
    "Volumes": object_set,
    "ExposedPorts": lambda value, field: object_set(value, field, port_key),
    "Healthcheck": healthcheck,
    "StopTimeout": _nullable(whole_number),
}


def check_config_value(key: str, value: Any, field: str) -> None:
    """Raise FieldError unless value suits the image-config field key (a key not in CONFIG_FIELDS passes)."""
    check = CONFIG_FIELDS.get(key)
    if check is not None:
        check(value, field)


def check_config_section(config: Any, field: str) -> None:
    """An image config's "config" object (or null); field is its name ("" for a document that is one)."""
    if config is None:
        return
    if not isinstance(config, dict):
        raise FieldError(field, "an object", config)
    for key, value in config.items():
        check_config_value(key, value, f"{field}.{key}" if field else key)


def check_image_config(doc: Mapping[str, Any]) -> None:
    """What a committed image takes from its base image's config: platform, history and the config section."""
    for key in ("architecture", "os", "variant", "os.version"):
        optional(doc, key, key, string, "")
    strings(doc.get("os.features"), "os.features")
    history = doc.get("history")
    if history is not None and not isinstance(history, list):
        raise FieldError("history", "an array of objects", history)
    for index, entry in enumerate(history or []):
        where = f"history[{index}]"
        if not isinstance(entry, dict):
            raise FieldError(where, "an object", entry)
        optional(entry, "created", f"{where}.created", date, "")
        for key in ("created_by", "author", "comment"):
            optional(entry, key, f"{where}.{key}", string, "")
        optional(entry, "empty_layer", f"{where}.empty_layer", boolean, False)
    check_config_section(doc.get("config"), "config")

"""Parses and validates Docker image references (NAME[:TAG]) as an archive's RepoTags will hold them.

Grammar: https://github.com/distribution/reference/blob/main/reference.go (patterns in regexp.go).
"""

import re
from dataclasses import dataclass

from pipeline.errors import InvalidReference

DEFAULT_TAG = "latest"
NAME_MAX_LENGTH = 255
TAG_MAX_LENGTH = 128

# Character classes are spelled out in ASCII because Python's \w also matches Unicode letters and Go's does not;
# every pattern is used with fullmatch() because "$" would also accept a trailing newline.
_SEPARATOR = r"(?:[._]|__|-+)"
_PATH_COMPONENT = re.compile(rf"[a-z0-9]+(?:{_SEPARATOR}[a-z0-9]+)*")
_SEPARATOR_RE = re.compile(_SEPARATOR)
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
# IPv6 zone ids and IPv4-mapped forms are excluded on purpose, as upstream does.
_DOMAIN = re.compile(rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[a-fA-F0-9:]+\])(?::[0-9]+)?")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")

_NOT_PATH_CHARS = re.compile(r"[^a-z0-9._-]+")
_SEPARATOR_RUN = re.compile(r"[._-]+")
_NOT_TAG_CHARS = re.compile(r"[^A-Za-z0-9_.-]+")
_EXAMPLE_DOMAIN = "registry.example.com"
_EXAMPLE_REFERENCE = "myapp:latest"


@dataclass(frozen=True)
class Reference:
    """A repository name plus tag, as it will be written to an archive's RepoTags."""

    name: str
    tag: str

    @property
    def domain(self) -> str | None:
        return _split_domain(self.name)[0]

    @property
    def path(self) -> str:
        return _split_domain(self.name)[1]

    def __str__(self) -> str:
        return f"{self.name}:{self.tag}"


def parse_reference(text: str) -> Reference:
    """Validate NAME[:TAG] against Docker's grammar; the tag defaults to "latest"."""
    if not text:
        raise _invalid(text, "it is empty")
    if "@" in text:
        raise _invalid(text, "a digest ('@sha256:...') cannot be used, an archive's RepoTags can only hold a tag")
    name, tag = _split_tag(text)
    problem = _name_problem(name) or _tag_problem(tag)
    if problem is not None:
        raise _invalid(text, problem)
    return Reference(name=name, tag=DEFAULT_TAG if tag is None else tag)


def build_reference_from_name(container_name: str, container_id: str) -> Reference:
    """A valid default reference derived from a container's name, falling back to its id when no name is usable."""
    # "/" is treated as an invalid character rather than a path separator so that a container named e.g.
    # "/my.host/app" never turns into a reference pointing at a registry.
    name = _truncate(_sanitize_component(container_name), NAME_MAX_LENGTH)
    if not name:
        name = _sanitize_component("container-" + container_id[:12])
    # Going through the parser turns any sanitizer bug into a loud error instead of a silently bad archive.
    return parse_reference(f"{name}:{DEFAULT_TAG}")


def _split_tag(text: str) -> tuple[str, str | None]:
    # Only a ":" after the last "/" can start a tag; earlier ones belong to a registry port.
    slash = text.rfind("/")
    colon = text.find(":", slash + 1)
    if colon == -1:
        return text, None
    return text[:colon], text[colon + 1 :]


def _split_domain(name: str) -> tuple[str | None, str]:
    # Docker's own heuristic (normalize.go): without a "." or ":" the first component could be a Docker Hub user.
    first, slash, rest = name.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        return first, rest
    return None, name


def _name_problem(name: str) -> str | None:
    domain, path = _split_domain(name)
    if domain is not None and not _DOMAIN.fullmatch(domain):
        return (
            f"registry host {domain!r} is not a host name (letters, digits and '-' separated by '.')"
            " or a bracketed IPv6 address, with an optional ':port'"
        )
    components = path.split("/")
    if "" in components:
        return "the repository name has an empty path component (a leading, trailing or doubled '/')"
    bad = [c for c in components if not _PATH_COMPONENT.fullmatch(c)]
    if bad:
        if all(_PATH_COMPONENT.fullmatch(c.lower()) for c in components):
            return "repository name must be lowercase"
        return (
            f"path component {bad[0]!r} must be lowercase letters and digits, separated by one '.', '_', '__'"
            " or any number of '-', starting and ending with a letter or digit"
        )
    if len(name) > NAME_MAX_LENGTH:
        return f"the repository name is {len(name)} characters long, at most {NAME_MAX_LENGTH} are allowed"
    return None


def _tag_problem(tag: str | None) -> str | None:
    if tag is None:
        return None
    if not tag:
        return "the tag after ':' is empty"
    if len(tag) > TAG_MAX_LENGTH:
        return f"the tag is {len(tag)} characters long, at most {TAG_MAX_LENGTH} are allowed"
    if not _TAG.fullmatch(tag):
        return f"tag {tag!r} must start with a letter, digit or '_' and hold only letters, digits, '_', '.' and '-'"
    return None


def _invalid(text: str, problem: str) -> InvalidReference:
    # repr() keeps the message on one line even when the input holds newlines or control characters.
    return InvalidReference(f"invalid image reference {text!r}: {problem}; use e.g. --image {_suggest(text)}")


def _suggest(text: str) -> str:
    """A best-effort corrected reference for the error message, or a generic example when none can be made."""
    name, tag = _split_tag(text.partition("@")[0])
    domain, path = _split_domain(name)
    if domain is not None and not _DOMAIN.fullmatch(domain):
        domain = _EXAMPLE_DOMAIN
    components = [c for c in (_sanitize_component(c) for c in path.split("/")) if c]
    if not components:
        return _EXAMPLE_REFERENCE
    prefix = "" if domain is None else domain + "/"
    name = _truncate(prefix + "/".join(components), NAME_MAX_LENGTH)
    tag = _NOT_TAG_CHARS.sub("-", tag or "")[:TAG_MAX_LENGTH].strip(".-") or DEFAULT_TAG
    if _name_problem(name) or _tag_problem(tag):
        return _EXAMPLE_REFERENCE
    return f"{name}:{tag}"


def _sanitize_component(raw: str) -> str:
    """Lowercase raw and rewrite it into one path component, or "" when nothing usable is left."""
    text = _NOT_PATH_CHARS.sub("-", raw.lower())
    # A run like "._" or "___" is not a separator the grammar knows, so it collapses to the always-valid "-".
    text = _SEPARATOR_RUN.sub(lambda m: m[0] if _SEPARATOR_RE.fullmatch(m[0]) else "-", text)
    return text.strip("._-")


def _truncate(name: str, limit: int) -> str:
    # Cutting may leave half a separator (or a "/") at the end, which the grammar refuses.
    return name[:limit].rstrip("._-/")

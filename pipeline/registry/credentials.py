"""Registry credentials, found the way `docker login` keeps them: the environment, then config.json (a credential
helper, or auths.<host>.auth).

Reference: https://docs.docker.com/reference/cli/docker/login/#credential-stores.
"""

import base64
import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pipeline import jsoncheck
from pipeline.errors import RegistryError

ENV_USERNAME = "PIPELINE_REGISTRY_USERNAME"
ENV_PASSWORD = "PIPELINE_REGISTRY_PASSWORD"
# docker.io is a name, not a host: its API and its credentials live under other names.
DOCKER_HUB = "docker.io"
DOCKER_HUB_KEYS = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str = field(repr=False)
    source: str  # where they were found, for error messages


def find_credentials(host: str, environ: Mapping[str, str] = os.environ) -> Credentials | None:
    """$PIPELINE_REGISTRY_USERNAME/$PIPELINE_REGISTRY_PASSWORD, else what `docker login host` stored in
    $DOCKER_CONFIG/config.json (default ~/.docker/config.json): a credential helper, or auths.<host>.auth."""
    username, password = environ.get(ENV_USERNAME, ""), environ.get(ENV_PASSWORD, "")
    if username and password:
        return Credentials(username, password, f"${ENV_USERNAME}")
    if username or password:
        raise RegistryError(f"registry {host}: only one of ${ENV_USERNAME} and ${ENV_PASSWORD} is set; set both")
    directory = environ.get("DOCKER_CONFIG") or os.path.join(environ.get("HOME") or str(Path.home()), ".docker")
    return _docker_credentials(Path(directory) / "config.json", host)


def _docker_credentials(path: Path, host: str) -> Credentials | None:
    try:
        doc = jsoncheck.loads(path.read_bytes())
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise RegistryError(
            f"{path}: cannot read registry credentials ({e}); fix the file or set ${ENV_USERNAME}"
        ) from e
    keys = DOCKER_HUB_KEYS if host == DOCKER_HUB else {host}
    helpers = _section(doc, "credHelpers")
    helper = next((helpers[k] for k in helpers if _config_host(k) in keys), None)
    if isinstance(helper, str) and helper:
        return _helper_credentials(helper, host, path)
    auths = _section(doc, "auths")
    for key, entry in auths.items():
        if _config_host(key) in keys and isinstance(entry, dict):
            if isinstance(entry.get("auth"), str) and entry["auth"]:
                try:
                    username, colon, password = base64.b64decode(entry["auth"]).decode().partition(":")
                except ValueError:
                    colon = ""
                if not colon:
                    raise RegistryError(f"{path}: auths.{key}.auth is not base64 of user:password; run docker login")
                return Credentials(username, password, str(path))
            if isinstance(entry.get("username"), str) and isinstance(entry.get("password"), str):
                return Credentials(entry["username"], entry["password"], str(path))
    store = doc.get("credsStore")
    return _helper_credentials(store, host, path) if isinstance(store, str) and store else None


def _section(doc: dict[str, object], name: str) -> dict[str, object]:
    value = doc.get(name)
    return value if isinstance(value, dict) else {}


def _config_host(key: str) -> str:
    """config.json keys are hosts, or URLs such as https://index.docker.io/v1/."""
    return key.partition("://")[2].partition("/")[0] if "://" in key else key.partition("/")[0]


def _helper_credentials(helper: str, host: str, config: Path) -> Credentials | None:
    """Ask docker-credential-<helper> (https://github.com/docker/docker-credential-helpers); None if it has none."""
    program = f"docker-credential-{helper}"
    server = "https://index.docker.io/v1/" if host == DOCKER_HUB else host
    try:
        done = subprocess.run([program, "get"], input=server, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RegistryError(
            f"{config}: credential helper {program} failed ({e}); install it or set ${ENV_USERNAME}"
        ) from e
    if done.returncode != 0:
        return None  # helpers exit 1 with "credentials not found" for an unknown server
    try:
        answer = jsoncheck.loads(done.stdout)
        return Credentials(str(answer["Username"]), str(answer["Secret"]), f"{config} ({program})")
    except (ValueError, KeyError, TypeError) as e:
        raise RegistryError(f"{config}: credential helper {program} answered no credentials ({e!r})") from e

"""An OCI distribution client that pushes an image (blobs, then its manifest) and reads the digest a tag points at.

Spec: https://github.com/opencontainers/distribution-spec/blob/main/spec.md (push, cross-repository mount, manifests);
token auth: https://distribution.github.io/distribution/spec/auth/token/; credentials as `docker login` keeps them:
https://docs.docker.com/reference/cli/docker/login/#credential-stores.
"""

import base64
import http.client
import ipaddress
import json
import logging
import os
import random
import re
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from typing import TypeVar

from pipeline.credentials import DOCKER_HUB, ENV_PASSWORD, ENV_USERNAME, Credentials, find_credentials
from pipeline.errors import RegistryError
from pipeline.imageconfig import digest_of
from pipeline.ocilayout import INDEX_MEDIA_TYPE, MANIFEST_MEDIA_TYPE

log = logging.getLogger(__name__)

# What a tag may resolve to; without the OCI types distribution answers 404 for an OCI manifest.
_ACCEPT = ", ".join(
    (
        MANIFEST_MEDIA_TYPE,
        INDEX_MEDIA_TYPE,
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    )
)
_TRANSIENT_STATUSES = frozenset({429, 500, 502, 503, 504})
_CHUNK = 1 << 20
_MAX_DOCUMENT = 4 << 20  # distribution-spec: registries may refuse manifests over 4 MiB; answers read no more
_MAX_DELAY = 30.0
# docker.io is a name, not a host: its API and its credentials live under other names.
_DOCKER_HUB_API = "registry-1.docker.io"
_CHALLENGE_PARAM = re.compile(r'(\w+)=(?:"([^"]*)"|([^,\s]*))')

T = TypeVar("T")


@dataclass(frozen=True)
class Blob:
    """One blob of an image: streamed from path (a layer) or sent from data (the config)."""

    digest: str
    size: int
    media_type: str
    path: Path | None = None
    data: bytes | None = None

    def body(self) -> bytes | Iterator[bytes]:
        if self.data is not None:
            return self.data
        assert self.path is not None
        return _read_chunks(self.path)


@dataclass(frozen=True)
class Options:
    """How a registry is reached; the [registry] section of luigi.cfg."""

    insecure: bool = False  # plain HTTP, allowed only to a loopback host
    timeout: float = 60.0  # seconds for each connect or read
    attempts: int = 5  # tries of each request answered 429/5xx or cut off
    backoff: float = 1.0  # seconds before the second try; doubles for each further one
    ca_file: str = ""  # a PEM bundle trusted besides the system's CAs


def is_loopback(host: str) -> bool:
    """Whether host[:port] names this machine: localhost, 127.0.0.0/8 or ::1."""
    name = urllib.parse.urlsplit(f"//{host}").hostname or ""
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class _Transient(Exception):
    """A failure worth another try: a 429/5xx answer or a connection cut off."""

    def __init__(self, what: str, retry_after: float | None = None) -> None:
        super().__init__(what)
        self.retry_after = retry_after


@dataclass(frozen=True)
class _Response:
    status: int
    reason: str
    headers: Message
    body: bytes


Body = Callable[[], bytes | Iterator[bytes]]


class Registry:
    """One registry host: its API URL, how it is reached, who we are there, and the bearer tokens it granted."""

    def __init__(self, host: str, options: Options = Options(), credentials: Credentials | None = None) -> None:
        self.host = host
        self.options = options
        self.credentials = credentials
        api_host = _DOCKER_HUB_API if host == DOCKER_HUB else host
        if options.insecure and not is_loopback(api_host):
            raise RegistryError(
                f"registry {host}: [registry] insecure allows plain HTTP only to a loopback host (localhost,"
                " 127.0.0.0/8, ::1); reach this registry over TLS"
            )
        self.base_url = f"{'http' if options.insecure else 'https'}://{api_host}"
        context = ssl.create_default_context()
        if options.ca_file:
            try:
                context.load_verify_locations(cafile=options.ca_file)
            except (OSError, ssl.SSLError) as e:
                raise RegistryError(f"{options.ca_file}: cannot load it as [registry] ca_file ({e}); fix it") from e
        # No redirect or error processors: every answer comes back as it is, and Authorization never follows
        # a redirect to another host (blob storage behind a registry refuses it).
        self._openers = {
            direct: _opener(urllib.request.ProxyHandler({}) if direct else urllib.request.ProxyHandler(), context)
            for direct in (True, False)
        }
        self._tokens: dict[str, str] = {}
        self._basic = False

    def blob_exists(self, repository: str, digest: str) -> bool:
        what = f"checking blob {digest} in {repository}"
        response = self._retrying(
            what,
            lambda: self._exchange(
                "HEAD", f"/v2/{repository}/blobs/{digest}", _scope(repository, "pull"), (200, 302, 307, 404), what
            ),
        )
        return response.status != 404  # a redirect points at the blob's content, so the registry has it

    def mount_blob(self, repository: str, digest: str, source: str) -> str | None:
        """Link digest from source into repository: None when mounted, else the upload URL the registry opened
        instead (it cannot mount, e.g. source no longer holds the blob)."""
        what = f"mounting {digest} from {source} into {repository}"
        query = urllib.parse.urlencode({"mount": digest, "from": source})
        scope = f"{_scope(repository, 'pull,push')} {_scope(source, 'pull')}"
        response = self._retrying(
            what, lambda: self._exchange("POST", f"/v2/{repository}/blobs/uploads/?{query}", scope, (201, 202), what)
        )
        return None if response.status == 201 else self._location(response, what)

    def upload_blob(self, repository: str, blob: Blob, session: str | None = None) -> None:
        """Monolithic upload, streamed: POST opens a session (unless given), one PUT sends the content. A retry
        starts a new session, since a cut-off PUT leaves the old one in an unknown state."""
        what = f"uploading {blob.digest} ({blob.size} bytes) to {repository}"
        scope = _scope(repository, "pull,push")
        sessions = [session]

        def attempt() -> None:
            url = sessions.pop() if sessions else None
            if url is None:
                opened = self._exchange("POST", f"/v2/{repository}/blobs/uploads/", scope, (202,), what)
                url = self._location(opened, what)
            headers = {"Content-Type": "application/octet-stream", "Content-Length": str(blob.size)}
            self._exchange("PUT", _with_query(url, digest=blob.digest), scope, (201,), what, headers, blob.body)

        self._retrying(what, attempt)

    def put_manifest(self, repository: str, tag: str, manifest: bytes, media_type: str = MANIFEST_MEDIA_TYPE) -> str:
        """PUT the manifest under tag; its digest, as the registry confirms it."""
        what = f"putting the manifest of {repository}:{tag}"
        headers = {"Content-Type": media_type}
        path, scope = f"/v2/{repository}/manifests/{tag}", _scope(repository, "pull,push")
        response = self._retrying(
            what, lambda: self._exchange("PUT", path, scope, (201,), what, headers, lambda: manifest)
        )
        digest = digest_of(manifest)
        confirmed = response.headers.get("Docker-Content-Digest") or digest
        if confirmed != digest:
            raise RegistryError(
                f"registry {self.host}: stored the manifest of {repository}:{tag} as {confirmed}, not {digest};"
                " check the registry"
            )
        return digest

    def manifest_digest(self, repository: str, tag: str) -> str | None:
        """The digest of the manifest tag points at, or None when the repository has no such tag."""
        what = f"looking up {repository}:{tag}"
        path, scope, accept = f"/v2/{repository}/manifests/{tag}", _scope(repository, "pull"), {"Accept": _ACCEPT}
        response = self._retrying(what, lambda: self._exchange("HEAD", path, scope, (200, 404), what, accept))
        if response.status == 404:
            return None
        digest = response.headers.get("Docker-Content-Digest")
        if digest:
            return digest
        # Docker-Content-Digest is optional: hash the manifest itself.
        response = self._retrying(what, lambda: self._exchange("GET", path, scope, (200, 404), what, accept))
        return None if response.status == 404 else digest_of(response.body)

    # --- one request: authorization, then the answer checked ---------------------------------------------------

    def _exchange(
        self,
        method: str,
        url: str,
        scope: str,
        expect: tuple[int, ...],
        what: str,
        headers: Mapping[str, str] | None = None,
        body: Body | None = None,
    ) -> _Response:
        """One request answered with a status in expect; a 401 gets one fresh authorization and one more try."""
        url = self._checked_url(urllib.parse.urljoin(self.base_url, url), what)
        ours = urllib.parse.urlsplit(url).netloc == urllib.parse.urlsplit(self.base_url).netloc
        response = None
        for fresh in (False, True):
            auth = self._authorization(scope) if ours else {}
            response = self._send(method, url, {**(headers or {}), **auth}, body)
            if response.status != 401 or fresh or not ours:
                break
            self._authorize(response.headers.get("WWW-Authenticate", ""), scope, what)
        assert response is not None
        if response.status not in expect:
            raise self._refused(response, what)
        return response

    def _send(self, method: str, url: str, headers: Mapping[str, str], body: Body | None) -> _Response:
        request = urllib.request.Request(url, data=body() if body else None, headers=dict(headers), method=method)
        opener = self._openers[is_loopback(urllib.parse.urlsplit(url).netloc)]
        try:
            with opener.open(request, timeout=self.options.timeout) as raw:
                response = _Response(raw.status, raw.reason, raw.headers, raw.read(_MAX_DOCUMENT + 1))
        except urllib.error.URLError as e:  # while connecting or sending
            raise self._unreachable(e.reason) from e
        except (http.client.HTTPException, OSError) as e:  # while reading the answer
            raise self._unreachable(e) from e
        if response.status in _TRANSIENT_STATUSES:
            raise _Transient(f"{response.status} {response.reason}{_error_codes(response)}", _retry_after(response))
        return response

    def _retrying(self, what: str, operation: Callable[[], T]) -> T:
        """operation, tried again after 429/5xx answers and cut connections, with exponential backoff (bounded)."""
        attempts = max(1, self.options.attempts)
        attempt = 1
        while True:
            try:
                return operation()
            except _Transient as e:
                if attempt >= attempts:
                    raise RegistryError(
                        f"registry {self.host}: {what} failed {attempts} times, last: {e}; check that the registry"
                        " is up and reachable, then re-run"
                    ) from e
                delay = e.retry_after if e.retry_after is not None else self.options.backoff * 2 ** (attempt - 1)
                delay = min(delay, _MAX_DELAY) * random.uniform(0.8, 1.0)  # jitter: many hosts must not retry in step
                log.warning(
                    "registry %s: %s: %s; try %d of %d in %.1f s", self.host, what, e, attempt + 1, attempts, delay
                )
                time.sleep(delay)
                attempt += 1

    # --- authorization -----------------------------------------------------------------------------------------

    def _authorization(self, scope: str) -> dict[str, str]:
        if scope in self._tokens:
            return {"Authorization": f"Bearer {self._tokens[scope]}"}
        if self._basic and self.credentials:
            return {"Authorization": _basic(self.credentials)}
        return {}

    def _authorize(self, challenge: str, scope: str, what: str) -> None:
        scheme, _, rest = challenge.strip().partition(" ")
        params = {m[1].lower(): m[2] or m[3] for m in _CHALLENGE_PARAM.finditer(rest)}
        if scheme.lower() == "basic":
            if self.credentials is None:
                raise self._needs_credentials(what)
            self._basic = True
        elif scheme.lower() == "bearer" and params.get("realm"):
            self._tokens[scope] = self._fetch_token(params, scope, what)
        else:
            raise RegistryError(f"registry {self.host}: {what}: unsupported authentication challenge {challenge!r}")

    def _fetch_token(self, params: Mapping[str, str], scope: str, what: str) -> str:
        query = [("service", params["service"])] if params.get("service") else []
        query += [("scope", s) for s in scope.split()]
        realm = params["realm"]
        url = self._checked_url(realm + ("&" if "?" in realm else "?") + urllib.parse.urlencode(query), what)
        headers = {"Authorization": _basic(self.credentials)} if self.credentials else {}
        response = self._retrying(what, lambda: self._send("GET", url, headers, None))
        if response.status == 401 and self.credentials is None:
            raise self._needs_credentials(what)
        if response.status != 200:
            raise self._refused(response, f"{what}: token from {urllib.parse.urlsplit(realm).netloc}")
        try:
            answer = json.loads(response.body)
            token = answer.get("token") or answer.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise RegistryError(f"registry {self.host}: {what}: the token service {realm} answered no token")
        return token

    # --- messages ----------------------------------------------------------------------------------------------

    def _refused(self, response: _Response, what: str) -> RegistryError:
        status = f"{response.status} {response.reason}{_error_codes(response)}"
        if response.status == 401 and self.credentials:
            return RegistryError(
                f"registry {self.host}: {what}: user {self.credentials.username!r} (from"
                f" {self.credentials.source}) was refused ({status}); fix the credentials and re-run"
            )
        if response.status == 401:
            return self._needs_credentials(what)
        if response.status == 403:
            return RegistryError(f"registry {self.host}: {what}: access denied ({status}); check the account's rights")
        return RegistryError(f"registry {self.host}: {what}: unexpected answer {status}; check the registry")

    def _needs_credentials(self, what: str) -> RegistryError:
        return RegistryError(
            f"registry {self.host}: {what}: it requires credentials; run `docker login {self.host}` or set"
            f" ${ENV_USERNAME} and ${ENV_PASSWORD}"
        )

    def _unreachable(self, reason: object) -> Exception:
        if isinstance(reason, ssl.SSLCertVerificationError):
            return RegistryError(
                f"registry {self.host}: its TLS certificate is not trusted ({reason.verify_message}); add its CA"
                " to the system's trust store or to [registry] ca_file"
            )
        if isinstance(reason, ssl.SSLError):
            hint = "; for plain HTTP to a registry on this host set [registry] insecure = true"
            hint = hint if is_loopback(self.host) else ""
            return RegistryError(f"registry {self.host}: TLS handshake failed ({reason.reason or reason}){hint}")
        return _Transient(f"connection failed ({reason})")

    def _location(self, response: _Response, what: str) -> str:
        location = response.headers.get("Location")
        if not location:
            raise RegistryError(f"registry {self.host}: {what}: the answer {response.status} has no Location")
        return urllib.parse.urljoin(self.base_url, location)

    def _checked_url(self, url: str, what: str) -> str:
        """Refuse plain HTTP except to a loopback host with [registry] insecure: credentials travel with it."""
        parts = urllib.parse.urlsplit(url)
        if parts.scheme == "https" or (parts.scheme == "http" and self.options.insecure and is_loopback(parts.netloc)):
            return url
        raise RegistryError(
            f"registry {self.host}: {what}: refusing {parts.scheme}://{parts.netloc}; only https is used, or http to"
            " a loopback host with [registry] insecure = true"
        )


def open_registry(host: str, options: Options = Options(), environ: Mapping[str, str] = os.environ) -> Registry:
    """The registry at host, with the credentials find_credentials() finds for it."""
    return Registry(host, options, find_credentials(host, environ))


def _scope(repository: str, actions: str) -> str:
    return f"repository:{repository}:{actions}"


def _basic(credentials: Credentials) -> str:
    pair = f"{credentials.username}:{credentials.password}".encode()
    return "Basic " + base64.b64encode(pair).decode("ascii")


def _with_query(url: str, **params: str) -> str:
    """url with params appended to its query (an upload URL carries the registry's own state there)."""
    parts = urllib.parse.urlsplit(url)
    query = "&".join(q for q in (parts.query, urllib.parse.urlencode(params)) if q)
    return urllib.parse.urlunsplit(parts._replace(query=query))


def _error_codes(response: _Response) -> str:
    """The registry's error codes and messages (distribution-spec "errors"), as ' (CODE: message; ...)'."""
    try:
        errors = json.loads(response.body).get("errors") or []
        text = "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errors if isinstance(e, dict))
    except (ValueError, AttributeError):
        return ""
    return f" ({' '.join(text.split())})" if text else ""  # one line, whatever the registry sent


def _retry_after(response: _Response) -> float | None:
    value = response.headers.get("Retry-After", "")
    return float(value) if value.isdigit() else None


def _opener(proxy: urllib.request.ProxyHandler, context: ssl.SSLContext) -> urllib.request.OpenerDirector:
    opener = urllib.request.OpenerDirector()
    for handler in (proxy, urllib.request.HTTPHandler(), urllib.request.HTTPSHandler(context=context)):
        opener.add_handler(handler)
    return opener


def _read_chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            yield chunk

"""An OCI distribution client that pushes an image (blobs, then its manifest) and reads the digest a tag points at.

Spec: https://github.com/opencontainers/distribution-spec/blob/main/spec.md (push, cross-repository mount, manifests);
token auth: https://distribution.github.io/distribution/spec/auth/token/; credentials as `docker login` keeps them:
https://docs.docker.com/reference/cli/docker/login/#credential-stores.
"""

import base64
import email.utils
import http.client
import ipaddress
import json
import logging
import math
import os
import random
import re
import socket
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import Message
from pathlib import Path
from typing import Any, TypeVar

from pipeline.errors import RegistryError
from pipeline.image.imageconfig import digest_of
from pipeline.image.ocilayout import INDEX_MEDIA_TYPE, MANIFEST_MEDIA_TYPE
from pipeline.registry.credentials import DOCKER_HUB, ENV_PASSWORD, ENV_USERNAME, Credentials, find_credentials

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
# RFC 6750's b64token: what a bearer token may hold, so it goes into an Authorization header as it is.
_BEARER_TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
# OCI image-spec descriptor digests: algorithm ":" encoded.
_DIGEST = re.compile(r"[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")
_SHOWN = 120  # characters of a header value quoted in an error message

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
    # Seconds for each request as a whole: connecting, sending it and reading the whole answer (a registry that
    # answers a byte at a time is cut off there). A blob being uploaded keeps its request alive while it moves:
    # each 1 MiB must be taken within timeout. One operation with all its tries gets attempts x timeout in all
    # (not counting time spent uploading).
    timeout: float = 60.0
    attempts: int = 5  # tries of each request answered 429/5xx, cut off or timed out
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
    """A failure worth another try: a 429/5xx answer, a connection cut off or an answer not complete in time."""

    def __init__(self, what: str, retry_after: float | None = None) -> None:
        super().__init__(what)
        self.retry_after = retry_after


class _BadHeader(Exception):
    """A header of an answer that this client cannot use; the caller names the registry and the request."""

    def __init__(self, header: str, value: str, why: str) -> None:
        super().__init__(f"its {header} header {_shown(value)} {why}")


class _Watchdog:
    """Shuts a request's socket down at its deadline. A socket timeout bounds each read, so an answer trickled a
    byte at a time would never end; this bounds the request as a whole. The deadline moves only while a body is
    being sent (arm())."""

    def __init__(self, deadline: float) -> None:
        self._deadline = deadline
        self._condition = threading.Condition()
        self._sockets: list[socket.socket] = []
        self._stopped = False
        self.expired = False
        self._thread = threading.Thread(target=self._run, name="registry-deadline", daemon=True)
        self._thread.start()

    def arm(self, deadline: float) -> None:
        with self._condition:
            self._deadline = deadline
            self._condition.notify()

    def watch(self, sock: socket.socket) -> None:
        with self._condition:
            self._sockets.append(sock)
            if self.expired:
                _shut(sock)

    def stop(self) -> None:
        with self._condition:
            self._stopped = True
            self._condition.notify()
        self._thread.join()

    def _run(self) -> None:
        with self._condition:
            while not self._stopped:
                left = self._deadline - time.monotonic()
                if left <= 0:
                    self.expired = True
                    for sock in self._sockets:
                        _shut(sock)
                    return
                self._condition.wait(left)


def _shut(sock: socket.socket) -> None:
    """Wake whatever blocks on sock (a read, a write, a TLS handshake): both directions shut at the descriptor,
    below any TLS layer, which another thread may be inside."""
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:  # already closed or never connected
        pass


class _WatchedRequest(urllib.request.Request):
    def __init__(self, url: str, watchdog: _Watchdog, **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        self.watchdog = watchdog


def _watched(connection: type[http.client.HTTPConnection], watchdog: _Watchdog) -> Callable[..., Any]:
    """A connection class whose socket the watchdog can shut, made by urllib's do_open as http_class(host, ...)."""

    def make(*args: Any, **kwargs: Any) -> http.client.HTTPConnection:
        conn = connection(*args, **kwargs)

        def create(address: tuple[str, int], timeout: float, source: Any = None) -> socket.socket:
            sock = socket.create_connection(address, timeout, source)
            watchdog.watch(sock)
            return sock

        conn._create_connection = create  # type: ignore[attr-defined]  # what connect() opens its socket with
        return conn

    return make


class _HTTPHandler(urllib.request.HTTPHandler):
    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        assert isinstance(req, _WatchedRequest)
        return self.do_open(_watched(http.client.HTTPConnection, req.watchdog), req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, context: ssl.SSLContext) -> None:
        super().__init__(context=context)
        self._tls = context

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        assert isinstance(req, _WatchedRequest)
        return self.do_open(_watched(http.client.HTTPSConnection, req.watchdog), req, context=self._tls)


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
        self._budget: float | None = None  # the monotonic time the current operation's tries must end by

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
        confirmed = self._digest_header(response, what) or digest
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
        digest = self._digest_header(response, what)
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
            response = self._send(method, url, {**(headers or {}), **auth}, body, what)
            if response.status != 401 or fresh or not ours:
                break
            self._authorize(response.headers.get("WWW-Authenticate", ""), scope, what)
        assert response is not None
        if response.status not in expect:
            raise self._refused(response, what)
        return response

    def _send(self, method: str, url: str, headers: Mapping[str, str], body: Body | None, what: str) -> _Response:
        """One request and its whole answer, within [registry] timeout (and the operation's budget)."""
        timeout = self.options.timeout
        data = body() if body else None
        start = time.monotonic()
        deadline = min(start + timeout, self._budget if self._budget is not None else math.inf)
        watchdog = _Watchdog(deadline)
        try:
            if data is not None and not isinstance(data, bytes):
                data = self._moving(data, watchdog)
            request = _WatchedRequest(url, watchdog, data=data, headers=dict(headers), method=method)
            opener = self._openers[is_loopback(urllib.parse.urlsplit(url).netloc)]
            with opener.open(request, timeout=max(deadline - start, 0.001)) as raw:
                _check_length(raw.headers, method)
                response = _Response(raw.status, raw.reason, raw.headers, raw.read(_MAX_DOCUMENT + 1))
        except _BadHeader as e:
            raise RegistryError(
                f"registry {self.host}: {what}: {e}; check the registry (or a proxy in front of it)"
            ) from None
        except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
            if watchdog.expired:
                raise _Transient(f"no complete answer within {timeout:g} s") from e
            raise self._unreachable(e.reason if isinstance(e, urllib.error.URLError) else e) from e
        except ValueError as e:  # a header value http.client refuses to send (e.g. one a registry handed us)
            raise RegistryError(
                f"registry {self.host}: {what}: cannot send the request ({e}); check the registry"
            ) from None
        finally:
            watchdog.stop()
        if watchdog.expired:  # the answer was cut short at the deadline (read until the connection closed)
            raise _Transient(f"no complete answer within {timeout:g} s")
        if len(response.body) > _MAX_DOCUMENT:
            raise RegistryError(
                f"registry {self.host}: {what}: the answer is larger than {_MAX_DOCUMENT} bytes; check the registry"
            )
        if response.status in _TRANSIENT_STATUSES:
            retry_after, note = _retry_after(response)
            raise _Transient(
                f"{response.status} {_printable(response.reason)}{_error_codes(response)}{note}", retry_after
            )
        return response

    def _moving(self, chunks: Iterable[bytes], watchdog: _Watchdog) -> Iterator[bytes]:
        """chunks, each given [registry] timeout to be sent: an upload lasts as long as it moves. Time spent
        sending does not count against the operation's budget."""
        last = time.monotonic()
        for chunk in chunks:
            now = time.monotonic()
            if self._budget is not None:
                self._budget += now - last
            watchdog.arm(now + self.options.timeout)
            last = now
            yield chunk

    def _retrying(self, what: str, operation: Callable[[], T]) -> T:
        """operation, tried again after 429/5xx answers, cut connections and timeouts, with exponential backoff;
        attempts tries at most, and all of them within attempts x timeout (a nested operation, such as fetching
        a token, within what is left of its caller's)."""
        attempts = max(1, self.options.attempts)
        start = time.monotonic()
        outer = self._budget
        own = start + attempts * self.options.timeout
        self._budget = own if outer is None else min(own, outer)
        try:
            attempt = 1
            while True:
                try:
                    return operation()
                except _Transient as e:
                    if attempt >= attempts:
                        raise RegistryError(
                            f"registry {self.host}: {what} failed {attempts} times, last: {e}; check that the registry"
                            " is up and reachable (or raise [registry] timeout or attempts), then re-run"
                        ) from e
                    waited = e.retry_after if e.retry_after is not None else self.options.backoff * 2 ** (attempt - 1)
                    delay = min(waited, _MAX_DELAY) * random.uniform(0.8, 1.0)  # jitter: hosts must not retry in step
                    left = self._budget - time.monotonic()
                    if delay >= left and e.retry_after is not None:
                        raise RegistryError(
                            f"registry {self.host}: {what}: {e}; its Retry-After header asks to wait {waited:g} s,"
                            f" more than the {max(left, 0):.0f} s left of [registry] attempts x timeout; re-run"
                            " later, or raise [registry] timeout or attempts"
                        ) from e
                    if delay >= left:
                        raise RegistryError(
                            f"registry {self.host}: {what} failed {attempt} time(s) in"
                            f" {time.monotonic() - start:.1f} s, all the time [registry] attempts x timeout allows,"
                            f" last: {e}; check that the registry is up and reachable (or raise [registry]"
                            " timeout), then re-run"
                        ) from e
                    log.warning(
                        "registry %s: %s: %s; try %d of %d in %.1f s", self.host, what, e, attempt + 1, attempts, delay
                    )
                    time.sleep(delay)
                    attempt += 1
        finally:
            self._budget = outer

    def _digest_header(self, response: _Response, what: str) -> str | None:
        value = response.headers.get("Docker-Content-Digest")
        if value is None or _DIGEST.fullmatch(value.strip()):
            return value.strip() if value else None
        raise RegistryError(
            f"registry {self.host}: {what}: its Docker-Content-Digest header {_shown(value)} is not a digest;"
            " check the registry"
        )

    # --- authorization -----------------------------------------------------------------------------------------

    def _authorization(self, scope: str) -> dict[str, str]:
        if scope in self._tokens:
            return {"Authorization": f"Bearer {self._tokens[scope]}"}
        if self._basic and self.credentials:
            return {"Authorization": _basic(self.credentials)}
        return {}

    def _authorize(self, challenge: str, scope: str, what: str) -> None:
        try:
            scheme, params = parse_challenge(challenge)
        except _BadHeader as e:
            raise RegistryError(f"registry {self.host}: {what}: {e}; check the registry") from None
        if scheme == "basic":
            if self.credentials is None:
                raise self._needs_credentials(what)
            self._basic = True
        else:
            self._tokens[scope] = self._fetch_token(params, scope, what)

    def _fetch_token(self, params: Mapping[str, str], scope: str, what: str) -> str:
        query = [("service", params["service"])] if params.get("service") else []
        query += [("scope", s) for s in scope.split()]
        realm = params["realm"]
        url = realm + ("&" if "?" in realm else "?") + urllib.parse.urlencode(query)
        if urllib.parse.urlsplit(url).scheme != "https" and not (self.options.insecure and is_loopback(_netloc(url))):
            raise RegistryError(
                f"registry {self.host}: {what}: its WWW-Authenticate header names the token service {_shown(realm)};"
                " only https is used, or http to a loopback host with [registry] insecure = true"
            )
        headers = {"Authorization": _basic(self.credentials)} if self.credentials else {}
        response = self._retrying(what, lambda: self._send("GET", url, headers, None, what))
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
            raise RegistryError(f"registry {self.host}: {what}: the token service {_shown(realm)} answered no token")
        if not _BEARER_TOKEN.fullmatch(token):
            raise RegistryError(
                f"registry {self.host}: {what}: the token service {_shown(realm)} answered a token that is not a"
                " bearer token (RFC 6750 characters only); check the token service"
            )
        return token

    # --- messages ----------------------------------------------------------------------------------------------

    def _refused(self, response: _Response, what: str) -> RegistryError:
        status = f"{response.status} {_printable(response.reason)}{_error_codes(response)}"
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
        try:
            return resolve_location(self.base_url, location)
        except _BadHeader as e:
            raise RegistryError(f"registry {self.host}: {what}: {e}; check the registry") from None

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
    except (ValueError, AttributeError, TypeError):
        return ""
    return f" ({_printable(text)})" if text else ""  # one line, whatever the registry sent


def _retry_after(response: _Response) -> tuple[float | None, str]:
    """Seconds the registry asked to wait (Retry-After: seconds or an HTTP date), and a note when the header
    says neither (it is then ignored, and the usual backoff applies)."""
    value = response.headers.get("Retry-After")
    if value is None:
        return None, ""
    try:
        return parse_retry_after(value), ""
    except _BadHeader as e:
        return None, f"; {e}, ignored"


def parse_retry_after(value: str, now: datetime | None = None) -> float:
    """Retry-After (RFC 9110 10.2.3) in seconds from now: delay-seconds or an HTTP date; _BadHeader otherwise."""
    text = value.strip()
    if re.fullmatch(r"[0-9]+", text, re.ASCII):
        return float(text)  # huge ones become inf: capped, or beyond the budget
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        raise _BadHeader("Retry-After", value, "is neither a number of seconds nor an HTTP date") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def parse_challenge(challenge: str) -> tuple[str, dict[str, str]]:
    """The scheme ("basic" or "bearer") and parameters of a WWW-Authenticate challenge (RFC 9110 11.6.1);
    _BadHeader for anything this client cannot answer: another scheme, a bearer challenge without a usable realm."""
    scheme, _, rest = challenge.strip().partition(" ")
    params = {m[1].lower(): m[2] or m[3] for m in _CHALLENGE_PARAM.finditer(rest)}
    if scheme.lower() == "basic":
        return "basic", params
    if scheme.lower() != "bearer":
        raise _BadHeader("WWW-Authenticate", challenge, "is not a challenge this client answers (Basic or Bearer)")
    realm = params.get("realm", "")
    try:
        parts = urllib.parse.urlsplit(realm)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname or not _plain_url(realm):
        raise _BadHeader("WWW-Authenticate", challenge, 'names no usable token service (realm="https://...")')
    return "bearer", params


def resolve_location(base_url: str, location: str) -> str:
    """The URL a Location header names, resolved against the registry's; _BadHeader unless it is an http(s) URL
    on the registry itself (an upload sent elsewhere would leave the registry, and a blob with it)."""
    try:
        url = urllib.parse.urljoin(base_url, location.strip())
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        raise _BadHeader("Location", location, "is not a URL") from None
    if not _plain_url(url) or parts.scheme not in ("http", "https") or not parts.hostname:
        raise _BadHeader("Location", location, "is not an http(s) URL")
    base = urllib.parse.urlsplit(base_url)
    if (parts.scheme, parts.netloc.lower()) != (base.scheme, base.netloc.lower()):
        raise _BadHeader("Location", location, f"points away from the registry ({parts.scheme}://{parts.netloc})")
    return url


def _check_length(headers: Message, method: str) -> None:
    """Refuse an answer whose Content-Length is not a byte count, or (unless to a HEAD, which only describes
    a blob) announces more than an answer may hold."""
    values = headers.get_all("Content-Length") or []
    for value in values:
        if not re.fullmatch(r"[0-9]{1,19}", value.strip(), re.ASCII):
            raise _BadHeader("Content-Length", value, "is not a number of bytes")
    if len({int(v) for v in values}) > 1:
        raise _BadHeader("Content-Length", ", ".join(values), "gives different lengths")
    if values and method != "HEAD" and int(values[0]) > _MAX_DOCUMENT:
        raise _BadHeader(
            "Content-Length", values[0], f"announces more than the {_MAX_DOCUMENT} bytes an answer may hold"
        )


def _plain_url(text: str) -> bool:
    """Printable ASCII without spaces: what goes into a request line or header unchanged."""
    return all(33 <= ord(c) < 127 for c in text)


def _netloc(url: str) -> str:
    return urllib.parse.urlsplit(url).netloc


def _printable(text: str, limit: int = 300) -> str:
    """text as one line of printable characters (a registry's words go into our one-line errors), shortened."""
    clean = "".join(c if c.isprintable() else "?" for c in " ".join(text.split()))
    return clean if len(clean) <= limit else clean[:limit] + "..."


def _shown(value: str) -> str:
    """A header value quoted in an error message: escaped, and shortened when long."""
    return repr(value) if len(value) <= _SHOWN else repr(value[:_SHOWN]) + "..."


def _opener(proxy: urllib.request.ProxyHandler, context: ssl.SSLContext) -> urllib.request.OpenerDirector:
    opener = urllib.request.OpenerDirector()
    for handler in (proxy, _HTTPHandler(), _HTTPSHandler(context)):
        opener.add_handler(handler)
    return opener


def _read_chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            yield chunk

"""A real OCI distribution registry for tests (Debian's docker-registry, distribution 2.8) on 127.0.0.1, with its
access log parsed, a bearer token service for it, and a fault-injecting proxy in front of it.

Configuration: https://distribution.github.io/distribution/about/configuration/; token auth:
https://distribution.github.io/distribution/spec/auth/jwt/."""

from __future__ import annotations

import base64
import contextlib
import http.client
import http.server
import json
import re
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

USER = "pusher"
PASSWORD = "right-horse-battery"
# `htpasswd -Bbn -C 5 pusher right-horse-battery`, kept here so tests need no apache2-utils; distribution reads
# only bcrypt entries.
HTPASSWD = "pusher:$2y$05$eUJbmyYDFw8zhbYMicQx8.iQvIkLvBiE3CzC3rTjhieQsxMTvlZhG\n"

_ACCESS_LINE = re.compile(r'"(?P<method>[A-Z]+) (?P<uri>\S+) HTTP/[\d.]+" (?P<status>\d{3}) ')


@dataclass(frozen=True)
class Request:
    """One line of the registry's access log."""

    method: str
    path: str
    query: dict[str, str]
    status: int


@dataclass(frozen=True)
class RegistryServer:
    host: str  # 127.0.0.1:PORT, as image references name it
    storage: Path  # the registry's filesystem storage root
    log: Path  # its stdout and stderr, the access log included
    ca_file: Path | None  # the self-signed certificate it serves, when it serves TLS

    def requests(self) -> list[Request]:
        found = []
        for line in self.log.read_text(errors="replace").splitlines():
            match = _ACCESS_LINE.search(line)
            if match:
                uri = urllib.parse.urlsplit(match["uri"])
                query = dict(urllib.parse.parse_qsl(uri.query))
                found.append(Request(match["method"], uri.path, query, int(match["status"])))
        return found

    def uploads(self, repository: str) -> list[str]:
        """Digests of the blobs uploaded into repository (completed PUTs of upload sessions)."""
        prefix = f"/v2/{repository}/blobs/uploads/"
        return [
            r.query["digest"]
            for r in self.requests()
            if r.method == "PUT" and r.path.startswith(prefix) and r.status == 201 and "digest" in r.query
        ]

    def mounts(self, repository: str) -> list[str]:
        """Digests of the blobs mounted into repository from another repository."""
        path = f"/v2/{repository}/blobs/uploads/"
        return [
            r.query["mount"]
            for r in self.requests()
            if r.method == "POST" and r.path == path and r.status == 201 and "mount" in r.query
        ]

    def writes(self) -> list[Request]:
        return [r for r in self.requests() if r.method in ("POST", "PUT", "PATCH", "DELETE")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def serve_registry(
    work: Path, *, auth: bool = False, tls: bool = False, token: TokenServer | None = None
) -> Iterator[RegistryServer]:
    """Run `docker-registry serve` on a free 127.0.0.1 port with storage under work; stop it afterwards.

    auth: htpasswd with USER/PASSWORD; token: bearer tokens from that service; tls: a fresh self-signed
    certificate for 127.0.0.1 (ca_file).
    """
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    listen: dict[str, object] = {"addr": f"127.0.0.1:{port}", "secret": "pipeline-tests"}
    config: dict[str, object] = {
        "version": "0.1",
        "log": {"level": "info", "formatter": "text", "accesslog": {"disabled": False}},
        "storage": {
            "filesystem": {"rootdirectory": str(work / "storage")},
            "maintenance": {"uploadpurging": {"enabled": False}},
        },
        "http": listen,
    }
    if auth:
        (work / "htpasswd").write_text(HTPASSWD)
        config["auth"] = {"htpasswd": {"realm": "pipeline-tests", "path": str(work / "htpasswd")}}
    if token:
        config["auth"] = {
            "token": {
                "realm": token.realm,
                "service": token.service,
                "issuer": token.issuer,
                "rootcertbundle": str(token.cert),
            }
        }
    ca_file = None
    if tls:
        ca_file = _self_signed_certificate(work)
        listen["tls"] = {"certificate": str(ca_file), "key": str(work / "key.pem")}
    (work / "config.yml").write_text(json.dumps(config, indent=2))  # JSON is YAML
    server = RegistryServer(f"127.0.0.1:{port}", work / "storage", work / "registry.log", ca_file)
    with open(server.log, "wb") as log:
        process = subprocess.Popen(
            ["docker-registry", "serve", str(work / "config.yml")], stdout=log, stderr=subprocess.STDOUT
        )
    try:
        _wait_until_up(server, process)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _self_signed_certificate(work: Path) -> Path:
    """work/cert.pem for 127.0.0.1, its key in work/key.pem."""
    cert = work / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-keyout", str(work / "key.pem"), "-out", str(cert),
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert


def _wait_until_up(server: RegistryServer, process: subprocess.Popen[bytes]) -> None:
    scheme = "https" if server.ca_file else "http"
    context = ssl.create_default_context(cafile=str(server.ca_file)) if server.ca_file else None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"docker-registry exited with {process.returncode}:\n{server.log.read_text()}")
        try:
            with urllib.request.urlopen(f"{scheme}://{server.host}/v2/", timeout=2, context=context):
                return
        except urllib.error.HTTPError:
            return  # 401 from an htpasswd registry: it is up
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"docker-registry did not answer on {server.host} within 30 s:\n{server.log.read_text()}")


class FlakyProxy:
    """An HTTP proxy on 127.0.0.1 in front of a registry that answers the first request of each (method, path
    kind) with 503 and cuts the connection of the second, before forwarding; `faults` counts what it broke.

    With always_fail, every request gets a 503 (to check that retries are bounded)."""

    def __init__(self, upstream: str, *, always_fail: bool = False) -> None:
        self.upstream = upstream
        self.always_fail = always_fail
        self.faults = 0
        self.seen: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.host = f"127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FlakyProxy:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _fault(self, method: str, path: str) -> str | None:
        """'503', 'cut' or None for this request."""
        # Upload session ids differ per request; the kind of request is what the path says before them.
        kind = re.sub(r"/uploads/[^/]+$", "/uploads/ID", path)
        with self._lock:
            count = self.seen[(method, kind)] = self.seen.get((method, kind), 0) + 1
            fault = "503" if self.always_fail or count == 1 else "cut" if count == 2 else None
            if fault:
                self.faults += 1
            return fault

    def _handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
                pass

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                fault = proxy._fault(self.command, urllib.parse.urlsplit(self.path).path)
                if fault == "503":
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if fault == "cut":
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                upstream = http.client.HTTPConnection(proxy.upstream, timeout=30)
                try:
                    # The Host header goes through unchanged, so the registry's Location URLs name the proxy.
                    upstream.request(self.command, self.path, body=body, headers=dict(self.headers))
                    answer = upstream.getresponse()
                    data = answer.read()
                finally:
                    upstream.close()
                self.send_response(answer.status, answer.reason)
                for name, value in answer.getheaders():
                    if name.lower() not in ("connection", "transfer-encoding", "date", "server"):
                        self.send_header(name, value)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _forward  # noqa: N815

        return Handler


class TokenServer:
    """A bearer token service on 127.0.0.1: USER with PASSWORD gets a JWT granting every action it asks for,
    signed (RS256, the certificate in the x5c header) with `openssl dgst`; anyone else gets 401.
    `granted` lists the scopes of each token it issued."""

    service = "pipeline-tests"
    issuer = "pipeline-tests-issuer"

    def __init__(self, work: Path) -> None:
        work.mkdir(parents=True, exist_ok=True)
        self.cert = _self_signed_certificate(work)
        self.key = work / "key.pem"
        self.granted: list[list[str]] = []
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.realm = f"http://127.0.0.1:{self._server.server_address[1]}/token"

    def __enter__(self) -> TokenServer:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def token(self, user: str, scopes: list[str]) -> str:
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            access.append({"type": kind, "name": name, "actions": actions.split(",")})
        now = int(time.time())
        der = ssl.PEM_cert_to_DER_cert(self.cert.read_text())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(der).decode()]}
        claims = {"iss": self.issuer, "sub": user, "aud": self.service, "iat": now, "nbf": now - 10,
                  "exp": now + 300, "jti": f"{now}-{len(self.granted)}", "access": access}  # fmt: skip
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        signature = subprocess.run(
            ["openssl", "dgst", "-sha256", "-sign", str(self.key)],
            input=signing_input.encode(), capture_output=True, check=True,
        ).stdout  # fmt: skip
        self.granted.append(scopes)
        return f"{signing_input}.{_b64url(signature)}"

    def _handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        service = self
        expected = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
                if self.headers.get("Authorization") != expected or query.get("service") != [service.service]:
                    self.send_response(401)
                    body = b'{"details": "wrong credentials"}'
                else:
                    self.send_response(200)
                    body = json.dumps({"token": service.token(USER, query.get("scope", []))}).encode()
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        return Handler


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

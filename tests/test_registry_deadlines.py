"""The registry client against registries that answer slowly or with hostile headers (issue 11, class 7): every
request ends within [registry] timeout, every operation within attempts x timeout, and whatever a header holds
the result is an answer or one RegistryError line naming the registry and the header, never a traceback.

A stand-in registry on 127.0.0.1 (a socket thread in this process) writes raw answers, so headers reach the
client exactly as given."""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.demo import build_sample_storage
from pipeline.errors import RegistryError
from pipeline.registry.client import (
    Blob,
    Options,
    Registry,
    _BadHeader,
    parse_challenge,
    parse_retry_after,
    resolve_location,
)
from tests.support.cli import error_lines, run_luigi

DIGEST = "sha256:" + "a" * 64
Answer = Callable[[str], bytes]  # the request's method -> the raw answer


class RawRegistry:
    """Answers each request with answer(method), all at once or one byte every `trickle` seconds, then closes."""

    def __init__(self, answer: Answer, *, trickle: float = 0.0, read_rate: float = 0.0) -> None:
        self.answer = answer
        self.trickle = trickle
        self.read_rate = read_rate  # bytes a second it reads a request body at (0: as fast as it comes)
        self.received = 0
        self.trickle_methods = {"GET", "HEAD", "POST", "PUT"}
        self.requests = 0
        self._server = socket.create_server(("127.0.0.1", 0))
        self.host = f"127.0.0.1:{self._server.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._server.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            self.requests += 1
            head, _, body = data.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            length = next(
                (int(v) for k, _, v in (x.partition(":") for x in lines[1:]) if k.lower() == "content-length"), 0
            )
            received = len(body)
            while received < length:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                received += len(chunk)
                if self.read_rate:
                    time.sleep(len(chunk) / self.read_rate)
            self.received = received
            method = lines[0].split(" ", 1)[0]
            answer = self.answer(method)
            try:
                if not self.trickle or method not in self.trickle_methods:
                    conn.sendall(answer)
                    return
                for i in range(len(answer)):
                    conn.sendall(answer[i : i + 1])
                    time.sleep(self.trickle)
            except OSError:  # the client gave up
                return


@pytest.fixture
def raw_registry() -> Iterator[Callable[..., RawRegistry]]:
    started: list[RawRegistry] = []

    def start(answer: Answer, *, trickle: float = 0.0, read_rate: float = 0.0) -> RawRegistry:
        server = RawRegistry(answer, trickle=trickle, read_rate=read_rate)
        started.append(server)
        return server

    yield start
    for server in started:
        server.close()


def _answer(status: str, *headers: bytes, body: bytes = b"") -> bytes:
    lines = [f"HTTP/1.1 {status}".encode(), *headers, b"Connection: close"]
    if not any(h.lower().startswith(b"content-length:") for h in headers):
        lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def _client(server: RawRegistry, **options: float) -> Registry:
    return Registry(server.host, Options(insecure=True, backoff=0.01, **options))  # type: ignore[arg-type]


def _one_line(error: pytest.ExceptionInfo[RegistryError], host: str) -> str:
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"registry {host}: "), message
    return message


# --- deadlines -------------------------------------------------------------------------------------------------------


def test_an_answer_trickled_a_byte_at_a_time_ends_at_the_timeout(raw_registry: Callable[..., RawRegistry]) -> None:
    server = raw_registry(lambda method: _answer("200 OK", b"Docker-Content-Digest: " + DIGEST.encode()), trickle=0.2)
    started = time.monotonic()
    with pytest.raises(RegistryError) as raised:
        _client(server, timeout=1, attempts=2).manifest_digest("app", "1")
    elapsed = time.monotonic() - started
    assert elapsed < 3, f"took {elapsed:.1f} s"
    message = _one_line(raised, server.host)
    assert "no complete answer within 1 s" in message and "check that the registry is up" in message
    assert server.requests == 2


def test_a_body_trickled_after_prompt_headers_ends_at_the_timeout(raw_registry: Callable[..., RawRegistry]) -> None:
    def answer(method: str) -> bytes:
        return _answer("200 OK", body=b"{}" * 50) if method == "GET" else _answer("200 OK")

    # The HEAD names no digest, so the manifest is fetched: its answer comes a byte every 0.2 s.
    server = raw_registry(answer, trickle=0.2)
    server.trickle_methods = {"GET"}
    started = time.monotonic()
    with pytest.raises(RegistryError) as raised:
        _client(server, timeout=1, attempts=2).manifest_digest("app", "1")
    assert time.monotonic() - started < 5
    assert "no complete answer within 1 s" in _one_line(raised, server.host)


def test_all_tries_together_stay_within_attempts_times_timeout(raw_registry: Callable[..., RawRegistry]) -> None:
    server = raw_registry(lambda method: _answer("503 Service Unavailable", b"Retry-After: 1"))
    started = time.monotonic()
    with pytest.raises(RegistryError) as raised:
        _client(server, timeout=0.3, attempts=10).manifest_digest("app", "1")  # 10 tries 1 s apart would take 9 s
    assert time.monotonic() - started < 3.5, "the budget of 10 x 0.3 s was overrun"
    assert "attempts x timeout" in _one_line(raised, server.host)
    assert 2 <= server.requests <= 4


def test_an_upload_lasts_as_long_as_it_moves(raw_registry: Callable[..., RawRegistry], tmp_path: Path) -> None:
    size = 32 << 20
    layer = tmp_path / "layer"
    with open(layer, "wb") as f:
        f.truncate(size)
    # 16 MiB a second: 2 s for the whole blob, each 1 MiB well within the 1 s timeout.
    server = raw_registry(lambda method: _answer("201 Created"), read_rate=16 << 20)
    blob = Blob("sha256:" + hashlib.sha256(bytes(size)).hexdigest(), size, "application/octet-stream", path=layer)
    started = time.monotonic()
    _client(server, timeout=1, attempts=2).upload_blob("app", blob, session=f"http://{server.host}/upload/1")
    assert time.monotonic() - started > 1.5 and server.received == size and server.requests == 1


# --- hostile headers -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "header"),
    [
        (_answer("200 OK", b"Content-Length: twelve"), "Content-Length"),
        (_answer("200 OK", b"Content-Length: 99999999999999999"), "Content-Length"),
        (_answer("200 OK", b"Content-Length: 9" + b"9" * 5000), "Content-Length"),
        (_answer("200 OK", b"Content-Length: 2", b"Content-Length: 3", body=b"{}"), "Content-Length"),
        (_answer("200 OK", b"Docker-Content-Digest: \xff\xfe not a digest"), "Docker-Content-Digest"),
        (_answer("401 Unauthorized", "WWW-Authenticate: Négociation \x01\x7f garbage".encode()), "WWW-Authenticate"),
        (_answer("401 Unauthorized", b'WWW-Authenticate: Bearer realm="http://[::1"'), "WWW-Authenticate"),
        (_answer("401 Unauthorized", b'WWW-Authenticate: Bearer realm="ftp://127.0.0.1/t"'), "WWW-Authenticate"),
        (_answer("401 Unauthorized", b"WWW-Authenticate: Bearer service=x"), "WWW-Authenticate"),
        (_answer("503 Service Unavailable", b"Retry-After: soon, maybe"), "Retry-After"),
        (_answer("503 Service Unavailable", b"Retry-After: \xb2"), "Retry-After"),
        (_answer("503 Service Unavailable", b"Retry-After: 99999999999999999999999"), "Retry-After"),
        (_answer("429 Too Many Requests", b"Retry-After: Fri, 31 Dec 9999 23:59:59 GMT"), "Retry-After"),
    ],
)
def test_hostile_headers_are_one_error_naming_the_header(
    raw_registry: Callable[..., RawRegistry], answer: bytes, header: str
) -> None:
    server = raw_registry(lambda method: answer)
    started = time.monotonic()
    with pytest.raises(RegistryError) as raised:
        _client(server, timeout=2, attempts=2).manifest_digest("app", "1")
    assert time.monotonic() - started < 3
    assert f"its {header} header " in _one_line(raised, server.host)


@pytest.mark.parametrize(
    "location",
    [b"http://198.51.100.7/v2/app/blobs/uploads/1", b"https://127.0.0.1:1/upload", b"http://[::1", b"//evil/x",
     b"http://127.0.0.1:notaport/x", b"javascript:alert(1)", "/v2/app/blobs/uploads/\u00e9 x".encode()],
)  # fmt: skip
def test_a_location_that_leaves_the_registry_is_refused(
    raw_registry: Callable[..., RawRegistry], location: bytes
) -> None:
    server = raw_registry(lambda method: _answer("202 Accepted", b"Location: " + location))
    with pytest.raises(RegistryError) as raised:
        _client(server, timeout=2, attempts=1).mount_blob("app", DIGEST, "other")
    assert "its Location header " in _one_line(raised, server.host)
    assert server.requests == 1  # nothing was sent where it pointed


def test_a_location_on_the_registry_itself_is_followed(raw_registry: Callable[..., RawRegistry]) -> None:
    server = raw_registry(lambda method: _answer("202 Accepted", b"Location: /v2/app/blobs/uploads/1?state=x"))
    url = _client(server, attempts=1).mount_blob("app", DIGEST, "other")
    assert url == f"http://{server.host}/v2/app/blobs/uploads/1?state=x"


def test_retry_after_as_seconds_or_a_date() -> None:
    now = datetime(2026, 11, 28, 4, 0, tzinfo=UTC)
    assert parse_retry_after(" 7 ") == 7.0
    assert parse_retry_after("Sat, 28 Nov 2026 04:00:30 GMT", now) == 30.0
    assert parse_retry_after("Sat, 28 Nov 2026 03:00:00 GMT", now) == 0.0
    with pytest.raises(_BadHeader, match="Retry-After"):
        parse_retry_after("-1")


# --- fuzzing the header parsing ------------------------------------------------------------------------------------

_HEADER_BYTES = st.binary(max_size=200).filter(lambda b: b"\r" not in b and b"\n" not in b)
_HEADER_TEXT = st.text(max_size=200)


@settings(max_examples=300, deadline=None)
@given(value=_HEADER_TEXT)
def test_header_parsers_answer_or_name_the_header(value: str) -> None:
    for parse, header in (
        (parse_retry_after, "Retry-After"),
        (parse_challenge, "WWW-Authenticate"),
        (lambda v: resolve_location("http://127.0.0.1:5000", v), "Location"),
    ):
        try:
            parse(value)
        except _BadHeader as e:
            assert f"its {header} header " in str(e) and "\n" not in str(e)


_FUZZED = {
    # header -> (status, the call that reads it)
    "Content-Length": ("200 OK", lambda r: r.manifest_digest("app", "1")),
    "Docker-Content-Digest": ("200 OK", lambda r: r.manifest_digest("app", "1")),
    "WWW-Authenticate": ("401 Unauthorized", lambda r: r.manifest_digest("app", "1")),
    "Retry-After": ("503 Service Unavailable", lambda r: r.manifest_digest("app", "1")),
    "Location": ("202 Accepted", lambda r: r.mount_blob("app", DIGEST, "other")),
}


@pytest.fixture(scope="module")
def fuzzed_registry() -> Iterator[tuple[RawRegistry, Registry]]:
    server = RawRegistry(lambda method: b"")
    yield server, Registry(server.host, Options(insecure=True, timeout=2, attempts=1))
    server.close()


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=st.sampled_from(sorted(_FUZZED)), value=_HEADER_BYTES)
def test_fuzzed_headers_over_http_give_an_answer_or_one_registry_error(
    fuzzed_registry: tuple[RawRegistry, Registry], header: str, value: bytes
) -> None:
    server, registry = fuzzed_registry
    status, call = _FUZZED[header]
    server.answer = lambda method: _answer(status, header.encode() + b": " + value, body=b"{}")
    try:
        call(registry)
    except RegistryError as e:
        assert "\n" not in str(e) and str(e).startswith(f"registry {server.host}: ")


# --- through the command line -----------------------------------------------------------------------------------------


@pytest.mark.root
def test_a_push_to_a_trickling_registry_ends_in_one_error_line(
    raw_registry: Callable[..., RawRegistry], tmp_path: Path
) -> None:
    root = tmp_path / "storage"
    build_sample_storage(root)
    server = raw_registry(lambda method: _answer("200 OK"), trickle=0.2)
    result = run_luigi(
        "PushImage", "--id", "demo-web", "--image", f"{server.host}/app:1", "--storage-root", str(root),
        "--commit-cache-dir", str(tmp_path / "cache"), "--commit-output-dir", str(tmp_path / "out"),
        "--registry-insecure", "true", "--registry-timeout", "1", "--registry-attempts", "2",
        "--registry-backoff", "0.01",
        env={"DOCKER_CONFIG": str(tmp_path / "no-docker-config"), "PIPELINE_REGISTRY_USERNAME": "",
             "PIPELINE_REGISTRY_PASSWORD": ""},
    )  # fmt: skip
    assert result.returncode != 0
    errors = error_lines(result)
    assert len(errors) == 1, result.stderr
    assert errors[0].startswith(f"ERROR: registry {server.host}: ") and "no complete answer within 1 s" in errors[0]
    assert "Traceback" not in result.stderr

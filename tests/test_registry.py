"""Pushing to an OCI distribution registry: a real docker-registry on 127.0.0.1, pulled back with skopeo and umoci
and compared with the container's merged view; skips, mounts, retries, credentials and TLS."""

import base64
import hashlib
import json
import os
import stat
import subprocess
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.errors import InvalidReference, RegistryError
from pipeline.image.imageconfig import digest_of, encode_json
from pipeline.layer.writer import LayerRecord
from pipeline.registry.client import Options, Registry, is_loopback
from pipeline.registry.credentials import ENV_PASSWORD, ENV_USERNAME, Credentials, find_credentials
from pipeline.registry.push import Image, PushedBlobs, parse_push_reference, prepare_image, push_image
from pipeline.store.cache import LayerCache
from tests.support.cli import error_lines, run_luigi
from tests.support.fleet import add_container
from tests.support.imagecheck import compare_trees
from tests.support.overlay_storage import (
    RockerStorage,
    TreeView,
    build_rocker_storage,
    container_id_for,
    read_tree,
)
from tests.support.registry_server import (
    PASSWORD,
    USER,
    FlakyProxy,
    RegistryServer,
    TokenServer,
    serve_registry,
)

INSECURE = Options(insecure=True, backoff=0.01)
ENV_NAMES = (ENV_USERNAME, ENV_PASSWORD)


# --- a synthetic image in a cache, for the plain client (no root needed) ------------------------------------------


def _image(cache: LayerCache, *layers: bytes) -> Image:
    """An image whose layers are the given bytes (a registry does not look inside them), cached like packed ones."""
    records = []
    for data in layers:
        record = LayerRecord(digest_of(data), len(data))
        path = cache.blob_path(record.diff_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        records.append(record)
    rootfs = {"type": "layers", "diff_ids": [r.diff_id for r in records]}
    config = encode_json({"architecture": "amd64", "os": "linux", "rootfs": rootfs})
    return prepare_image(config, records, cache)


@pytest.fixture
def registry_server(tmp_path: Path) -> Iterator[RegistryServer]:
    with serve_registry(tmp_path / "registry") as server:
        yield server


@pytest.mark.tools("docker-registry")
def test_push_then_tag_resolves_to_the_manifest_digest(registry_server: RegistryServer, tmp_path: Path) -> None:
    image = _image(LayerCache(tmp_path / "cache"), b"base layer", b"top layer")
    registry = Registry(registry_server.host, INSECURE)
    result = push_image(registry, parse_push_reference(f"{registry_server.host}/app:1"), image)
    assert result.digest == image.digest
    assert registry.manifest_digest("app", "1") == image.digest
    assert registry.manifest_digest("app", "2") is None
    assert sorted(result.uploaded) == sorted(registry_server.uploads("app"))
    assert len(result.uploaded) == 3 and not result.mounted and not result.present  # two layers and the config


@pytest.mark.tools("docker-registry")
def test_blobs_already_in_the_repository_are_not_uploaded_again(
    registry_server: RegistryServer, tmp_path: Path
) -> None:
    cache = LayerCache(tmp_path / "cache")
    registry = Registry(registry_server.host, INSECURE)
    push_image(registry, parse_push_reference(f"{registry_server.host}/app:1"), _image(cache, b"base", b"one"))
    before = len(registry_server.uploads("app"))
    second = push_image(registry, parse_push_reference(f"{registry_server.host}/app:2"), _image(cache, b"base", b"two"))
    assert second.present == (digest_of(b"base"),)
    assert len(registry_server.uploads("app")) == before + 2  # the new layer and the new config


@pytest.mark.tools("docker-registry")
def test_blob_known_in_another_repository_is_mounted(registry_server: RegistryServer, tmp_path: Path) -> None:
    cache = LayerCache(tmp_path / "cache")
    pushed = PushedBlobs.in_cache(tmp_path / "cache", registry_server.host)
    registry = Registry(registry_server.host, INSECURE)
    push_image(registry, parse_push_reference(f"{registry_server.host}/one:1"), _image(cache, b"base", b"a"), pushed)
    result = push_image(
        registry, parse_push_reference(f"{registry_server.host}/two:1"), _image(cache, b"base", b"b"), pushed
    )
    assert result.mounted == (digest_of(b"base"),)
    assert registry_server.mounts("two") == [digest_of(b"base")]
    assert digest_of(b"base") not in registry_server.uploads("two")
    assert pushed.sources(digest_of(b"base")) == ["two", "one"]


@pytest.mark.tools("docker-registry")
def test_mount_from_a_repository_that_lacks_the_blob_falls_back_to_upload(
    registry_server: RegistryServer, tmp_path: Path
) -> None:
    cache = LayerCache(tmp_path / "cache")
    pushed = PushedBlobs.in_cache(tmp_path / "cache", registry_server.host)
    pushed.add("ghost", [digest_of(b"layer")])  # a stale record: "ghost" never got it
    result = push_image(
        Registry(registry_server.host, INSECURE),
        parse_push_reference(f"{registry_server.host}/app:1"),
        _image(cache, b"layer"),
        pushed,
    )
    assert digest_of(b"layer") in result.uploaded and not result.mounted
    assert [r.status for r in registry_server.requests() if r.query.get("from") == "ghost"] == [202]


@pytest.mark.tools("docker-registry")
def test_upload_streams_the_layer_from_its_file(registry_server: RegistryServer, tmp_path: Path) -> None:
    cache = LayerCache(tmp_path / "cache")
    size = 48 << 20
    blob = tmp_path / "big"
    with open(blob, "wb") as f:
        f.truncate(size)  # sparse: cheap to write, still 48 MiB to send
    with open(blob, "rb") as f:
        digest = "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()
    path = cache.blob_path(digest)
    path.parent.mkdir(parents=True)
    os.rename(blob, path)
    records = [LayerRecord(digest, size)]
    config = encode_json({"rootfs": {"type": "layers", "diff_ids": [digest]}})
    image = prepare_image(config, records, cache)
    tracemalloc.start()
    try:
        push_image(Registry(registry_server.host, INSECURE), parse_push_reference(f"{registry_server.host}/b:1"), image)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert digest in registry_server.uploads("b")
    assert peak < 8 << 20, f"the upload held {peak} bytes at once"


@pytest.mark.tools("docker-registry")
def test_5xx_answers_and_cut_connections_are_retried(registry_server: RegistryServer, tmp_path: Path) -> None:
    image = _image(LayerCache(tmp_path / "cache"), b"base", b"top")
    with FlakyProxy(registry_server.host) as proxy:
        registry = Registry(proxy.host, INSECURE)
        result = push_image(registry, parse_push_reference(f"{proxy.host}/app:1"), image)
        assert registry.manifest_digest("app", "1") == image.digest
    assert result.digest == image.digest
    assert proxy.faults >= 8  # a 503 and a cut for each kind of request: HEAD blob, POST, PUT blob, PUT manifest


@pytest.mark.tools("docker-registry")
def test_retries_are_bounded_and_end_in_one_line(registry_server: RegistryServer, tmp_path: Path) -> None:
    with FlakyProxy(registry_server.host, always_fail=True) as proxy:
        registry = Registry(proxy.host, Options(insecure=True, attempts=3, backoff=0.01))
        with pytest.raises(RegistryError) as raised:
            registry.manifest_digest("app", "1")
    assert proxy.faults == 3
    message = str(raised.value)
    assert "\n" not in message and f"registry {proxy.host}: " in message and "failed 3 times" in message


@pytest.mark.tools("docker-registry")
def test_plain_http_registry_without_insecure_fails_the_tls_handshake(registry_server: RegistryServer) -> None:
    with pytest.raises(RegistryError, match=r"TLS handshake failed .*set \[registry\] insecure = true"):
        Registry(registry_server.host).manifest_digest("app", "1")


def test_insecure_is_refused_for_a_host_that_is_not_loopback() -> None:
    with pytest.raises(RegistryError, match=r"^registry registry\.example\.com:5000: \[registry\] insecure allows"):
        Registry("registry.example.com:5000", Options(insecure=True))
    assert Registry("[::1]:5000", Options(insecure=True)).base_url == "http://[::1]:5000"
    assert Registry("localhost:5000", Options(insecure=True)).base_url == "http://localhost:5000"
    assert Registry("registry.example.com").base_url == "https://registry.example.com"


def test_loopback_hosts() -> None:
    assert is_loopback("127.0.0.1:5000") and is_loopback("127.1.2.3") and is_loopback("[::1]:443")
    assert is_loopback("localhost") and is_loopback("LOCALHOST:5000")
    assert not is_loopback("10.0.0.1:5000") and not is_loopback("localhost.example.com") and not is_loopback("[::2]")


def test_push_reference_needs_a_registry_host() -> None:
    assert parse_push_reference("127.0.0.1:5000/team/app:1").path == "team/app"
    assert parse_push_reference("localhost/app").tag == "latest"
    with pytest.raises(InvalidReference, match="names no registry host; use e.g. --image registry.example.com/app:1"):
        parse_push_reference("app:1")


# --- credentials ----------------------------------------------------------------------------------------------------


def _docker_config(directory: Path, doc: object) -> dict[str, str]:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(doc))
    return {"DOCKER_CONFIG": str(directory)}


def _auth(user: str, password: str) -> str:
    return base64.b64encode(f"{user}:{password}".encode()).decode()


def test_credentials_come_from_the_environment_first(tmp_path: Path) -> None:
    env = _docker_config(tmp_path, {"auths": {"reg:5000": {"auth": _auth("file-user", "x")}}})
    env |= {"PIPELINE_REGISTRY_USERNAME": "env-user", "PIPELINE_REGISTRY_PASSWORD": "secret"}
    assert find_credentials("reg:5000", env) == Credentials("env-user", "secret", "$PIPELINE_REGISTRY_USERNAME")
    with pytest.raises(RegistryError, match="only one of"):
        find_credentials("reg:5000", {"PIPELINE_REGISTRY_USERNAME": "env-user"})


def test_credentials_from_docker_config_auths(tmp_path: Path) -> None:
    env = _docker_config(
        tmp_path,
        {
            "auths": {
                "https://reg.example.com:5000/v1/": {"auth": _auth("user", "pa:ss")},
                "https://index.docker.io/v1/": {"auth": _auth("hubuser", "hubpass")},
            }
        },
    )
    found = find_credentials("reg.example.com:5000", env)
    assert found is not None and (found.username, found.password) == ("user", "pa:ss")
    hub = find_credentials("docker.io", env)
    assert hub is not None and hub.username == "hubuser"
    assert find_credentials("other.example.com", env) is None
    assert find_credentials("reg.example.com:5000", {"HOME": str(tmp_path / "nobody")}) is None
    assert "pa:ss" not in repr(found)


def test_credentials_from_a_credential_helper(tmp_path: Path) -> None:
    helper = tmp_path / "bin" / "docker-credential-fake"
    helper.parent.mkdir()
    helper.write_text(
        '#!/bin/sh\nread server\n[ "$server" = "reg:5000" ] || { echo "credentials not found" >&2; exit 1; }\n'
        'echo \'{"ServerURL": "reg:5000", "Username": "helped", "Secret": "s3"}\'\n'
    )
    helper.chmod(helper.stat().st_mode | stat.S_IXUSR)
    env = _docker_config(tmp_path / "conf", {"credHelpers": {"reg:5000": "fake"}, "credsStore": "fake"})
    env["PATH"] = f"{helper.parent}:{os.environ['PATH']}"
    old_path = os.environ["PATH"]
    os.environ["PATH"] = env["PATH"]  # subprocess looks the helper up in this process's PATH
    try:
        found = find_credentials("reg:5000", env)
        assert find_credentials("elsewhere:5000", env) is None
    finally:
        os.environ["PATH"] = old_path
    assert found is not None and (found.username, found.password) == ("helped", "s3")


def test_unreadable_docker_config_is_a_one_line_error(tmp_path: Path) -> None:
    env = _docker_config(tmp_path, {})
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(RegistryError, match=r"config\.json: cannot read registry credentials .*; fix the file"):
        find_credentials("reg:5000", env)


@pytest.mark.tools("docker-registry")
def test_htpasswd_registry_accepts_the_right_password_and_refuses_others(tmp_path: Path) -> None:
    image = _image(LayerCache(tmp_path / "cache"), b"layer")
    with serve_registry(tmp_path / "registry", auth=True) as server:
        reference = parse_push_reference(f"{server.host}/app:1")
        right = Credentials(USER, PASSWORD, "test")
        assert push_image(Registry(server.host, INSECURE, right), reference, image).digest == image.digest
        with pytest.raises(RegistryError) as wrong:
            Registry(server.host, INSECURE, Credentials(USER, "wrong", "test")).manifest_digest("app", "1")
        with pytest.raises(RegistryError) as anonymous:
            Registry(server.host, INSECURE).manifest_digest("app", "1")
    assert str(wrong.value).startswith(f"registry {server.host}: ") and "user 'pusher' (from test) was refused" in str(
        wrong.value
    )
    assert "it requires credentials; run `docker login" in str(anonymous.value)


@pytest.mark.tools("docker-registry", "openssl")
def test_bearer_tokens_from_the_registry_s_token_service(tmp_path: Path) -> None:
    cache = LayerCache(tmp_path / "cache")
    pushed = PushedBlobs.in_cache(tmp_path / "cache", "any")
    right = Credentials(USER, PASSWORD, "test")
    with TokenServer(tmp_path / "tokens") as tokens, serve_registry(tmp_path / "registry", token=tokens) as server:
        registry = Registry(server.host, INSECURE, right)
        push_image(registry, parse_push_reference(f"{server.host}/one:1"), _image(cache, b"base", b"a"), pushed)
        result = push_image(
            registry, parse_push_reference(f"{server.host}/two:1"), _image(cache, b"base", b"b"), pushed
        )
        assert result.mounted == (digest_of(b"base"),)
        with pytest.raises(RegistryError) as wrong:
            Registry(server.host, INSECURE, Credentials(USER, "wrong", "test")).manifest_digest("one", "1")
        with pytest.raises(RegistryError) as anonymous:
            Registry(server.host, INSECURE).manifest_digest("one", "1")
    # One token per scope, not one per request; the mount's token also covers reading the source repository.
    assert sorted(" ".join(g) for g in tokens.granted) == [
        "repository:one:pull",
        "repository:one:pull,push",
        "repository:two:pull",
        "repository:two:pull,push",
        "repository:two:pull,push repository:one:pull",
    ]
    assert "user 'pusher' (from test) was refused (401" in str(wrong.value)
    assert "it requires credentials" in str(anonymous.value)


@pytest.mark.tools("docker-registry", "openssl")
def test_tls_is_verified_by_default(tmp_path: Path) -> None:
    image = _image(LayerCache(tmp_path / "cache"), b"layer")
    with serve_registry(tmp_path / "registry", tls=True) as server:
        assert server.ca_file is not None
        reference = parse_push_reference(f"{server.host}/app:1")
        with pytest.raises(RegistryError, match=r"its TLS certificate is not trusted .*\[registry\] ca_file"):
            push_image(Registry(server.host), reference, image)
        trusted = Registry(server.host, Options(ca_file=str(server.ca_file)))
        assert push_image(trusted, reference, image).digest == image.digest


# --- the luigi task, end to end ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def storage(tmp_path_factory: pytest.TempPathFactory) -> tuple[RockerStorage, str, TreeView]:
    """web-1 on the two-layer image, plus web-2 on the same image layers (its own top layer differs)."""
    built = build_rocker_storage(tmp_path_factory.mktemp("push") / "rocker")
    view = add_container(built.root, "web-2", {"srv/second.txt": b"only in web-2\n"})
    return built, container_id_for("web-2"), view


def _push(
    root: Path, work: Path, container: str, image: str, *, insecure: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`luigi --module pipeline PushImage`, with no credentials but those in env (none from this host's)."""
    isolated = {"DOCKER_CONFIG": str(work / "no-docker-config")} | dict.fromkeys(ENV_NAMES, "")
    return run_luigi(
        "PushImage",
        "--id", container, "--image", image,
        "--storage-root", str(root),
        "--commit-cache-dir", str(work / "cache"), "--commit-output-dir", str(work / "out"),
        "--registry-backoff", "0.05",
        *(["--registry-insecure", "true"] if insecure else []),
        env=isolated | (env or {}),
    )  # fmt: skip


def _manifest(reference: str) -> Any:
    """The manifest reference points at, as skopeo reads it from the registry."""
    argv = ["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{reference}"]
    return json.loads(subprocess.run(argv, capture_output=True, text=True, check=True).stdout)


@pytest.mark.overlay
@pytest.mark.tools
@pytest.mark.tools("docker-registry")
def test_pushed_image_pulls_back_as_the_merged_view(
    storage: tuple[RockerStorage, str, TreeView], registry_server: RegistryServer, tmp_path: Path
) -> None:
    built = storage[0]
    reference = f"{registry_server.host}/web:1"
    result = _push(built.root, tmp_path, built.container_id, reference)
    assert result.returncode == 0, result.stderr
    assert len(registry_server.uploads("web")) == 4  # three layers and the config
    layout = tmp_path / "oci"
    subprocess.run(
        ["skopeo", "--insecure-policy", "copy", "--quiet", "--src-tls-verify=false", f"docker://{reference}",
         f"oci:{layout}:check"],
        check=True, capture_output=True,
    )  # fmt: skip
    subprocess.run(["umoci", "unpack", "--image", f"{layout}:check", str(tmp_path / "bundle")], check=True)
    compare_trees(built.merged, read_tree(tmp_path / "bundle/rootfs"), label="skopeo from the registry + umoci")

    writes = len(registry_server.writes())
    again = _push(built.root, tmp_path, built.container_id, reference)
    assert again.returncode == 0, again.stderr
    assert "1 complete ones were encountered" in again.stderr
    assert len(registry_server.writes()) == writes, "a second push of the same commit wrote to the registry"


@pytest.mark.overlay
@pytest.mark.tools
@pytest.mark.tools("docker-registry")
def test_second_container_sharing_base_layers_uploads_only_its_own_layer(
    storage: tuple[RockerStorage, str, TreeView], registry_server: RegistryServer, tmp_path: Path
) -> None:
    built, second, _ = storage
    first = _push(built.root, tmp_path, built.container_id, f"{registry_server.host}/web:1")
    assert first.returncode == 0, first.stderr
    result = _push(built.root, tmp_path, second, f"{registry_server.host}/other:1")
    assert result.returncode == 0, result.stderr
    manifest = _manifest(f"{registry_server.host}/other:1")
    layers, config = [layer["digest"] for layer in manifest["layers"]], manifest["config"]["digest"]
    assert sorted(registry_server.uploads("other")) == sorted([layers[-1], config])
    assert sorted(registry_server.mounts("other")) == sorted(layers[:-1])


@pytest.mark.overlay
@pytest.mark.tools("docker-registry")
def test_a_tag_moved_since_the_push_is_pushed_again(
    storage: tuple[RockerStorage, str, TreeView], registry_server: RegistryServer, tmp_path: Path
) -> None:
    built, second, _ = storage
    reference = f"{registry_server.host}/web:1"
    for container in (built.container_id, second, built.container_id):
        result = _push(built.root, tmp_path, container, reference)
        assert result.returncode == 0, result.stderr
    assert "1 ran successfully" in result.stderr  # the target is the registry's tag, not a file here
    manifests = [r for r in registry_server.writes() if r.method == "PUT" and "/manifests/" in r.path]
    assert len(manifests) == 3
    assert len(registry_server.uploads("web")) == 4 + 2  # web-2 added its own layer and config, web-1 nothing


@pytest.mark.overlay
@pytest.mark.tools("docker-registry")
def test_htpasswd_credentials_from_the_environment_or_docker_config(
    storage: tuple[RockerStorage, str, TreeView], tmp_path: Path
) -> None:
    built = storage[0]
    with serve_registry(tmp_path / "registry", auth=True) as server:
        by_env = {"PIPELINE_REGISTRY_USERNAME": USER, "PIPELINE_REGISTRY_PASSWORD": PASSWORD}
        result = _push(built.root, tmp_path, built.container_id, f"{server.host}/web:env", env=by_env)
        assert result.returncode == 0, result.stderr
        by_file = _docker_config(tmp_path / "docker", {"auths": {server.host: {"auth": _auth(USER, PASSWORD)}}})
        result = _push(built.root, tmp_path, built.container_id, f"{server.host}/web:file", env=by_file)
        assert result.returncode == 0, result.stderr
        registry = Registry(server.host, INSECURE, Credentials(USER, PASSWORD, "test"))
        assert registry.manifest_digest("web", "env") and registry.manifest_digest("web", "file")


@pytest.mark.overlay
@pytest.mark.tools("docker-registry")
def test_wrong_password_fails_with_one_line_error_naming_the_registry(
    storage: tuple[RockerStorage, str, TreeView], tmp_path: Path
) -> None:
    built = storage[0]
    with serve_registry(tmp_path / "registry", auth=True) as server:
        wrong = {"PIPELINE_REGISTRY_USERNAME": USER, "PIPELINE_REGISTRY_PASSWORD": "wrong"}
        reference = f"{server.host}/web:1"
        for attempt in ("fresh", "again"):  # first from run(), then from the target's check in complete()
            result = _push(built.root, tmp_path, built.container_id, reference, env=wrong)
            assert result.returncode != 0, attempt
            errors = error_lines(result)
            assert len(errors) == 1, (attempt, result.stderr)
            assert errors[0].startswith(f"ERROR: registry {server.host}: "), errors
            assert "user 'pusher' (from $PIPELINE_REGISTRY_USERNAME) was refused" in errors[0]
            assert "Traceback" not in result.stderr, result.stderr
        assert not server.uploads("web")


@pytest.mark.overlay
@pytest.mark.tools("docker-registry")
def test_push_without_insecure_to_a_plain_http_registry_fails_cleanly(
    storage: tuple[RockerStorage, str, TreeView], registry_server: RegistryServer, tmp_path: Path
) -> None:
    built = storage[0]
    result = _push(built.root, tmp_path, built.container_id, f"{registry_server.host}/web:1", insecure=False)
    assert result.returncode != 0
    errors = error_lines(result)
    assert len(errors) == 1 and "TLS handshake failed" in errors[0], result.stderr
    assert not registry_server.writes()


def test_push_reference_without_a_host_is_refused_on_the_command_line(tmp_path: Path) -> None:
    result = run_luigi("PushImage", "--id", "web-1", "--image", "web:1", "--storage-root", str(tmp_path))
    assert result.returncode != 0
    assert any("names no registry host" in line for line in error_lines(result)), result.stderr

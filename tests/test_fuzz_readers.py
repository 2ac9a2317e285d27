"""Fuzzed readers (issue 11, class 5): every value that comes from the storage, a cache, the catalog or --config can
be anything. Hostile values of any type, depth, size or encoding are written into real files of storages built by
the test builders, at a random place of a valid document; each reader then either refuses with one PipelineError
naming the file (and the field), or gives an image config every consumer accepts.

The engine readers run in-process with pipeline.assembly.build_config_bytes, as WriteImageConfig does; two command
line runs check that such a refusal is one ERROR line and no traceback.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import io
import json
import logging
import os
import re
import shutil
import tarfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from pipeline.assembly import build_config_bytes
from pipeline.demo import build_sample_storage
from pipeline.engines.boltdb import BoltFile
from pipeline.engines.container import Storage
from pipeline.engines.docker import DockerStorage
from pipeline.engines.podman import PodmanStorage
from pipeline.engines.rocker import RockerStorage
from pipeline.errors import InvalidChange, LayerError, PipelineError, StorageError
from pipeline.image.dockerfile import apply_changes
from pipeline.image.imageconfig import CommitOptions
from pipeline.layer import tarsplit
from pipeline.layer.writer import LayerRecord, encode_record, read_record, write_layer
from pipeline.logformat import OneLineErrors
from pipeline.plan import read_config_file, read_state
from pipeline.snapshots.catalog import SnapshotRecord, format_table
from pipeline.store.cache import LayerCache
from pipeline.store.compression import MEDIA_TYPES, StoredBlob, find_blob, mapping_path
from tests.support.boltdb_file import build_bolt_file
from tests.support.cli import commit_args, error_lines, run_luigi
from tests.support.overlay_storage import requires_root_reason

# PIPELINE_FUZZ_EXAMPLES=5000 runs a longer campaign; the default keeps the whole file under a minute.
_EXAMPLES = int(os.environ.get("PIPELINE_FUZZ_EXAMPLES", "120"))
FUZZ = settings(
    max_examples=_EXAMPLES,
    deadline=None,
    # The storages are module fixtures: each example writes its files and puts the originals back.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
CHEAP = settings(FUZZ, max_examples=_EXAMPLES * 5 // 3)

# --- hostile JSON ----------------------------------------------------------------------------------------------

_PLACEHOLDER = "\x00fuzzed value\x00"
# Keys an attacker would add where a document has none: every image-config field and what the readers look up.
_KEYS = (
    *("Env", "Cmd", "Entrypoint", "Labels", "ExposedPorts", "Volumes", "WorkingDir", "User", "StopSignal"),
    *("Healthcheck", "OnBuild", "Shell", "StopTimeout", "Hostname", "Domainname", "Tty", "ArgsEscaped", "Image"),
    *("State", "Config", "Running", "Paused", "Pid", "Created", "Name", "Driver", "ID", "Repository", "Tag"),
    *("architecture", "os", "variant", "os.version", "os.features", "history", "created", "created_by"),
    *("empty_layer", "config", "rootfs", "image_layer_info", "Layers", "Digest", "Test", "Interval", "Retries"),
    *("state", "pid", "names", "created", "image", "layer", "parent", "diff-digest", "flags", "metadata"),
    *("rootfsImageName", "entrypoint", "command", "user", "labels", "exposedPorts", "newPortMappings", "spec"),
    *("process", "env", "cwd", "container_port", "protocol", "diff_id", "size", "fingerprint", "digest"),
)
_STRINGS = st.text(st.characters(exclude_categories=()), max_size=12)  # lone surrogates included
_TELLING_STRINGS = st.sampled_from(
    ["", "80/tcp", "8080", "0/tcp", "65536/udp", "80/xyz", "1-2/tcp", "A=1", "2024-01-02T03:04:05Z", "yesterday",
     "sha256:" + "0" * 64, "\ud800", "a\udfffb", "\udcff", "x=y=z", "true", "3", "../../etc", "\x00", "\n"]
)  # fmt: skip
_NUMBERS = st.one_of(
    st.integers(),
    st.sampled_from([0, 1, 3, -1, 65535, 65536, 4_194_304, 4_194_305, 2**31, 2**63 - 1, 2**63, -(2**63) - 1, 10**30]),
    st.floats(),  # nan and infinities included: json.dumps writes NaN and Infinity
)
_SCALARS = st.one_of(st.none(), st.booleans(), _NUMBERS, _STRINGS, _TELLING_STRINGS)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_STRINGS | _TELLING_STRINGS, inner, max_size=4),
    max_leaves=12,
)
# JSON text json.dumps cannot write: nesting past Python's stack, numbers past float64, raw surrogate escapes.
_RAW = st.sampled_from(
    ["1e400", "-1e400", "1" * 400, "-" + "9" * 320, "1" * 5000, "0.1e-400", "NaN", "-Infinity", "[" * 70 + "]" * 70,
     "[" * 100_000 + "]" * 100_000, '{"a":' * 5000 + "1" + "}" * 5000, '"\\ud800"', '["a\\udfffb"]',
     '{"\\udc80": "x"}', '"' + "x" * 200_000 + '"', '{"80/tcp": {}, "\\ud800/tcp": {}}']
)  # fmt: skip
FRAGMENTS = st.one_of(_VALUES.map(json.dumps), _RAW)


def json_paths(doc: Any) -> list[tuple[Any, ...]]:
    """Every place in doc (as a path of keys and indexes), the root included."""
    paths: list[tuple[Any, ...]] = []
    stack: list[tuple[tuple[Any, ...], Any]] = [((), doc)]
    while stack:
        path, node = stack.pop()
        paths.append(path)
        children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        stack.extend((path + (key,), child) for key, child in children)
    return sorted(paths, key=repr)


@st.composite
def mutated(draw: st.DrawFn, doc: Any) -> bytes:
    """doc as JSON with one value replaced, or one key added to an object, by a hostile JSON fragment."""
    target = copy.deepcopy(doc)
    path = draw(st.sampled_from(json_paths(target)))
    parent = target
    for key in path[:-1]:
        parent = parent[key]
    node = parent[path[-1]] if path else target
    if isinstance(node, dict) and draw(st.booleans()):
        node[draw(st.sampled_from(_KEYS) | _STRINGS)] = _PLACEHOLDER
    elif path:
        parent[path[-1]] = _PLACEHOLDER
    else:
        target = _PLACEHOLDER
    text = json.dumps(target)
    return text.replace(json.dumps(_PLACEHOLDER), draw(FRAGMENTS), 1).encode()


# --- what a valid image config is (the oracle, written apart from pipeline.jsoncheck) ----------------------------

_PORT_KEY = re.compile(r"([0-9]{1,5})(?:-([0-9]{1,5}))?(?:/(tcp|udp|sctp))?")
_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?(Z|[+-][0-9]{2}:[0-9]{2})")
_INT64 = range(-(2**63), 2**63)


def _no_constant(name: str) -> Any:
    raise AssertionError(f"{name} in an image config")


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def check_image_config_is_valid(data: bytes) -> dict[str, Any]:
    """What docker load, podman load, skopeo and umoci require of an image config (Go's encoding/json into moby's
    image.Image and the OCI ImageConfig, where null means unset), asserted."""
    doc = json.loads(data.decode("utf-8"), parse_constant=_no_constant)  # strict UTF-8: no lone surrogates
    assert isinstance(doc, dict)
    for key in ("architecture", "os", "created", "container"):
        assert isinstance(doc[key], str) and doc[key], key
    assert _DATE.fullmatch(doc["created"])
    for key in ("variant", "os.version", "author"):
        assert isinstance(doc.get(key, ""), str), key
    assert _is_str_list(doc.get("os.features", [])), "os.features"
    assert doc["rootfs"]["type"] == "layers" and _is_str_list(doc["rootfs"]["diff_ids"])
    history = doc["history"]
    assert isinstance(history, list) and all(isinstance(h, dict) for h in history)
    for entry in history:
        assert entry.get("created") is None or _DATE.fullmatch(entry["created"]), entry
        assert all(entry.get(k) is None or isinstance(entry[k], str) for k in ("created_by", "author", "comment"))
        assert entry.get("empty_layer") is None or isinstance(entry["empty_layer"], bool), entry
    assert sum(not h.get("empty_layer") for h in history) == len(doc["rootfs"]["diff_ids"])
    config = doc["config"]
    assert isinstance(config, dict)
    for key in ("Hostname", "Domainname", "User", "Image", "WorkingDir", "MacAddress", "StopSignal"):
        assert config.get(key) is None or isinstance(config[key], str), key
    for key in ("AttachStdin", "AttachStdout", "AttachStderr", "Tty", "OpenStdin", "StdinOnce", "ArgsEscaped"):
        assert config.get(key) is None or isinstance(config[key], bool), key
    for key in ("Env", "Cmd", "Entrypoint", "OnBuild", "Shell"):
        assert config.get(key) is None or _is_str_list(config[key]), key
    labels = config.get("Labels") or {}
    assert isinstance(labels, dict) and all(k and isinstance(v, str) for k, v in labels.items()), "Labels"
    for key in ("ExposedPorts", "Volumes"):
        value = config.get(key) or {}
        assert isinstance(value, dict) and all(k and isinstance(v, dict) for k, v in value.items()), key
    for port in config.get("ExposedPorts") or {}:
        match = _PORT_KEY.fullmatch(port)
        assert match and 0 < int(match[1]) <= int(match[2] or match[1]) <= 65535, port
    health = config.get("Healthcheck") or {}
    assert isinstance(health, dict)
    assert health.get("Test") is None or _is_str_list(health["Test"]), "Healthcheck.Test"
    for key in ("Interval", "Timeout", "StartPeriod", "StartInterval", "Retries"):
        value = health.get(key)
        assert value is None or (type(value) is int and value in _INT64), f"Healthcheck.{key}"
    stop = config.get("StopTimeout")
    assert stop is None or (type(stop) is int and stop in _INT64), "StopTimeout"
    return doc


def _error_line(error: PipelineError) -> str:
    """The ERROR line the command line prints for error: one line, UTF-8."""
    record = logging.LogRecord("pipeline", logging.ERROR, __file__, 0, "failed", None, (type(error), error, None))
    line = OneLineErrors().format(record)
    assert line.startswith("ERROR: ") and "\n" not in line, line
    line.encode("utf-8")
    return line


def _refusal_or_valid(run: Callable[[], bytes], *names: str) -> None:
    """run() either raises a one-line PipelineError naming one of names, or gives a valid image config."""
    try:
        config = run()
    except PipelineError as e:
        message = _error_line(e)
        assert any(name in message for name in names), f"{message!r} names none of {names}"
        event(f"refused: {type(e).__name__}")
        return
    check_image_config_is_valid(config)
    event("valid image config")


_OPTIONS = st.sampled_from(
    [
        CommitOptions(),
        CommitOptions(changes=("ENV ADDED=1", "LABEL added=yes", "EXPOSE 8443/tcp", "WORKDIR sub", "ONBUILD RUN x")),
        CommitOptions(changes=('ENTRYPOINT ["/bin/sh"]', "VOLUME /data", "USER 1:1", "STOPSIGNAL SIGINT")),
    ]
)


def _commit_config(storage: Storage, container_id: str, options: CommitOptions) -> bytes:
    """What a commit computes from the metadata, in-process: the container, the state's digest (which reads the
    base config too) and the image config bytes."""
    container = storage.read_container(container_id)
    read_state(storage, container)
    records = [LayerRecord(f"sha256:{i:064x}", 2048) for i in range(len(container.lower_layers) + 1)]
    return build_config_bytes(storage, container_id, records, 1_700_000_000, options)


@contextmanager
def _written(path: Path, data: bytes) -> Iterator[None]:
    """path holds data until the block ends, then what it held before (or nothing)."""
    original = path.read_bytes() if path.exists() else None
    path.write_bytes(data)
    try:
        yield
    finally:
        if original is None:
            path.unlink()
        else:
            path.write_bytes(original)


def _edit_json(path: Path, edit: Callable[[Any], None]) -> bytes:
    doc = json.loads(path.read_bytes())
    edit(doc)
    return json.dumps(doc).encode()


# --- rocker ------------------------------------------------------------------------------------------------------

_FULL_SETTINGS = {
    "Env": ["PATH=/usr/bin:/bin", "LANG=C.UTF-8"],
    "Entrypoint": ["/bin/sh", "-c"],
    "Labels": {"org.opencontainers.image.title": "demo", "role": "web"},
    "ExposedPorts": {"80/tcp": {}, "53/udp": {}},
    "Volumes": {"/data": {}},
    "WorkingDir": "/app",
    "User": "1000:1000",
    "StopSignal": "SIGTERM",
    "Healthcheck": {"Test": ["CMD", "true"], "Interval": 30_000_000_000, "Retries": 3},
    "OnBuild": ["RUN true"],
    "Shell": ["/bin/sh", "-c"],
}


@dataclass(frozen=True)
class _Rocker:
    root: Path
    container_id: str
    files: dict[str, Path]


@pytest.fixture(scope="module")
def rocker(tmp_path_factory: pytest.TempPathFactory) -> _Rocker:
    """The demo's rocker storage, its container and image configs filled with every field a reader takes."""
    root = tmp_path_factory.mktemp("rocker") / "storage"
    container_id = build_sample_storage(root)
    store = root / "image" / "overlay2"
    [repository] = (store / "repositories").iterdir()
    [image_config] = (store / "imagedb" / "content" / "sha256").iterdir()
    config_json = root / "containers" / container_id / "config.json"

    def fill_container(doc: dict[str, Any]) -> None:
        doc["Config"].update(_FULL_SETTINGS, Cmd=["/bin/hello", "--loud"], StopTimeout=10)
        doc["State"].update(Running=False, Pid=0)

    def fill_image(doc: dict[str, Any]) -> None:
        doc.update(variant="v8", **{"os.version": "1", "os.features": ["a"]})
        doc["config"].update(_FULL_SETTINGS, Cmd=["sh"], Hostname="base", Tty=False)
        doc["history"] = [
            {"created": "2024-01-02T03:04:05.123456789Z", "created_by": "ADD rootfs /", "comment": "base"},
            {"created": "2024-01-02T03:04:06Z", "created_by": "ENV A=1", "empty_layer": True},
        ]

    config_json.write_bytes(_edit_json(config_json, fill_container))
    image_config.write_bytes(_edit_json(image_config, fill_image))
    files = {
        "config.json": config_json,
        "repositories": repository,
        "imagedb": image_config,
        "lower": root / "overlay2" / container_id / "lower",
    }
    built = _Rocker(root, container_id, files)
    check_image_config_is_valid(_commit_config(RockerStorage(root), container_id, CommitOptions()))
    return built


@FUZZ
@given(data=st.data(), which=st.sampled_from(["config.json", "repositories", "imagedb"]), options=_OPTIONS)
def test_rocker_json_with_hostile_values(rocker: _Rocker, data: st.DataObject, which: str, options: Any) -> None:
    path = rocker.files[which]
    with _written(path, data.draw(mutated(json.loads(path.read_bytes())))):
        _refusal_or_valid(lambda: _commit_config(RockerStorage(rocker.root), rocker.container_id, options), str(path))


_TEXT_FILES = st.one_of(
    st.binary(max_size=300),
    st.sampled_from([b"", b"\xff\xfe", b"a" * 70_000, b"x/diff\0", b"../../etc/diff", b"sha256:" + b"0" * 64 + b"\n"]),
)


@FUZZ
@given(content=_TEXT_FILES)
def test_rocker_lower_file_with_hostile_bytes(rocker: _Rocker, content: bytes) -> None:
    path = rocker.files["lower"]
    with _written(path, content):
        _refusal_or_valid(
            lambda: _commit_config(RockerStorage(rocker.root), rocker.container_id, CommitOptions()), str(path)
        )


# --- podman ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Podman:
    root: Path
    container_id: str
    image_dir: Path  # overlay-images/<image id>: its manifest and its config (a big-data file named by digest)
    config: bytes  # libpod's config and state of the container, as the database holds them
    state: bytes

    @property
    def database(self) -> Path:
        return self.root / "libpod" / "bolt_state.db"

    def write_database(self, config: bytes, state: bytes) -> bytes:
        return build_bolt_file({b"ctr": {self.container_id.encode(): {b"config": config, b"state": state}}})


@pytest.fixture(scope="module")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Podman]:
    """Real podman storage (tests.support.podman_storage) where podman and overlay mounts are available, else the
    hand-made containers-storage of tests.test_engines_podman; its libpod database a BoltDB file either way."""
    from tests import test_engines_podman as handmade

    work = tmp_path_factory.mktemp("podman")
    with ExitStack() as stack:
        if shutil.which("podman") and requires_root_reason() is None:
            from tests.support.podman_storage import build_podman_storage

            built = build_podman_storage(work)
            stack.callback(shutil.rmtree, built.runroot, ignore_errors=True)
            root, container_id = built.root, built.container_id
            bolt = BoltFile((root / "libpod" / "bolt_state.db").read_bytes(), root / "libpod" / "bolt_state.db")
            config = bolt.get(b"ctr", container_id.encode(), b"config")
            state = bolt.get(b"ctr", container_id.encode(), b"state")
            assert config is not None and state is not None
        else:
            root, container_id = handmade._make_storage(work / "storage"), handmade.CID
            config, state = json.dumps(handmade.LIBPOD_CONFIG).encode(), b'{"state": 3, "pid": 0}'
        records = json.loads((root / "overlay-containers/containers.json").read_bytes())
        record = next(r for r in records if r["id"] == container_id)
        built_podman = _Podman(root, container_id, root / "overlay-images" / record["image"], config, state)
        built_podman.database.parent.mkdir(exist_ok=True)
        built_podman.database.write_bytes(built_podman.write_database(config, state))
        check_image_config_is_valid(_commit_config(PodmanStorage(root), container_id, CommitOptions()))
        yield built_podman


def _podman_config_file(podman: _Podman) -> tuple[Path, Path]:
    """The image's manifest and the config it names (a big-data file named by the config's digest)."""
    manifest = podman.image_dir / "manifest"
    digest = json.loads(manifest.read_bytes())["config"]["digest"]
    return manifest, podman.image_dir / ("=" + base64.b64encode(digest.encode()).decode())


@FUZZ
@given(
    data=st.data(),
    which=st.sampled_from(["containers.json", "layers.json", "images.json", "config", "state", "image", "manifest"]),
    options=_OPTIONS,
)
def test_podman_storage_with_hostile_values(podman: _Podman, data: st.DataObject, which: str, options: Any) -> None:
    root = podman.root
    lists = {
        "containers.json": root / "overlay-containers/containers.json",
        "layers.json": root / "overlay-layers/layers.json",
        "images.json": root / "overlay-images/images.json",
    }
    manifest, image_config = _podman_config_file(podman)
    named = str(podman.database)
    with ExitStack() as stack:
        if which in lists:
            named = str(lists[which])
            stack.enter_context(_written(lists[which], data.draw(mutated(json.loads(lists[which].read_bytes())))))
        elif which == "config":
            fuzzed = data.draw(mutated(json.loads(podman.config)))
            stack.enter_context(_written(podman.database, podman.write_database(fuzzed, podman.state)))
        elif which == "state":
            fuzzed = data.draw(mutated(json.loads(podman.state)))
            stack.enter_context(_written(podman.database, podman.write_database(podman.config, fuzzed)))
        elif which == "manifest":
            # A manifest without a usable config digest sends the reader to the config named by the image id.
            named = str(podman.image_dir)
            stack.enter_context(_written(manifest, data.draw(mutated(json.loads(manifest.read_bytes())))))
        else:  # the image config, stored under its new digest, which the manifest names
            fuzzed = data.draw(mutated(json.loads(image_config.read_bytes())))
            digest = "sha256:" + hashlib.sha256(fuzzed).hexdigest()
            moved = podman.image_dir / ("=" + base64.b64encode(digest.encode()).decode())
            named = str(moved)
            stack.enter_context(_written(moved, fuzzed))
            stack.enter_context(_written(manifest, _edit_json(manifest, lambda d: d["config"].update(digest=digest))))
        _refusal_or_valid(lambda: _commit_config(PodmanStorage(root), podman.container_id, options), named)


# --- docker ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Docker:
    root: Path
    container_id: str

    @property
    def config_v2(self) -> Path:
        return self.root / "containers" / self.container_id / "config.v2.json"

    @property
    def imagedb(self) -> Path:
        return self.root / "image" / "overlay2" / "imagedb" / "content" / "sha256"

    def layerdb_files(self) -> list[Path]:
        layerdb = self.root / "image" / "overlay2" / "layerdb"
        names = ("mount-id", "parent", "cache-id", "diff")
        found = [*(layerdb / "mounts" / self.container_id).iterdir(), *layerdb.glob("sha256/*/*")]
        return sorted(p for p in found if p.name in names)


@pytest.fixture(scope="module")
def docker(tmp_path_factory: pytest.TempPathFactory) -> _Docker:
    """dockerd's overlay2 layout (tests.support.docker_storage) where overlay mounts are available, else the hand-made
    one of tests.test_engines_docker, with every image-config field in the container's Config."""
    work = tmp_path_factory.mktemp("docker")
    if requires_root_reason() is None:
        from tests.support.docker_storage import build_docker_storage

        built = build_docker_storage(work / "docker")
        target = _Docker(built.root, built.container_id)
    else:
        from tests import test_engines_docker as handmade

        target = _Docker(handmade._make_storage(work / "docker"), handmade.CID)

    def fill(doc: dict[str, Any]) -> None:
        doc["Config"].update(_FULL_SETTINGS, StopTimeout=10, Healthcheck={"Test": ["NONE"]})

    target.config_v2.write_bytes(_edit_json(target.config_v2, fill))
    check_image_config_is_valid(_commit_config(DockerStorage(target.root), target.container_id, CommitOptions()))
    return target


@FUZZ
@given(data=st.data(), which=st.sampled_from(["config.v2.json", "imagedb"]), options=_OPTIONS)
def test_docker_json_with_hostile_values(docker: _Docker, data: st.DataObject, which: str, options: Any) -> None:
    named = str(docker.config_v2)
    with ExitStack() as stack:
        if which == "config.v2.json":
            stack.enter_context(
                _written(docker.config_v2, data.draw(mutated(json.loads(docker.config_v2.read_bytes()))))
            )
        else:  # the image config, stored under its new digest, which the container names as its Image
            image_id = json.loads(docker.config_v2.read_bytes())["Image"]
            original = (docker.imagedb / image_id.removeprefix("sha256:")).read_bytes()
            fuzzed = data.draw(mutated(json.loads(original)))
            moved = docker.imagedb / hashlib.sha256(fuzzed).hexdigest()
            named = str(moved)
            stack.enter_context(_written(moved, fuzzed))
            new_id = f"sha256:{moved.name}"
            stack.enter_context(
                _written(docker.config_v2, _edit_json(docker.config_v2, lambda d: d.update(Image=new_id)))
            )
        _refusal_or_valid(lambda: _commit_config(DockerStorage(docker.root), docker.container_id, options), named)


@FUZZ
@given(data=st.data(), content=_TEXT_FILES)
def test_docker_layerdb_files_with_hostile_bytes(docker: _Docker, data: st.DataObject, content: bytes) -> None:
    path = data.draw(st.sampled_from(docker.layerdb_files()))
    with _written(path, content):
        _refusal_or_valid(
            lambda: _commit_config(DockerStorage(docker.root), docker.container_id, CommitOptions()), str(path)
        )


# --- --config FILE and --change ----------------------------------------------------------------------------------


@FUZZ
@given(data=st.data(), wrapped=st.booleans())
def test_config_file_with_hostile_values(rocker: _Rocker, tmp_path: Path, data: st.DataObject, wrapped: bool) -> None:
    settings_doc = {**_FULL_SETTINGS, "Cmd": ["serve"], "StopTimeout": 5}
    doc = {"architecture": "amd64", "config": settings_doc} if wrapped else settings_doc
    path = tmp_path / "config.json"  # one for every example: each overwrites it
    path.write_bytes(data.draw(mutated(doc)))

    def run() -> bytes:
        options = CommitOptions(extra_config=read_config_file(str(path)), changes=("ENV B=2", "LABEL x=y"))
        return _commit_config(RockerStorage(rocker.root), rocker.container_id, options)

    _refusal_or_valid(run, f"--config {path}")


@CHEAP
@given(instruction=st.sampled_from(["CMD", "ENTRYPOINT", "VOLUME"]), fragment=FRAGMENTS)
def test_change_with_a_hostile_json_array(instruction: str, fragment: str) -> None:
    try:
        config = apply_changes({"Env": ["A=1"]}, [f"{instruction} [{fragment}]"])
    except InvalidChange as e:
        _error_line(e)
        return
    json.dumps(config, allow_nan=False, ensure_ascii=False).encode("utf-8")
    for key in ("Cmd", "Entrypoint"):
        assert config.get(key) is None or _is_str_list(config[key])


# --- xattrs and names inside a layer -----------------------------------------------------------------------------


def _xattr_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Somewhere user xattrs of up to 64 KiB can be set: tmpfs (since Linux 6.6), else the test's own directory."""
    shm = Path("/dev/shm")
    probe = shm / f"pipeline-xattr-probe-{uuid.uuid4().hex}"
    try:
        probe.write_bytes(b"")
        os.setxattr(probe, "user.probe", bytes(65536))
        return shm
    except OSError:
        return tmp_path_factory.mktemp("xattrs")
    finally:
        probe.unlink(missing_ok=True)


_NAMES = st.one_of(
    st.binary(min_size=1, max_size=255).map(lambda b: b.replace(b"/", b"_").replace(b"\0", b"_")),
    st.sampled_from([b".wh.x", b"\xff\xfe", "café".encode(), b"a" * 255, b"\n", b"-", b"=", b"\xed\xa0\x80"]),
).filter(lambda name: name not in (b".", b".."))
_XATTR_NAMES = st.one_of(
    st.binary(min_size=1, max_size=200).map(lambda b: b"user." + b.replace(b"\0", b"_")),
    st.sampled_from([b"user.a=b", b"user.\xff", b"user.overlay.\xff", b"user.mime_type", b"user.\xed\xa0\x80"]),
)
_XATTR_VALUES = st.one_of(
    st.binary(max_size=64),
    st.builds(lambda size, byte: bytes([byte]) * size, st.integers(0, 65536), st.integers(0, 255)),
)


@FUZZ
@example(entries=[(b"f", [(b"user.\xff", b"v")])])  # was UnicodeEncodeError from the tar writer
@example(entries=[(b"f", [(b"user.a=b", b"v")])])  # was an archive carrying user.a = "b=v"
@example(entries=[(b"f", [(b"user.big", b"x" * 65536)]), (b"\n", [])])
@given(
    entries=st.lists(
        st.tuples(_NAMES, st.lists(st.tuples(_XATTR_NAMES, _XATTR_VALUES), max_size=3)),
        min_size=1,
        max_size=4,
        unique_by=lambda entry: entry[0],
    )
)
def test_layer_with_hostile_names_and_xattrs(
    tmp_path_factory: pytest.TempPathFactory, entries: list[tuple[bytes, list[tuple[bytes, bytes]]]]
) -> None:
    layer = _xattr_dir(tmp_path_factory) / f"pipeline-fuzz-layer-{uuid.uuid4().hex}"
    layer.mkdir()
    try:
        expected: dict[bytes, dict[bytes, bytes]] = {}
        for name, xattrs in entries:
            path = os.path.join(os.fsencode(layer), name)
            with open(path, "wb") as f:
                f.write(name)
            for xattr, value in xattrs:
                try:
                    os.setxattr(path, xattr, value, follow_symlinks=False)
                except OSError:  # too large for this file system, or too many bytes on one inode
                    continue
            expected[name] = {os.fsencode(n): os.getxattr(path, n) for n in os.listxattr(path)}
        kept = {n for xattrs in expected.values() for n in xattrs if not n.startswith(b"user.overlay.")}
        refusable = [n for n in expected if n.startswith(b".wh.")] + [n for n in kept if not _utf8(n) or b"=" in n]
        out = io.BytesIO()
        try:
            write_layer(layer, out)
        except LayerError as e:
            assert refusable, e
            assert str(layer) in _error_line(e)
            event("refused")
            return
        assert not refusable
        out.seek(0)
        with tarfile.open(fileobj=out) as tar:
            members = {os.fsencode(m.name): m for m in tar.getmembers()}
        assert set(members) == set(expected)
        for name, member in members.items():
            carried = {
                k.removeprefix("SCHILY.xattr.").encode(): v.encode("utf-8", "surrogateescape")
                for k, v in member.pax_headers.items()
                if k.startswith("SCHILY.xattr.")
            }
            assert carried == {n: v for n, v in expected[name].items() if n in kept}
        event("packed")
    finally:
        shutil.rmtree(layer)


def _utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


# --- cache records, compressed-blob mappings, catalog records, tar-split records --------------------------------

_DIFF_ID = "sha256:" + hashlib.sha256(b"layer").hexdigest()


@CHEAP
@given(data=st.data())
def test_cache_record_with_hostile_values(tmp_path: Path, data: st.DataObject) -> None:
    cache = tmp_path / "cache"  # one for every example: each overwrites the record
    path = cache / "layers" / "record.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.draw(mutated(json.loads(encode_record(LayerRecord(_DIFF_ID, 3072, "sha256:" + "1" * 64))))))
    try:
        record = read_record(path)
    except LayerError as e:
        assert str(path) in _error_line(e)
        event("refused")
        return
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", record.diff_id) and type(record.size) is int and record.size >= 0
    assert isinstance(record.fingerprint, str)
    LayerCache(cache).has_blob(record, recorded_ns=0)
    event("read")


@CHEAP
@given(data=st.data())
def test_compressed_blob_mapping_with_hostile_values(tmp_path: Path, data: st.DataObject) -> None:
    cache = tmp_path / "cache"  # one for every example: each overwrites the mapping
    record = LayerRecord(_DIFF_ID, 3072)
    blob = b"compressed bytes"
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    (cache / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (cache / "blobs" / "sha256" / digest.removeprefix("sha256:")).write_bytes(blob)
    good = StoredBlob(digest, len(blob), _DIFF_ID, "gzip", 1, MEDIA_TYPES["gzip"])
    mapping = mapping_path(cache, _DIFF_ID, "gzip", 1)
    mapping.parent.mkdir(exist_ok=True)
    mapping.write_bytes(data.draw(mutated({**asdict(good), "library": "isal 1.0"})))
    found = find_blob(cache, record, "gzip", 1)  # damage means: compress again, never an error
    if found is not None:
        assert found == good
    event("reused" if found else "compress again")


@CHEAP
@given(data=st.data())
def test_catalog_record_with_hostile_values(tmp_path: Path, data: st.DataObject) -> None:
    good = SnapshotRecord(
        container_id="c" * 64,
        name="web",
        stamp="2026-11-28T0400",
        reference="web:2026-11-28T0400",
        archive="/images/snapshots/web/2026-11-28T0400.tar",
        config_digest="sha256:" + "2" * 64,
        diff_ids=(_DIFF_ID, "sha256:" + "3" * 64),
        layer_sizes=(3072, 1024),
        archive_size=8192,
        fingerprint="sha256:" + "4" * 64,
        duration=1.5,
        status="reused",
        reused_from="2026-11-28T0300",
        source="sha256:" + "5" * 64,
    )
    path = tmp_path / "record.json"  # only named: from_json is given the bytes
    try:
        record = SnapshotRecord.from_json(data.draw(mutated(json.loads(good.to_json()))), path)
    except StorageError as e:
        assert str(path) in _error_line(e)
        event("refused")
        return
    for key, value in asdict(record).items():
        assert type(value) is type(getattr(good, key)) or (key == "duration" and type(value) is int), key
    assert all(isinstance(d, str) for d in record.diff_ids) and len(record.diff_ids) == len(record.layer_sizes)
    assert all(type(s) is int and s >= 0 for s in record.layer_sizes) and record.status in ("new", "reused")
    format_table([record, good]).encode("utf-8")
    json.loads(record.to_json(), parse_constant=_no_constant)
    event("read")


@CHEAP
@given(data=st.data())
def test_tar_split_entry_with_hostile_values(data: st.DataObject) -> None:
    good = {"type": 1, "name": "etc/hosts", "size": 5, "payload": base64.b64encode(b"\0" * 8).decode(), "position": 3}
    line = data.draw(mutated(good))
    try:
        entry = tarsplit._parse_entry(line)
    except tarsplit._Refused:
        event("refused")
        return
    assert entry.kind in (1, 2) and type(entry.size) is int and entry.size >= 0 and isinstance(entry.name, bytes)
    event("read")


# --- the crashes the fuzzers found, pinned --------------------------------------------------------------------


def _with_fragment(doc: Any, path: tuple[Any, ...], fragment: str) -> bytes:
    """doc as JSON with the value at path (created if missing) replaced by the JSON text fragment."""
    target = copy.deepcopy(doc)
    node = target
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = _PLACEHOLDER
    return json.dumps(target).replace(json.dumps(_PLACEHOLDER), fragment, 1).encode()


_DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize(
    ("which", "path", "fragment", "needle"),
    [
        ("config.json", ("State", "Pid"), '"4242"', "State.Pid must be a whole number"),  # was int(): ValueError
        ("config.json", ("State", "Pid"), "true", "State.Pid"),  # was pid 1: init's cgroup frozen
        ("config.json", ("State", "Pid"), "1.5", "State.Pid"),  # was pid 1
        ("config.json", ("State", "Pid"), "1e400", "beyond the range of a float64"),  # was int(inf): OverflowError
        ("config.json", ("State", "Pid"), str(2**70), "State.Pid"),
        ("config.json", ("State", "Running"), '"false"', "State.Running must be true or false"),  # was running
        ("config.json", ("Config", "Env"), '["A=1", 5]', "Config.Env[1] must be a string"),  # was in the image
        ("config.json", ("Config", "Cmd"), "[1, 2]", "Config.Cmd[0] must be a string"),
        ("config.json", ("Config", "Labels"), '{"a": {"b": 1}}', "Config.Labels['a'] must be a string"),
        ("config.json", ("Config", "ExposedPorts"), '{"http": {}}', "each key of Config.ExposedPorts"),
        ("config.json", ("Config", "StopTimeout"), "NaN", "NaN is not a JSON number"),  # was NaN in the image
        ("config.json", ("Config", "Env"), _DEEP, "nested deeper than"),  # was RecursionError
        ("config.json", ("Created",), '"yesterday"', "Created must be an RFC 3339 date"),
        ("config.json", ("Name",), '["web"]', "Name must be a string"),  # was the name "['web']"
        ("imagedb", ("architecture",), "5", "architecture must be a string"),  # was "architecture": 5
        ("imagedb", ("history",), '[{"created": "then"}]', "history[0].created must be an RFC 3339 date"),
        ("imagedb", ("config", "Healthcheck"), '{"Interval": 1e30}', "Healthcheck.Interval"),
        ("repositories", ("image_layer_info", "Layers"), "7", "image_layer_info.Layers"),  # was TypeError
        ("repositories", ("image_layer_info", "Layers"), "[[]]", "image_layer_info.Layers[0]"),  # AttributeError
    ],
)
def test_rocker_values_that_crashed_or_passed_are_refused_naming_file_and_field(
    rocker: _Rocker, which: str, path: tuple[str, ...], fragment: str, needle: str
) -> None:
    file = rocker.files[which]
    with _written(file, _with_fragment(json.loads(file.read_bytes()), path, fragment)):
        with pytest.raises(StorageError) as refused:
            _commit_config(RockerStorage(rocker.root), rocker.container_id, CommitOptions())
    line = _error_line(refused.value)
    assert str(file) in line and needle in line, line


def test_lone_surrogates_become_replacement_characters_as_go_reads_them(rocker: _Rocker) -> None:
    file = rocker.files["config.json"]
    fragment = '{"a\\udfff": "b\\ud800", "c": "\\ud83d\\ude00"}'
    with _written(file, _with_fragment(json.loads(file.read_bytes()), ("Config", "Labels"), fragment)):
        config = check_image_config_is_valid(
            _commit_config(RockerStorage(rocker.root), rocker.container_id, CommitOptions())
        )
    assert config["config"]["Labels"] == {"a\ufffd": "b\ufffd", "c": "\U0001f600"}


@pytest.mark.parametrize(
    ("key", "fragment", "needle"),
    [
        ("archive_size", '"8192"', "archive_size must be a whole number"),  # was format_table's ValueError
        ("diff_ids", '"abc"', "diff_ids must be an array"),  # was a record of the diff_ids "a", "b", "c"
        ("layer_sizes", "[1]", "one size per diff_id"),  # was zip(strict=True)'s ValueError in the totals
        ("duration", "NaN", "NaN is not a JSON number"),  # was NaN in catalog.jsonl
        ("name", "7", "name must be a string"),
    ],
)
def test_catalog_values_that_crashed_are_refused(tmp_path: Path, key: str, fragment: str, needle: str) -> None:
    good = {
        "container_id": "c" * 64, "name": "web", "stamp": "s", "reference": "web:s", "archive": "/a.tar",
        "config_digest": "d", "diff_ids": ["x", "y"], "layer_sizes": [1, 2], "archive_size": 3, "fingerprint": "f",
        "duration": 1.0, "status": "new",
    }  # fmt: skip
    path = tmp_path / "record.json"
    with pytest.raises(StorageError) as refused:
        SnapshotRecord.from_json(_with_fragment(good, (key,), fragment), path)
    assert str(path) in str(refused.value) and needle in str(refused.value)


@pytest.mark.parametrize(
    ("fragment", "needle"),
    [
        ("1e400", "beyond the range of a float64"),  # was int(inf): OverflowError
        ("2.5", "size must be a whole number"),  # was a size of 2
        ('"3072"', "size must be a whole number"),
        ("-1", "size must be a whole number"),
    ],
)
def test_cache_record_values_that_crashed_are_refused(tmp_path: Path, fragment: str, needle: str) -> None:
    path = tmp_path / "record.json"
    path.write_bytes(_with_fragment({"diff_id": _DIFF_ID, "fingerprint": ""}, ("size",), fragment))
    with pytest.raises(LayerError, match=re.escape(str(path)) + ".*" + re.escape(needle)):
        read_record(path)


# --- the command line ----------------------------------------------------------------------------------------------


def _one_error_line(result: Any, *needles: str) -> None:
    assert result.returncode != 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    [line] = error_lines(result)
    for needle in needles:
        assert needle in line, line


def test_command_line_refuses_a_container_config_of_wrong_types_with_one_line(tmp_path: Path) -> None:
    root = tmp_path / "storage"
    container_id = build_sample_storage(root)
    path = root / "containers" / container_id / "config.json"
    path.write_bytes(_edit_json(path, lambda doc: doc["Config"].update(Env=["A=1", 5], Labels={"a": {"b": 1}})))
    result = run_luigi(*commit_args(root, tmp_path, "--id", container_id[:12]))
    _one_error_line(result, str(path), "Config.Env[1] must be a string, not the number 5")
    assert not (tmp_path / "out").exists()


def test_command_line_refuses_a_config_file_nested_past_the_stack_with_one_line(tmp_path: Path) -> None:
    root = tmp_path / "storage"
    container_id = build_sample_storage(root)
    config_file = tmp_path / "config.json"
    config_file.write_text('{"Labels": ' + "[" * 100_000 + "]" * 100_000 + "}")
    result = run_luigi(*commit_args(root, tmp_path, "--id", container_id[:12], "--config", str(config_file)))
    _one_error_line(result, f"--config {config_file}", "nested deeper than")
    assert not (tmp_path / "out").exists()

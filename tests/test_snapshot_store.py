"""The snapshot store (pipeline.snapshots.store): blobs stored once, index updates that many processes and kills
cannot corrupt, garbage collection that never races a user, forged layouts refused in one line, and export."""

import json
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest

from pipeline.errors import OutputError, PipelineError, StorageError
from pipeline.image.imageconfig import digest_of, encode_json, host_architecture
from pipeline.layer.writer import LayerRecord
from pipeline.snapshots.store import CONTAINER_ID, CREATED, REF_NAME, STAMP, SnapshotStore, StoreEntry
from pipeline.store import compression
from pipeline.store.cache import LayerCache
from pipeline.store.compression import StoredBlob
from tests.support.cli import REPO

WHEN = datetime(2026, 11, 30, 11, 0, tzinfo=UTC)
T1, T2, T3 = "2026-11-30T1100", "2026-11-30T1200", "2026-11-30T1300"


@dataclass(frozen=True)
class Layers:
    """Real layer blobs packed into a cache: a base layer two containers share, and each container's own."""

    cache: LayerCache
    base: StoredBlob
    web: StoredBlob
    web_changed: StoredBlob
    db: StoredBlob


def _tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def _pack(cache: LayerCache, layer_dir: Path, algorithm: str = "none") -> StoredBlob:
    record = cache.pack_layer(layer_dir, overlay_xattrs=None)  # plain directories: no overlay markers
    return compression.compress_blob(cache.root, record, algorithm, compression.default_level(algorithm))


@pytest.fixture
def layers(tmp_path: Path) -> Layers:
    cache = LayerCache(tmp_path / "cache")
    base = _tree(tmp_path / "base", {"etc/os-release": b"NAME=base\n", "bin/tool": os.urandom(256 << 10)})
    web = _tree(tmp_path / "web", {"srv/index.html": b"<h1>web</h1>\n"})
    web_changed = _tree(tmp_path / "web2", {"srv/index.html": b"<h1>web, changed</h1>\n"})
    db = _tree(tmp_path / "db", {"var/lib/db/data": os.urandom(64 << 10)})
    return Layers(cache, _pack(cache, base), _pack(cache, web), _pack(cache, web_changed), _pack(cache, db))


def _config(blobs: list[StoredBlob], created: str = "2026-11-30T11:00:00Z") -> bytes:
    return encode_json(
        {
            "architecture": host_architecture(),
            "os": "linux",
            "created": created,
            "config": {"Cmd": ["/bin/tool"]},
            "rootfs": {"type": "layers", "diff_ids": [b.diff_id for b in blobs]},
            "history": [{"created": created, "created_by": "test"} for _ in blobs],
        }
    )


def _add(
    store: SnapshotStore, cache: LayerCache, ref: str, blobs: list[StoredBlob], created: str = "2026-11-30T11:00:00Z"
) -> StoreEntry:
    name, _, stamp = ref.partition(":")
    paths = [cache.blob_path(b.digest) for b in blobs]
    return store.add_image(
        ref, _config(blobs, created), blobs, paths, container_id=f"id-{name}", stamp=stamp, created=WHEN
    )


def _blob_names(store: SnapshotStore) -> set[str]:
    return {p.name for p in store.blob_dir.iterdir()}


def _needed_blob_names(store: SnapshotStore) -> set[str]:
    """What the index names: every manifest, its config and its layers."""
    names = set()
    for entry in store.entries():
        manifest = store.read_manifest(entry)
        names |= {d["digest"][7:] for d in [manifest["config"], *manifest["layers"]]} | {entry.digest[7:]}
    return names


def _three_snapshots(tmp_path: Path, layers: Layers) -> SnapshotStore:
    store = SnapshotStore(tmp_path / "store")
    _add(store, layers.cache, f"web-1:{T1}", [layers.base, layers.web])
    _add(store, layers.cache, f"db-1:{T1}", [layers.base, layers.db])
    _add(store, layers.cache, f"web-1:{T2}", [layers.base, layers.web_changed], created="2026-11-30T12:00:00Z")
    return store


# --- adding ------------------------------------------------------------------------------------------------------


def test_snapshots_sharing_a_base_layer_store_it_once_as_a_hardlink_into_the_cache(
    tmp_path: Path, layers: Layers
) -> None:
    store = _three_snapshots(tmp_path, layers)
    assert [e.reference for e in store.entries()] == [f"web-1:{T1}", f"db-1:{T1}", f"web-1:{T2}"]
    # 4 distinct layers, 3 configs, 3 manifests: nothing twice, nothing else.
    assert _blob_names(store) == _needed_blob_names(store) and len(_blob_names(store)) == 10
    base = store.blob_path(layers.base.digest)
    assert os.path.samefile(base, layers.cache.blob_path(layers.base.digest)) and base.stat().st_nlink == 2
    assert json.loads((store.root / "oci-layout").read_bytes()) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads(store.index_path.read_bytes())
    assert index["schemaVersion"] == 2 and index["mediaType"] == "application/vnd.oci.image.index.v1+json"
    assert index["manifests"][2]["annotations"] == {
        REF_NAME: f"web-1:{T2}",
        CREATED: "2026-11-30T11:00:00Z",
        CONTAINER_ID: "id-web-1",
        STAMP: T2,
    }
    assert store.read_config(store.entries()[2])["rootfs"]["diff_ids"] == [
        layers.base.diff_id,
        layers.web_changed.diff_id,
    ]
    assert not [p for p in store.root.rglob("*") if ".partial-" in p.name]


def test_an_unchanged_container_gets_a_new_entry_and_no_new_blob(tmp_path: Path, layers: Layers) -> None:
    store = _three_snapshots(tmp_path, layers)
    before = _blob_names(store)
    entry = store.add_reference(f"web-1:{T2}", f"web-1:{T3}", container_id="id-web-1", stamp=T3, created=WHEN)
    assert _blob_names(store) == before
    assert entry.digest == store.find(f"web-1:{T2}").digest  # type: ignore[union-attr]
    assert store.find(f"web-1:{T3}") == entry and entry.stamp == T3 and entry.created == "2026-11-30T11:00:00Z"
    with pytest.raises(StorageError, match=r"no snapshot 'web-1:2026-11-30T0900' .* it holds web-1:2026-11-30T1100"):
        store.add_reference("web-1:2026-11-30T0900", "web-1:x", container_id="", stamp="x", created=WHEN)


def test_adding_a_reference_again_replaces_its_entry(tmp_path: Path, layers: Layers) -> None:
    store = _three_snapshots(tmp_path, layers)
    again = _add(store, layers.cache, f"web-1:{T1}", [layers.base, layers.web], created="2026-11-30T11:30:00Z")
    refs = [e.reference for e in store.entries()]
    assert refs == [f"db-1:{T1}", f"web-1:{T2}", f"web-1:{T1}"] and store.find(f"web-1:{T1}") == again


@pytest.mark.skipif(
    not os.path.isdir("/dev/shm") or os.stat("/dev/shm").st_dev == os.stat(REPO).st_dev,
    reason="needs /dev/shm on another filesystem than the tests' temporary directory",
)
def test_layers_are_copied_when_the_cache_is_on_another_filesystem(tmp_path: Path) -> None:
    import tempfile

    with tempfile.TemporaryDirectory(dir="/dev/shm") as shm:
        cache = LayerCache(Path(shm) / "cache")
        base = _pack(cache, _tree(tmp_path / "base", {"etc/os-release": b"NAME=base\n"}))
        store = SnapshotStore(tmp_path / "store")
        _add(store, cache, f"web-1:{T1}", [base])
        stored, cached = store.blob_path(base.digest), cache.blob_path(base.digest)
        assert stored.stat().st_dev != cached.stat().st_dev and stored.stat().st_nlink == 1
        assert stored.read_bytes() == cached.read_bytes()


def test_a_missing_cache_blob_is_refused_in_one_line(tmp_path: Path, layers: Layers) -> None:
    store = SnapshotStore(tmp_path / "store")
    missing = tmp_path / "nowhere"
    with pytest.raises(OutputError, match=r"nowhere: cached layer is missing or damaged; re-run to repack it"):
        store.add_image(
            f"web-1:{T1}", _config([layers.base]), [layers.base], [missing], container_id="", stamp=T1, created=WHEN
        )
    assert store.entries() == []


# --- many processes, and kills -------------------------------------------------------------------------------------

_ADDER = textwrap.dedent(
    """
    import sys, time
    from datetime import datetime
    from pathlib import Path
    from pipeline.snapshots.store import SnapshotStore
    from pipeline.store.cache import LayerCache
    from tests.test_snapshot_store import _add, _pack

    store_dir, cache_dir, base_dir, own_dir, name, start = sys.argv[1:]
    cache = LayerCache(Path(cache_dir))
    base, own = _pack(cache, Path(base_dir)), _pack(cache, Path(own_dir))
    store = SnapshotStore(Path(store_dir))
    while time.time() < float(start):
        time.sleep(0.005)
    _add(store, cache, f"{name}:0", [base, own])
    for n in range(1, 11):
        store.add_reference(f"{name}:0", f"{name}:{n}", container_id=name, stamp=str(n), created=datetime.now())
    """
)


def _python(code: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_processes_adding_at_once_lose_no_entry(tmp_path: Path) -> None:
    import time

    base = _tree(tmp_path / "base", {"etc/os-release": b"NAME=base\n", "bin/tool": os.urandom(64 << 10)})
    names = [f"c{n}" for n in range(6)]
    start = str(time.time() + 1.5)  # every process imported and packed by then, so their updates overlap
    children = []
    for name in names:
        own = _tree(tmp_path / name, {f"srv/{name}": name.encode()})
        argv = [str(tmp_path / "store"), str(tmp_path / "cache"), str(base), str(own), name, start]
        children.append(_python(_ADDER, *argv))
    for child in children:
        _, stderr = child.communicate(timeout=60)
        assert child.returncode == 0, stderr
    store = SnapshotStore(tmp_path / "store")
    assert sorted(e.reference for e in store.entries()) == sorted(f"{c}:{n}" for c in names for n in range(11))
    assert _blob_names(store) == _needed_blob_names(store)
    assert len(_blob_names(store)) == 1 + 3 * len(names)  # the base once; each container's layer, config, manifest


_KILLED_ADD = textwrap.dedent(
    """
    import sys
    from datetime import datetime
    from pathlib import Path
    from pipeline.snapshots.store import SnapshotStore
    from pipeline.store.cache import LayerCache
    from tests.test_snapshot_store import _add, _pack

    store = SnapshotStore(Path(sys.argv[1]))
    if sys.argv[3] == "reference":
        store.add_reference("web-1:2026-11-30T1200", "web-1:new", container_id="", stamp="new", created=datetime.now())
    else:
        cache = LayerCache(Path(sys.argv[2]))
        _add(store, cache, "web-1:new", [_pack(cache, Path(sys.argv[4]))], created="2026-12-01T00:00:00Z")
    """
)


@pytest.mark.parametrize(
    ("how", "failpoint"),
    [
        ("reference", "atomic:before-rename@1"),  # the index, the only file an added reference writes
        ("image", "atomic:before-rename@1"),  # the config blob (the layer is already linked)
        ("image", "atomic:before-rename@2"),  # the manifest blob
        ("image", "atomic:before-rename@3"),  # the index, every blob in place
    ],
)
def test_a_kill_while_adding_leaves_the_old_index_readable(
    tmp_path: Path, layers: Layers, how: str, failpoint: str
) -> None:
    store = _three_snapshots(tmp_path, layers)
    before, entries = store.index_path.read_bytes(), store.entries()
    new_layer = _tree(tmp_path / "new", {"srv/new": os.urandom(4096)})
    child = _python(
        _KILLED_ADD,
        str(store.root),
        str(layers.cache.root),
        how,
        str(new_layer),
        env={"PIPELINE_FAILPOINTS": failpoint},
    )
    _, stderr = child.communicate(timeout=60)
    assert child.returncode == -signal.SIGKILL, stderr
    assert store.index_path.read_bytes() == before and store.entries() == entries
    for entry in entries:
        store.read_config(entry)  # every blob the index names is whole
    assert [p.name for p in store.root.rglob("*") if ".partial-" in p.name]  # what the kill left mid-write
    store.collect_garbage()
    assert not [p for p in store.root.rglob("*") if ".partial-" in p.name]
    assert _blob_names(store) == _needed_blob_names(store)  # nothing the killed add wrote outlives it


# --- garbage collection --------------------------------------------------------------------------------------------


def test_garbage_collection_deletes_only_blobs_no_entry_needs(tmp_path: Path, layers: Layers) -> None:
    store = _three_snapshots(tmp_path, layers)
    first = store.find(f"web-1:{T1}")
    assert first is not None
    manifest = store.read_manifest(first)
    store.remove_references([f"web-1:{T1}", "not:there"])
    # web-1:T1's manifest, config and own layer; the base layer is still db-1's and web-1:T2's.
    doomed = {store.blob_path(d) for d in (first.digest, manifest["config"]["digest"], layers.web.digest)}
    assert set(store.collect_garbage(dry_run=True)) == doomed and all(p.exists() for p in doomed)
    assert set(store.collect_garbage()) == doomed and not any(p.exists() for p in doomed)
    assert store.blob_path(layers.base.digest).exists()
    assert _blob_names(store) == _needed_blob_names(store) and len(store.entries()) == 2
    assert store.collect_garbage() == []


_HOLDER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from pipeline.snapshots.store import SnapshotStore

    print(len(SnapshotStore(Path(sys.argv[1])).entries()), flush=True)
    sys.stdin.read()
    """
)


def test_garbage_collection_deletes_nothing_while_another_process_uses_the_store(
    tmp_path: Path, layers: Layers, caplog: pytest.LogCaptureFixture
) -> None:
    store = _three_snapshots(tmp_path, layers)
    store.remove_references([f"web-1:{T1}"])
    holder = _python(_HOLDER, str(store.root))
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "2"
        before = _blob_names(store)
        assert store.collect_garbage() == [] and _blob_names(store) == before
        assert "in use by another process" in caplog.text
    finally:
        holder.communicate("", timeout=30)
    assert len(store.collect_garbage()) == 3  # web-1:T1's own layer, config and manifest


# --- forged layouts -------------------------------------------------------------------------------------------------

_GOOD = {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": "sha256:" + "a" * 64, "size": 10}


def _index_with(**change: object) -> bytes:
    """An index.json whose one descriptor is _GOOD with change applied."""
    return json.dumps({"manifests": [_GOOD | change]}).encode()


@pytest.mark.parametrize(
    ("index", "problem"),
    [
        (b"{", "not a JSON document"),
        (b'{"manifests": [{"size": NaN}]}', "not a JSON document"),
        (b"[" * 100 + b"]" * 100, "not a JSON document"),
        (b"[]", "the index must be a JSON object"),
        (json.dumps({"manifests": {"a": 1}}).encode(), "manifests must be an array"),
        (
            _index_with(digest="sha256:../../../etc/passwd"),
            r"manifests\[0\].digest",
        ),
        (_index_with(digest="sha512:" + "a" * 128), r"must be a sha256 digest"),
        (_index_with(digest="sha256:" + "A" * 64), r"must be a sha256 digest"),
        (_index_with(size="10"), r"manifests\[0\].size must be a whole number"),
        (_index_with(size=10**30), r"manifests\[0\].size must be a whole"),
        (_index_with(size=-1), r"manifests\[0\].size must be a whole"),
        (_index_with(mediaType=5), r"mediaType must be a string"),
        (_index_with(annotations={REF_NAME: ["x"]}), r"annotations\["),
        (json.dumps({"manifests": ["sha256:" + "a" * 64]}).encode(), r"manifests\[0\] must be a descriptor"),
    ],
)
def test_a_forged_index_is_refused_in_one_line(tmp_path: Path, layers: Layers, index: bytes, problem: str) -> None:
    store = _three_snapshots(tmp_path, layers)
    store.index_path.write_bytes(index)
    for call in (store.entries, lambda: store.find("web-1:x"), store.collect_garbage):
        with pytest.raises(StorageError, match=problem) as caught:
            call()
        message = str(caught.value)
        assert message.startswith(f"{store.index_path}: ") and "\n" not in message
    assert _blob_names(store) == {p.name for p in store.blob_dir.iterdir()}  # nothing collected


def _forge_manifest(store: SnapshotStore, change: dict[str, object]) -> StoreEntry:
    """Rewrite web-1:T1's manifest with change applied, stored under its new digest, and name it in the index."""
    entry = store.find(f"web-1:{T1}")
    assert entry is not None
    manifest = encode_json(store.read_manifest(entry) | change)
    store.blob_path(digest_of(manifest)).write_bytes(manifest)
    index = json.loads(store.index_path.read_bytes())
    index["manifests"][0] |= {"digest": digest_of(manifest), "size": len(manifest)}
    store.index_path.write_bytes(json.dumps(index).encode())
    forged = store.find(f"web-1:{T1}")
    assert forged is not None
    return forged


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"layers": [{"mediaType": "x", "digest": "sha256:../../../../etc/passwd", "size": 1}]}, r"layers\[0\].digest"),
        ({"config": None}, "config must be a descriptor object"),
        ({"schemaVersion": 1}, "schemaVersion must be a whole number from 2 to 2"),
        ({"layers": "sha256:" + "0" * 64}, "layers must be an array"),
    ],
)
def test_a_forged_manifest_is_refused_in_one_line(
    tmp_path: Path, layers: Layers, change: dict[str, object], problem: str
) -> None:
    store = _three_snapshots(tmp_path, layers)
    forged = _forge_manifest(store, change)
    before = _blob_names(store)
    for call in (lambda: store.read_config(forged), store.collect_garbage):
        with pytest.raises(StorageError, match=problem) as caught:
            call()
        assert str(caught.value).startswith(f"{store.blob_dir}/") and "\n" not in str(caught.value)
    assert _blob_names(store) == before  # a manifest that cannot be read collects nothing


def test_a_config_descriptor_claiming_a_huge_size_is_never_read(tmp_path: Path, layers: Layers) -> None:
    store = _three_snapshots(tmp_path, layers)
    forged = _forge_manifest(store, {"config": {"mediaType": "x", "digest": "sha256:" + "0" * 64, "size": 1 << 40}})
    with pytest.raises(StorageError, match=r"the config is 1099511627776 bytes by the descriptor naming it, more than"):
        store.read_config(forged)


def test_a_blob_that_is_a_symlink_or_altered_is_refused(tmp_path: Path, layers: Layers) -> None:
    store = _three_snapshots(tmp_path, layers)
    entry = store.find(f"web-1:{T1}")
    assert entry is not None
    path = store.blob_path(entry.digest)
    outside = tmp_path / "outside.json"
    outside.write_bytes(path.read_bytes())
    path.unlink()
    path.symlink_to(outside)
    with pytest.raises(StorageError, match=r"cannot read the manifest \(Too many levels of symbolic links\)"):
        store.read_manifest(entry)
    path.unlink()
    path.write_bytes(outside.read_bytes().replace(b"schemaVersion", b"schemaVersiom"))
    with pytest.raises(StorageError, match="does not match its digest"):
        store.read_manifest(entry)
    with pytest.raises(PipelineError, match="not a sha256 digest"):
        store.read_manifest(StoreEntry("x:y", "sha256:../../../etc/passwd", 10))


# --- export ----------------------------------------------------------------------------------------------------------


def _export(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "pipeline", "export", *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60)


def test_export_writes_the_archive_a_commit_writes(tmp_path: Path, layers: Layers) -> None:
    store = _three_snapshots(tmp_path, layers)
    archive = tmp_path / "out" / "web.tar"
    result = _export(f"web-1:{T2}", "-o", str(archive), "--store", str(store.root))
    assert result.returncode == 0, result.stderr
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        docker = json.load(tar.extractfile("manifest.json"))  # type: ignore[arg-type]
        index = json.load(tar.extractfile("index.json"))  # type: ignore[arg-type]
        repositories = json.load(tar.extractfile("repositories"))  # type: ignore[arg-type]
    entry = store.find(f"web-1:{T2}")
    assert entry is not None
    manifest = store.read_manifest(entry)
    assert docker == [
        {
            "Config": f"blobs/sha256/{manifest['config']['digest'][7:]}",
            "RepoTags": [f"web-1:{T2}"],
            "Layers": [f"blobs/sha256/{d['digest'][7:]}" for d in manifest["layers"]],
        }
    ]
    assert index["manifests"][0]["digest"] == entry.digest  # the store's manifest, byte for byte
    assert index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"] == T2
    assert repositories == {"web-1": {T2: manifest["config"]["digest"][7:]}}
    assert {"oci-layout", f"blobs/sha256/{layers.base.hex}", f"blobs/sha256/{entry.digest[7:]}"} <= set(names)


def test_export_of_a_reference_not_in_the_store_names_those_that_are(tmp_path: Path, layers: Layers) -> None:
    store = _three_snapshots(tmp_path, layers)
    archive = tmp_path / "web.tar"
    result = _export("web-1:2026-11-30T0900", "-o", str(archive), "--store", str(store.root))
    assert result.returncode == 1 and not archive.exists()
    assert result.stderr.splitlines() == [
        f"ERROR: {store.root}: no snapshot 'web-1:2026-11-30T0900' in the store; it holds web-1:{T1}, web-1:{T2}"
    ]
    result = _export("web-1:x", "-o", str(archive), "--store", str(tmp_path / "none"))
    assert result.returncode == 1 and "no snapshot store here (no index.json)" in result.stderr


def test_export_refuses_zstd_layers_in_a_docker_archive(tmp_path: Path, layers: Layers) -> None:
    store = SnapshotStore(tmp_path / "store")
    record = LayerRecord(layers.base.diff_id, layers.base.size)
    zstd = compression.compress_blob(layers.cache.root, record, "zstd", 3)
    _add(store, layers.cache, f"web-1:{T1}", [zstd])
    with pytest.raises(OutputError, match=r"has zstd layers, which a docker-archive cannot hold.*--format oci"):
        store.export_image(f"web-1:{T1}", tmp_path / "web.tar", "both")
    store.export_image(f"web-1:{T1}", tmp_path / "web.tar", "oci")
    with tarfile.open(tmp_path / "web.tar") as tar:
        assert "manifest.json" not in tar.getnames() and f"blobs/sha256/{zstd.hex}" in tar.getnames()

"""`SnapshotAll --push REGISTRY/PREFIX`: each snapshot of the store pushed to a real docker-registry on 127.0.0.1;
a delta snapshot sends only its delta layer and config, an unchanged one only its manifest under the new tag."""

import json
import subprocess
from pathlib import Path

import pytest

from tests.support.cli import run_luigi
from tests.support.imagecheck import compare_trees, unpack_layers_with_python
from tests.support.overlay_storage import TreeView, read_tree
from tests.support.registry_server import RegistryServer, serve_registry

pytestmark = [pytest.mark.overlay, pytest.mark.tools("docker-registry", "skopeo")]

STAMPS = ("2026-11-30T1000", "2026-11-30T1100", "2026-11-30T1200")


def _snapshot(root: Path, work: Path, stamp: str, *extra: str) -> subprocess.CompletedProcess[str]:
    isolated = {"DOCKER_CONFIG": str(work / "no-docker-config")}
    return run_luigi(
        "SnapshotAll", "--snapshot", stamp, "--storage-root", str(root), "--containers", "demo-web",
        "--commit-output-dir", str(work / "out"), "--commit-cache-dir", str(work / "cache"),
        "--registry-insecure", "true", "--registry-backoff", "0.05", *extra,
        env=isolated,
    )  # fmt: skip


def _pulled_tree(server: RegistryServer, reference: str, work: Path) -> TreeView:
    """The root filesystem of reference as the registry serves it: skopeo copies it to a docker-archive, whose
    layers are applied in order."""
    archive = work / f"{reference.replace('/', '_').replace(':', '_')}.tar"
    source = f"docker://{server.host}/{reference}"
    subprocess.run(
        ["skopeo", "copy", "--src-tls-verify=false", source, f"docker-archive:{archive}"],
        check=True,
        capture_output=True,
    )
    unpack_layers_with_python(archive, work / f"{archive.stem}-root")
    return read_tree(work / f"{archive.stem}-root")


def _merged_view(root: Path, container_id: str, work: Path) -> TreeView:
    """The container's root filesystem as the kernel merges it (read-only: lowerdirs only, nothing written)."""
    layer = root / "overlay2" / container_id
    lower = root / "overlay2" / (layer / "lower").read_text().strip()
    merged = work / "merged"
    merged.mkdir()
    options = f"lowerdir={layer / 'diff'}:{lower}"
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, str(merged)], check=True)
    try:
        return read_tree(merged)
    finally:
        subprocess.run(["umount", str(merged)], check=True)


def test_snapshots_pushed_from_the_store_send_only_what_is_new(
    sample_storage: tuple[Path, str], tmp_path: Path
) -> None:
    root, container_id = sample_storage
    upper = root / "overlay2" / container_id / "diff"
    with serve_registry(tmp_path / "registry") as server:
        prefix = f"{server.host}/fleet"
        first = _snapshot(root, tmp_path, STAMPS[0], "--push", prefix)
        assert first.returncode == 0, first.stderr
        first_uploads = set(server.uploads("fleet/demo-web"))

        (upper / "app" / "added-later.txt").write_bytes(b"a change of a few bytes\n")
        second = _snapshot(root, tmp_path, STAMPS[1], "--push", prefix)
        assert second.returncode == 0, second.stderr
        second_uploads = set(server.uploads("fleet/demo-web")) - first_uploads

        third = _snapshot(root, tmp_path, STAMPS[2], "--push", prefix)  # nothing changed
        assert third.returncode == 0, third.stderr
        third_uploads = set(server.uploads("fleet/demo-web")) - first_uploads - second_uploads

        index = json.loads((tmp_path / "out" / "store" / "index.json").read_bytes())
        manifests = {m["annotations"]["org.opencontainers.image.ref.name"]: m["digest"] for m in index["manifests"]}
        store_blob = tmp_path / "out" / "store" / "blobs" / "sha256"
        delta_manifest = json.loads((store_blob / manifests[f"demo-web:{STAMPS[1]}"].split(":")[1]).read_bytes())
        # The delta snapshot sent its delta layer and its config, nothing of the layers it shares.
        assert second_uploads == {delta_manifest["layers"][-1]["digest"], delta_manifest["config"]["digest"]}
        assert third_uploads == set()  # an unchanged snapshot: its manifest under a new tag, no blob
        for stamp in STAMPS:
            tags = subprocess.run(
                ["skopeo", "inspect", "--tls-verify=false", "--raw", f"docker://{prefix}/demo-web:{stamp}"],
                check=True,
                capture_output=True,
            ).stdout
            assert json.loads(tags)["layers"], stamp
        pushed = _pulled_tree(server, f"fleet/demo-web:{STAMPS[1]}", tmp_path)
    compare_trees(_merged_view(root, container_id, tmp_path), pushed, label="pulled back from the registry")


def test_push_with_a_standalone_archive_format_is_refused_before_anything_is_written(
    sample_storage: tuple[Path, str], tmp_path: Path
) -> None:
    root, _ = sample_storage
    result = _snapshot(root, tmp_path, STAMPS[0], "--push", "127.0.0.1:1/fleet", "--format", "both")
    assert result.returncode != 0
    assert "--push 127.0.0.1:1/fleet: pushes snapshots of the store; drop --format both" in result.stderr
    assert not (tmp_path / "out" / "store").exists()

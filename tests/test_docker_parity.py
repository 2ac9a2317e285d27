"""The image config the pipeline writes against what `docker commit` (Docker Engine 20.10) writes for the same real
container, field by field, and against `docker history` and `docker image inspect` once both images are loaded.

Each scenario is one container of a private offline dockerd (tests/support/dockerd.py), committed by docker and by the
command line with the same options. Differences kept on purpose are named here and explained in
pipeline/image/imageconfig.py build_image_config; everything else must be equal.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from pipeline.image.imageconfig import EMPTY_LAYER_DIFF_ID
from tests.support.cli import commit_args, run_luigi
from tests.support.dockerd import Dockerd
from tests.support.imagecheck import read_archive_manifest

pytestmark = pytest.mark.docker

BASE = "pipeline-parity/base:1"
# A base image with a real build history (COPY only: the legacy builder, nothing to pull) and a config that sets
# every setting a container inherits: empty_layer entries, a WORKDIR layer, an ENTRYPOINT the scenarios override.
DOCKERFILE = b"""\
FROM pipeline-test/busybox:latest
ENV APP_HOME=/srv/app PATH=/bin
LABEL org.example.team=parity version=1
WORKDIR /srv/app
COPY hello.txt /srv/app/hello.txt
EXPOSE 8080/tcp 9090/udp
ENTRYPOINT ["env"]
CMD ["sh"]
STOPSIGNAL SIGINT
"""
CHANGE = "echo changed > /tmp/changed.txt && rm /srv/app/hello.txt"
# Written by docker, left out by the pipeline on purpose (legacy fields: see build_image_config).
NOT_WRITTEN = frozenset({"container_config", "docker_version"})


@dataclass(frozen=True)
class Scenario:
    name: str
    create: tuple[str, ...]  # `docker create` arguments after --name: options, the image, the command
    change: bool = True  # start it and change a file with docker exec
    running: bool = True  # committed while it runs (docker pauses it, the pipeline freezes its cgroup)
    options: tuple[str, ...] = ()  # commit options, spelled the same for docker commit and the command line


SCENARIOS = [
    Scenario("running", ("-e", "FOO=bar", "-w", "/tmp", BASE, "sleep", "100000")),
    Scenario("stopped", ("-e", "FOO=bar", "-w", "/tmp", BASE, "sleep", "100000"), running=False),
    Scenario(
        "options",
        (BASE, "sleep", "100000"),
        options=("--author", "Ann <ann@example.org>", "--message", "a message")
        + ("--change", "ENV A=1", "--change", 'CMD ["echo", "x"]', "--change", "LABEL version=2"),
    ),
    # --entrypoint '' leaves the container without an entrypoint, where the base image has one.
    Scenario("no-entrypoint", ("--hostname", "h1", "--entrypoint", "", BASE, "sleep", "100000")),
    # Created, never started, nothing changed: an empty layer, and no Cmd (docker writes no created_by).
    Scenario(
        "unchanged-tty-no-cmd",
        ("--hostname", "h2", "--domainname", "example.org", "--user", "1000:1000", "--entrypoint", "/bin/sh")
        + ("-t", "-i", "-l", "extra=yes", BASE),
        change=False,
        running=False,
    ),
]


@dataclass(frozen=True)
class Commits:
    docker: dict[str, Any]  # docker commit's config, from docker save
    ours: dict[str, Any]  # the command line's config, from its archive
    docker_ref: str
    ours_ref: str  # our archive, docker loaded


def _context_tar() -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in {"Dockerfile": DOCKERFILE, "hello.txt": b"hello\n"}.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _archive_config(archive: Path) -> dict[str, Any]:
    with tarfile.open(archive, "r:") as tar:
        member = tar.extractfile(read_archive_manifest(archive)["Config"])
        assert member is not None
        config: dict[str, Any] = json.load(member)
    return config


@pytest.fixture(scope="module")
def base_image(dockerd: Dockerd, busybox_image: str) -> Iterator[str]:
    dockerd.run("build", "--quiet", "--tag", BASE, "-", input=_context_tar())
    yield BASE
    dockerd.attempt("rmi", BASE)


@pytest.fixture(scope="module", params=SCENARIOS, ids=[s.name for s in SCENARIOS])
def commits(
    request: pytest.FixtureRequest, dockerd: Dockerd, base_image: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Commits]:
    """One container of the scenario, committed by docker and by the command line; both images loaded."""
    scenario: Scenario = request.param
    work = tmp_path_factory.mktemp(scenario.name)
    name = f"parity-{scenario.name}"
    docker_ref, ours_ref = f"pipeline-parity/docker-{scenario.name}:1", f"pipeline-parity/ours-{scenario.name}:1"
    dockerd.run("create", "--network", "none", "--name", name, *scenario.create)
    try:
        if scenario.change:
            dockerd.run("start", name)
            dockerd.run("exec", name, "sh", "-c", CHANGE)
        if not scenario.running:
            dockerd.attempt("kill", name)
        dockerd.run("commit", *scenario.options, name, docker_ref)
        dockerd.run("save", "--output", str(work / "docker.tar"), docker_ref)
        archive = work / "ours.tar"
        args = commit_args(dockerd.root, work, "--id", name, "--storage-engine", "docker", "--image", ours_ref)
        result = run_luigi(*args, *scenario.options, "--output", str(archive))
        assert result.returncode == 0, result.stderr
        assert f"Loaded image: {ours_ref}" in dockerd.run("load", "--input", str(archive))
        yield Commits(_archive_config(work / "docker.tar"), _archive_config(archive), docker_ref, ours_ref)
    finally:
        dockerd.attempt("rm", "--force", name)
        dockerd.attempt("rmi", docker_ref, ours_ref)


def _created(text: str) -> datetime:
    # Go writes nanoseconds, which Python's fromisoformat (3.11) reads only up to microseconds.
    whole, _, fraction = text.removesuffix("Z").partition(".")
    return datetime.fromisoformat(whole + "+00:00") + timedelta(microseconds=int((fraction + "000000")[:6]))


def _is_empty_commit(c: Commits) -> bool:
    return bool(c.docker["history"][-1].get("empty_layer"))


def test_top_level_fields_match_docker_commit(commits: Commits) -> None:
    docker, ours = commits.docker, commits.ours
    assert set(ours) == set(docker) - NOT_WRITTEN
    assert docker["docker_version"] and docker["container_config"]  # what is left out is really there in docker's
    for key in ("architecture", "os", "container", "author"):
        assert ours.get(key) == docker.get(key), key
    # Whole seconds (reproducible with SOURCE_DATE_EPOCH) where docker has nanoseconds; committed right after.
    assert ours["created"].endswith("Z") and "." not in ours["created"]
    assert timedelta(0) <= _created(ours["created"]) - _created(docker["created"]).replace(microsecond=0)
    assert _created(ours["created"]) - _created(docker["created"]) < timedelta(minutes=2)


def test_config_matches_docker_commit_field_by_field(commits: Commits) -> None:
    docker, ours = commits.docker["config"], commits.ours["config"]
    for key in sorted(set(docker) | set(ours)):
        assert ours.get(key, "<absent>") == docker.get(key, "<absent>"), key


def test_history_matches_docker_commit_entry_by_entry(commits: Commits) -> None:
    docker, ours = commits.docker["history"], commits.ours["history"]
    assert len(ours) == len(docker)
    for i, (mine, theirs) in enumerate(zip(ours, docker, strict=True)):
        fields = ("created_by", "comment", "author") + (("empty_layer",) if i < len(docker) - 1 else ())
        for key in fields:
            assert mine.get(key) == theirs.get(key), (i, key)
        if i < len(docker) - 1:
            assert mine["created"] == theirs["created"], i  # the base image's own entries, as they were


def test_rootfs_shares_the_base_layers_and_pairs_with_history(commits: Commits) -> None:
    docker, ours = commits.docker["rootfs"], commits.ours["rootfs"]
    assert ours["type"] == docker["type"] == "layers"
    # The base image's layers, reassembled from dockerd's tar-split records: the same diff_ids. The container's
    # own layer is packed by the pipeline, so its diff_id is not docker's (tar headers differ, not content).
    base_layers = len(commits.ours["history"]) - 1 - sum(1 for h in commits.ours["history"] if h.get("empty_layer"))
    assert ours["diff_ids"][:base_layers] == docker["diff_ids"][:base_layers]
    non_empty = [h for h in commits.ours["history"] if not h.get("empty_layer")]
    assert len(non_empty) == len(ours["diff_ids"])


def test_container_without_changes_adds_no_layer_as_docker(commits: Commits) -> None:
    assert len(commits.ours["rootfs"]["diff_ids"]) == len(commits.docker["rootfs"]["diff_ids"])
    assert commits.ours["history"][-1].get("empty_layer") == commits.docker["history"][-1].get("empty_layer")
    assert (EMPTY_LAYER_DIFF_ID in commits.ours["rootfs"]["diff_ids"]) == (
        EMPTY_LAYER_DIFF_ID in commits.docker["rootfs"]["diff_ids"]
    )


def test_docker_history_of_both_images_matches(commits: Commits, dockerd: Dockerd) -> None:
    def rows(ref: str) -> list[str]:
        listing = dockerd.run("history", "--no-trunc", "--format", "{{.CreatedBy}}|{{.Comment}}|{{.Size}}", ref)
        return listing.splitlines()

    docker, ours = rows(commits.docker_ref), rows(commits.ours_ref)
    if _is_empty_commit(commits):
        assert ours[0].endswith("|0B")  # the empty layer's row: no bytes
    assert ours == docker


def test_docker_inspect_of_both_images_matches(commits: Commits, dockerd: Dockerd) -> None:
    [docker] = json.loads(dockerd.run("image", "inspect", commits.docker_ref))
    [ours] = json.loads(dockerd.run("image", "inspect", commits.ours_ref))
    for key in ("Config", "Container", "Author", "Comment", "Architecture", "Os", "Variant", "Size"):
        assert ours.get(key) == docker.get(key), key
    # Legacy fields the pipeline does not write: docker shows them empty.
    assert ours["DockerVersion"] == "" and ours["ContainerConfig"]["Cmd"] is None

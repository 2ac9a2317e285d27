import hashlib
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from pipeline.engines.container import Container, Layer, pick_docker_config
from pipeline.errors import StorageError
from pipeline.image.dockerarchive import build_docker_manifest, build_repositories
from pipeline.image.imageconfig import (
    EMPTY_LAYER_DIFF_ID,
    CommitOptions,
    build_image_config,
    encode_json,
    format_created,
)
from pipeline.image.reference import parse_reference


def _container(lower: int = 2, **config: object) -> Container:
    return Container(
        container_id="c" * 64,
        name="/web",
        created="",
        running=False,
        pid=0,
        image="base:1.0",
        lower_layers=tuple(Layer(f"l{i}", Path(f"/x/l{i}/diff")) for i in range(lower)),
        upper_layer=Layer("c" * 64, Path("/x/c/diff")),
        config=dict(config),
    )


BASE: dict[str, Any] = {
    "architecture": "arm64",
    "os": "linux",
    "config": {"Env": ["A=1"], "Cmd": ["/old"], "WorkingDir": "/srv", "Labels": {"k": "v"}},
    "history": [{"created_by": "a"}, {"created_by": "meta", "empty_layer": True}, {"created_by": "b"}],
}


def test_container_cmd_overrides_base_and_base_settings_stay() -> None:
    config = build_image_config(_container(Cmd=["/new", "arg"]), BASE, ["sha256:1", "sha256:2", "sha256:3"], created=0)
    assert config["config"] == {
        "Env": ["A=1"], "Cmd": ["/new", "arg"], "WorkingDir": "/srv", "Labels": {"k": "v"}, "Image": "base:1.0"
    }  # fmt: skip
    assert config["architecture"] == "arm64" and config["os"] == "linux"
    assert config["rootfs"] == {"type": "layers", "diff_ids": ["sha256:1", "sha256:2", "sha256:3"]}


def test_history_has_one_non_empty_entry_per_layer() -> None:
    config = build_image_config(_container(), BASE, ["sha256:1", "sha256:2", "sha256:3"], created=0)
    non_empty = [h for h in config["history"] if not h.get("empty_layer")]
    assert len(non_empty) == len(config["rootfs"]["diff_ids"])
    assert config["history"][:3] == BASE["history"]
    assert config["history"][-1] == {"created": "1970-01-01T00:00:00Z", "created_by": "/old"}  # the Cmd it runs


def test_base_history_that_does_not_pair_with_layers_is_replaced() -> None:
    config = build_image_config(_container(lower=3), BASE, ["sha256:1"] * 4, created=0)
    assert len(config["history"]) == 4
    assert all(not h.get("empty_layer") for h in config["history"])


def test_no_base_config_gives_host_defaults() -> None:
    config = build_image_config(_container(lower=0, Cmd=["/bin/sh"]), None, ["sha256:1"], created=86400)
    assert config["os"] == "linux" and config["architecture"]
    assert config["created"] == "1970-01-02T00:00:00Z" == format_created(86400)
    assert config["config"] == {"Cmd": ["/bin/sh"], "Image": "base:1.0"}


def test_json_with_quotes_and_unicode_is_encoded_as_json_not_text() -> None:
    doc = {"Env": ['GREETING=say "hi"', "NAME=café"], "b": 1, "a": 2}
    data = encode_json(doc)
    assert json.loads(data) == doc
    assert data.startswith(b'{"Env"') and data.index(b'"a"') < data.index(b'"b"')


def test_manifest_points_at_blobs_and_repo_tags() -> None:
    ref = parse_reference("localhost:5000/team/app")
    [item] = build_docker_manifest("sha256:" + "c" * 64, ["sha256:" + "1" * 64], ref)
    assert item == {
        "Config": "blobs/sha256/" + "c" * 64,
        "RepoTags": ["localhost:5000/team/app:latest"],
        "Layers": ["blobs/sha256/" + "1" * 64],
    }


def test_repositories_maps_name_and_tag_to_the_image_id() -> None:
    ref = parse_reference('app:v"1'.replace('"', ""))
    assert build_repositories(ref, "sha256:" + "a" * 64) == {"app": {"v1": "a" * 64}}


# --- docker parity: what `docker commit` (moby v20.10) writes, checked against real commits by test_docker_parity ---

# config.v2.json's Config of `docker create --hostname h2 --domainname example.org --entrypoint '' -t -i base:1.0
# sleep 100`: the image's defaults (Env, Labels, WorkingDir, StopSignal) merged in at create time.
DOCKER_CONFIG: dict[str, Any] = {
    "Hostname": "h2",
    "Domainname": "example.org",
    "User": "",
    "AttachStdin": True,
    "AttachStdout": True,
    "AttachStderr": True,
    "ExposedPorts": {"8080/tcp": {}},
    "Tty": True,
    "OpenStdin": True,
    "StdinOnce": True,
    "Env": ["PATH=/bin"],
    "Cmd": ["sleep", "100"],
    "Image": "base:1.0",
    "Volumes": None,
    "WorkingDir": "/srv",
    "Entrypoint": None,
    "OnBuild": None,
    "Labels": {"k": "v"},
    "StopSignal": "SIGINT",
}
# The base image's config as docker build leaves it: its own Image is the id of its parent build step.
DOCKER_BASE = {
    **BASE,
    "config": {**BASE["config"], "Entrypoint": ["env"], "Hostname": "", "Image": "sha256:" + "9" * 64, "Tty": False},
}


def _docker_container(config: dict[str, Any], lower: int = 2) -> Container:
    return replace(_container(lower), full_config=pick_docker_config(config, Path("config.v2.json")))


def _commit(container: Container, diff_ids: int = 3, **options: Any) -> dict[str, Any]:
    return build_image_config(container, DOCKER_BASE, [f"sha256:{i}" for i in range(diff_ids)], created=0,
                              options=CommitOptions(**options))  # fmt: skip


def test_docker_container_config_is_written_whole_not_merged_over_the_base() -> None:
    config = _commit(_docker_container(DOCKER_CONFIG))["config"]
    # --entrypoint '' left the container without one: the base's ["env"] must not come back.
    assert config == DOCKER_CONFIG
    assert (config["Hostname"], config["Image"], config["Tty"], config["Entrypoint"]) == ("h2", "base:1.0", True, None)


def test_docker_config_has_go_json_shape_zero_values_and_omitempty() -> None:
    recorded = {"Cmd": ["sh"], "Image": "base", "ExposedPorts": {}, "MacAddress": "", "StopTimeout": 0, "Labels": None}
    config = _commit(_docker_container(recorded), extra_config={"Memory": 0})["config"]
    assert config == {
        "Hostname": "", "Domainname": "", "User": "",
        "AttachStdin": False, "AttachStdout": False, "AttachStderr": False,
        "Tty": False, "OpenStdin": False, "StdinOnce": False,
        "Env": None, "Cmd": ["sh"], "Image": "base", "Volumes": None, "WorkingDir": "", "Entrypoint": None,
        "OnBuild": None,
        "Labels": {},  # daemon/commit.go merge() never leaves Labels null
        "StopTimeout": 0,  # a pointer: omitted only when null
        "Memory": 0,  # --config keys docker's Config does not have are kept
    }  # fmt: skip


def test_docker_config_gets_changes_and_entrypoint_change_clears_cmd_to_null() -> None:
    container = _docker_container(DOCKER_CONFIG)
    config = _commit(container, changes=("ENV A=1", "LABEL x=y"))["config"]
    assert config == {**DOCKER_CONFIG, "Env": ["PATH=/bin", "A=1"], "Labels": {"k": "v", "x": "y"}}
    config = _commit(container, changes=('ENTRYPOINT ["/bin/sh"]',))["config"]
    assert config["Entrypoint"] == ["/bin/sh"] and "Cmd" in config and config["Cmd"] is None


def test_history_created_by_is_the_containers_cmd_without_entrypoint_and_before_changes() -> None:
    container = _docker_container({**DOCKER_CONFIG, "Entrypoint": ["env"], "Cmd": ["sh", "-c", "echo hi"]})
    image = _commit(container, changes=('CMD ["other"]',), author="Ann", message="why")
    assert image["history"][-1] == {
        "created": "1970-01-01T00:00:00Z", "created_by": "sh -c echo hi", "author": "Ann", "comment": "why"
    }  # fmt: skip
    assert image["author"] == "Ann" and "comment" not in image


def test_history_created_by_is_left_out_when_a_docker_container_has_no_cmd() -> None:
    image = _commit(_docker_container({**DOCKER_CONFIG, "Entrypoint": ["/bin/sh"], "Cmd": None}))
    assert image["history"][-1] == {"created": "1970-01-01T00:00:00Z"}


def test_history_names_the_container_when_the_engine_records_no_cmd() -> None:
    base = {**BASE, "config": {"Env": ["A=1"]}}
    image = build_image_config(_container(), base, ["sha256:1", "sha256:2", "sha256:3"], created=0)
    assert image["history"][-1]["created_by"] == f"commit of container web ({'c' * 64})"


def test_image_names_what_the_container_was_created_from_not_the_bases_stale_parent() -> None:
    image = build_image_config(_container(Cmd=["/x"]), DOCKER_BASE, ["sha256:1"] * 3, created=0)
    assert image["config"]["Image"] == "base:1.0"
    # Settings the engine does not record keep the base's values.
    assert (image["config"]["Hostname"], image["config"]["Entrypoint"]) == ("", ["env"])
    unnamed = build_image_config(replace(_container(), image=""), DOCKER_BASE, ["sha256:1"] * 3, created=0)
    assert "Image" not in unnamed["config"]


def test_container_layer_left_out_gets_an_empty_layer_history_entry() -> None:
    container = _docker_container(DOCKER_CONFIG)
    kept = _commit(container, diff_ids=3)
    assert "empty_layer" not in kept["history"][-1]
    empty = _commit(container, diff_ids=2)
    assert empty["history"][-1]["empty_layer"] is True and empty["rootfs"]["diff_ids"] == ["sha256:0", "sha256:1"]
    assert sum(1 for h in empty["history"] if not h.get("empty_layer")) == len(empty["rootfs"]["diff_ids"])


def test_empty_layer_diff_id_is_the_digest_of_a_tar_without_entries() -> None:
    assert EMPTY_LAYER_DIFF_ID == "sha256:" + hashlib.sha256(bytes(1024)).hexdigest()


def test_base_platform_details_are_kept_and_legacy_docker_fields_are_not_written() -> None:
    base = {**DOCKER_BASE, "architecture": "arm", "variant": "v7", "os.version": "1", "os.features": ["f"]}
    image = build_image_config(_docker_container(DOCKER_CONFIG), base, ["sha256:1"] * 3, created=0)
    platform = {key: image[key] for key in ("architecture", "variant", "os.version", "os.features")}
    assert platform == {"architecture": "arm", "variant": "v7", "os.version": "1", "os.features": ["f"]}
    assert image["container"] == "c" * 64
    assert "container_config" not in image and "docker_version" not in image


@pytest.mark.parametrize(
    ("key", "value"),
    [("Hostname", 5), ("Tty", "yes"), ("Cmd", "sleep 1"), ("StopTimeout", True), ("Labels", ["a"])],
)
def test_docker_config_of_the_wrong_json_type_is_refused(key: str, value: object) -> None:
    with pytest.raises(StorageError, match=f"config.v2.json: Config.{key} must be a JSON"):
        pick_docker_config({**DOCKER_CONFIG, key: value}, Path("config.v2.json"))


def test_docker_config_keeps_nulls_and_drops_unknown_keys() -> None:
    picked = pick_docker_config({"Cmd": None, "Entrypoint": ["x"], "Unknown": 1}, Path("config.v2.json"))
    assert picked == {"Cmd": None, "Entrypoint": ["x"]}

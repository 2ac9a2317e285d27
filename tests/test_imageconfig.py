import json
from pathlib import Path

from pipeline.container import Container, Layer
from pipeline.imageconfig import build_image_config, encode_json, format_created
from pipeline.manifest import build_manifest, build_repositories
from pipeline.reference import parse_reference


def _container(lower: int = 2, **config: object) -> Container:
    return Container(
        container_id="c" * 64,
        name="/web",
        created="",
        running=False,
        pid=0,
        image="base:1.0",
        lower_layers=tuple(Layer(f"l{i}", Path(f"/x/l{i}/diff")) for i in range(lower)),
        layer=Layer("c" * 64, Path("/x/c/diff")),
        config=dict(config),
    )


BASE = {
    "architecture": "arm64",
    "os": "linux",
    "config": {"Env": ["A=1"], "Cmd": ["/old"], "WorkingDir": "/srv", "Labels": {"k": "v"}},
    "history": [{"created_by": "a"}, {"created_by": "meta", "empty_layer": True}, {"created_by": "b"}],
}


def test_container_cmd_overrides_base_and_base_settings_stay() -> None:
    config = build_image_config(_container(Cmd=["/new", "arg"]), BASE, ["sha256:1", "sha256:2", "sha256:3"], created=0)
    assert config["config"] == {"Env": ["A=1"], "Cmd": ["/new", "arg"], "WorkingDir": "/srv", "Labels": {"k": "v"}}
    assert config["architecture"] == "arm64" and config["os"] == "linux"
    assert config["rootfs"] == {"type": "layers", "diff_ids": ["sha256:1", "sha256:2", "sha256:3"]}


def test_history_has_one_non_empty_entry_per_layer() -> None:
    config = build_image_config(_container(), BASE, ["sha256:1", "sha256:2", "sha256:3"], created=0)
    non_empty = [h for h in config["history"] if not h.get("empty_layer")]
    assert len(non_empty) == len(config["rootfs"]["diff_ids"])
    assert config["history"][:3] == BASE["history"]
    assert "web" in config["history"][-1]["created_by"]


def test_base_history_that_does_not_pair_with_layers_is_replaced() -> None:
    config = build_image_config(_container(lower=3), BASE, ["sha256:1"] * 4, created=0)
    assert len(config["history"]) == 4
    assert all(not h.get("empty_layer") for h in config["history"])


def test_no_base_config_gives_host_defaults() -> None:
    config = build_image_config(_container(lower=0, Cmd=["/bin/sh"]), None, ["sha256:1"], created=86400)
    assert config["os"] == "linux" and config["architecture"]
    assert config["created"] == "1970-01-02T00:00:00Z" == format_created(86400)
    assert config["config"] == {"Cmd": ["/bin/sh"]}


def test_json_with_quotes_and_unicode_is_encoded_as_json_not_text() -> None:
    doc = {"Env": ['GREETING=say "hi"', "NAME=café"], "b": 1, "a": 2}
    data = encode_json(doc)
    assert json.loads(data) == doc
    assert data.startswith(b'{"Env"') and data.index(b'"a"') < data.index(b'"b"')


def test_manifest_points_at_blobs_and_repo_tags() -> None:
    ref = parse_reference("localhost:5000/team/app")
    [item] = build_manifest("sha256:" + "c" * 64, ["sha256:" + "1" * 64], ref)
    assert item == {
        "Config": "blobs/sha256/" + "c" * 64,
        "RepoTags": ["localhost:5000/team/app:latest"],
        "Layers": ["blobs/sha256/" + "1" * 64],
    }


def test_repositories_maps_name_and_tag_to_the_image_id() -> None:
    ref = parse_reference('app:v"1'.replace('"', ""))
    assert build_repositories(ref, "sha256:" + "a" * 64) == {"app": {"v1": "a" * 64}}

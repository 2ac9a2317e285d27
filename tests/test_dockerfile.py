import pytest

from pipeline.errors import InvalidChange
from pipeline.image.dockerfile import apply_changes

BASE = {"Env": ["PATH=/bin", "A=1"], "Cmd": ["sh"], "WorkingDir": "/srv", "Labels": {"old": "x"}}


def test_cmd_and_entrypoint_accept_exec_and_shell_forms() -> None:
    config = apply_changes(BASE, ['CMD ["nginx", "-g", "daemon off;"]'])
    assert config["Cmd"] == ["nginx", "-g", "daemon off;"]
    config = apply_changes(BASE, ["ENTRYPOINT exec python app.py"])
    assert config["Entrypoint"] == ["/bin/sh", "-c", "exec python app.py"] and "Cmd" not in config


def test_env_replaces_by_name_and_keeps_order() -> None:
    config = apply_changes(BASE, ['ENV A=2 B="two words"', "ENV C legacy form value"])
    assert config["Env"] == ["PATH=/bin", "A=2", "B=two words", "C=legacy form value"]


def test_labels_ports_volumes_user_stopsignal_onbuild() -> None:
    config = apply_changes(
        BASE,
        [
            'LABEL version=1.0 "com.example.quoted"="say \\"hi\\""',
            "EXPOSE 80 53/udp 8000-8002",
            'VOLUME ["/data"]',
            "VOLUME /cache /logs",
            "USER 1000:1000",
            "STOPSIGNAL SIGQUIT",
            "ONBUILD RUN make",
        ],
    )
    assert config["Labels"] == {"old": "x", "version": "1.0", "com.example.quoted": 'say "hi"'}
    assert list(config["ExposedPorts"]) == ["80/tcp", "53/udp", "8000/tcp", "8001/tcp", "8002/tcp"]
    assert set(config["Volumes"]) == {"/data", "/cache", "/logs"}
    assert (config["User"], config["StopSignal"], config["OnBuild"]) == ("1000:1000", "SIGQUIT", ["RUN make"])


def test_relative_workdir_builds_on_the_previous_one() -> None:
    assert apply_changes(BASE, ["WORKDIR app", "WORKDIR ../lib"])["WorkingDir"] == "/srv/lib"


def test_the_input_config_is_not_modified() -> None:
    apply_changes(BASE, ["ENV A=changed", "LABEL old=y"])
    assert BASE["Env"] == ["PATH=/bin", "A=1"] and BASE["Labels"] == {"old": "x"}


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ("RUN rm -rf /", "RUN is not allowed"),
        ("CMD", "needs an argument"),
        ('CMD ["unterminated', "not a JSON array"),
        ("EXPOSE 99999", "not a port"),
        ("EXPOSE 90-80", "not a valid port range"),
        ("ENV =nokey", "not key=value"),
        ("ONBUILD FROM scratch", "ONBUILD FROM is not allowed"),
    ],
)
def test_invalid_changes_are_refused_in_one_line(change: str, needle: str) -> None:
    with pytest.raises(InvalidChange, match=needle) as error:
        apply_changes(BASE, [change])
    assert "\n" not in str(error.value)

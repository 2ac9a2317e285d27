"""Tests for pipeline.image.reference: Docker's NAME[:TAG] grammar and default names derived from containers."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.errors import InvalidReference, PipelineError
from pipeline.image.reference import Reference, build_reference_from_name, parse_reference

# --- valid references ---------------------------------------------------------------------------------------------


def test_bare_name_gets_latest_tag() -> None:
    ref = parse_reference("busybox")
    assert ref == Reference(name="busybox", tag="latest")
    assert str(ref) == "busybox:latest"


def test_explicit_tag_is_kept() -> None:
    ref = parse_reference("busybox:1.36.1-musl")
    assert (ref.name, ref.tag) == ("busybox", "1.36.1-musl")


def test_name_without_host_has_no_domain() -> None:
    ref = parse_reference("library/busybox:stable")
    assert ref.domain is None
    assert ref.path == "library/busybox"


def test_domain_with_port_is_not_mistaken_for_a_tag() -> None:
    ref = parse_reference("localhost:5000/team/app")
    assert ref == Reference(name="localhost:5000/team/app", tag="latest")
    assert ref.domain == "localhost:5000"
    assert ref.path == "team/app"


def test_domain_with_port_and_tag() -> None:
    ref = parse_reference("registry.example.com:443/x/y:v2")
    assert (ref.domain, ref.path, ref.tag) == ("registry.example.com:443", "x/y", "v2")


def test_localhost_alone_is_a_domain() -> None:
    ref = parse_reference("localhost/app:dev")
    assert (ref.domain, ref.path, ref.tag) == ("localhost", "app", "dev")


def test_dotted_first_component_is_a_domain() -> None:
    ref = parse_reference("registry.example.com/x/y")
    assert (ref.domain, ref.path) == ("registry.example.com", "x/y")


def test_domain_may_hold_uppercase() -> None:
    ref = parse_reference("Registry.Example.com/app")
    assert ref.domain == "Registry.Example.com"


def test_ipv6_domain_in_brackets() -> None:
    ref = parse_reference("[::1]:5000/app:1")
    assert (ref.domain, ref.path, ref.tag) == ("[::1]:5000", "app", "1")


def test_single_component_with_dot_is_a_path_not_a_domain() -> None:
    ref = parse_reference("example.com")
    assert ref.domain is None
    assert ref.path == "example.com"


def test_localhost_with_port_and_no_slash_reads_as_name_and_tag() -> None:
    # Docker reads it the same way: without a "/" there is no domain, so ":5000" is a tag.
    ref = parse_reference("localhost:5000")
    assert (ref.name, ref.tag, ref.domain) == ("localhost", "5000", None)


def test_deeply_nested_path() -> None:
    ref = parse_reference("a/b/c/d/e:t")
    assert ref.path == "a/b/c/d/e"


@pytest.mark.parametrize("name", ["a.b", "a_b", "a__b", "a-b", "a--b", "a---b", "a1.b2_c3__d4-e5--f6", "0", "9x"])
def test_every_separator_of_the_grammar_is_accepted(name: str) -> None:
    assert parse_reference(name).name == name


@pytest.mark.parametrize("tag", ["_", "A", "v1.0", "1.0-RC_1", "x" * 128, "__init__", "Z.-_"])
def test_valid_tags_are_accepted(tag: str) -> None:
    assert parse_reference(f"app:{tag}").tag == tag


def test_name_of_exactly_255_characters_is_accepted() -> None:
    name = "a" * 255
    assert parse_reference(name).name == name


def test_reference_is_immutable() -> None:
    ref = parse_reference("app")
    with pytest.raises(AttributeError):
        ref.tag = "other"  # type: ignore[misc]


# --- invalid references -------------------------------------------------------------------------------------------


def _error(text: str) -> str:
    with pytest.raises(InvalidReference) as caught:
        parse_reference(text)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"invalid image reference {text!r}: ")
    assert "use e.g. --image " in message
    return message


def test_invalid_reference_is_a_pipeline_error() -> None:
    with pytest.raises(PipelineError):
        parse_reference("")


def test_empty_reference_is_refused() -> None:
    assert "it is empty" in _error("")


def test_uppercase_repository_is_refused_with_lowercase_suggestion() -> None:
    message = _error("Foo:bar")
    assert message == ("invalid image reference 'Foo:bar': repository name must be lowercase; use e.g. --image foo:bar")


def test_uppercase_in_nested_path_is_refused() -> None:
    assert "must be lowercase; use e.g. --image localhost:5000/team/app:latest" in _error("localhost:5000/Team/App")


def test_uppercase_first_component_without_dot_is_not_a_domain() -> None:
    assert "must be lowercase" in _error("Localhost/app")


@pytest.mark.parametrize("text", ["-app", "app-", ".app", "app.", "_app", "app_", "a/-b", "a/b_"])
def test_leading_or_trailing_separator_is_refused(text: str) -> None:
    assert "path component" in _error(text)


@pytest.mark.parametrize("text", ["a..b", "a___b", "a._b", "a-.b", "a_-b"])
def test_separators_outside_the_grammar_are_refused(text: str) -> None:
    assert f"path component {text!r}" in _error(text)


def test_colon_with_empty_tag_is_refused() -> None:
    assert "the tag after ':' is empty; use e.g. --image app:latest" in _error("app:")


def test_tag_of_129_characters_is_refused() -> None:
    message = _error("app:" + "x" * 129)
    assert "the tag is 129 characters long, at most 128 are allowed" in message
    assert message.endswith("--image app:" + "x" * 128)


@pytest.mark.parametrize("tag", [".hidden", "-dash", "a b", "a:b", "é", "a+b"])
def test_malformed_tag_is_refused(tag: str) -> None:
    assert "tag " in _error(f"app:{tag}")


def test_slash_after_a_colon_makes_the_colon_part_of_a_registry_host() -> None:
    assert "registry host 'app:a'" in _error("app:a/b")


def test_name_longer_than_255_characters_is_refused() -> None:
    assert "the repository name is 256 characters long, at most 255 are allowed" in _error("a" * 256)


def test_name_length_counts_the_domain() -> None:
    text = "localhost/" + "a" * 246
    assert len(text) == 256
    assert "256 characters long" in _error(text)


def test_digest_is_refused_with_a_tag_suggestion() -> None:
    message = _error("busybox@sha256:" + "a" * 64)
    assert "digest" in message
    assert "RepoTags can only hold a tag" in message
    assert message.endswith("use e.g. --image busybox:latest")


def test_tag_and_digest_is_refused_keeping_the_tag_in_the_suggestion() -> None:
    assert _error("busybox:1.36@sha256:" + "b" * 64).endswith("use e.g. --image busybox:1.36")


@pytest.mark.parametrize("text", ["my app", " app", "app ", "app:1 ", "a\tb", "app\n", "app:v1\n"])
def test_whitespace_is_refused(text: str) -> None:
    message = _error(text)
    assert "path component" in message or "tag " in message


@pytest.mark.parametrize("text", ["a//b", "/app", "app/", "localhost:5000/"])
def test_empty_path_component_is_refused(text: str) -> None:
    assert "empty path component" in _error(text)


def test_doubled_slash_suggestion_drops_the_empty_component() -> None:
    assert _error("a//b:1").endswith("use e.g. --image a/b:1")


@pytest.mark.parametrize("text", ["my_reg.com/app", "-host.com/app", "host.com:port/app", "[::1%eth0]/app"])
def test_malformed_domain_is_refused(text: str) -> None:
    assert "registry host" in _error(text)


def test_unicode_letters_are_refused() -> None:
    assert "path component 'café'" in _error("café")


def test_non_ascii_digits_are_refused_in_a_port() -> None:
    assert "registry host" in _error("localhost:\u0665\u0660/app")


def test_multiline_input_still_gives_a_one_line_message() -> None:
    message = _error("a\nb")
    assert "'a\\nb'" in message


def test_every_suggestion_is_itself_valid() -> None:
    for text in ["", "Foo Bar:x y", "a//B", "@", ":", "my_reg.com/App:", "é:é", "a" * 300 + ":" + "t" * 200]:
        message = _error(text)
        suggestion = message.rsplit("use e.g. --image ", 1)[1]
        assert str(parse_reference(suggestion)) == suggestion


# --- build_reference_from_name ------------------------------------------------------------------------------------

_ID = "0123456789abcdef0123456789abcdef"


def test_plain_container_name_is_used_as_is() -> None:
    assert build_reference_from_name("web", _ID) == Reference(name="web", tag="latest")


def test_container_name_is_lowercased() -> None:
    assert build_reference_from_name("WebServer", _ID).name == "webserver"


def test_spaces_become_dashes() -> None:
    assert build_reference_from_name("my web  server", _ID).name == "my-web-server"


def test_leading_slash_is_dropped() -> None:
    assert build_reference_from_name("/web", _ID).name == "web"


def test_inner_slash_does_not_create_a_registry_domain() -> None:
    ref = build_reference_from_name("/my.host/app", _ID)
    assert ref.domain is None
    assert ref.name == "my.host-app"


def test_valid_separators_in_the_name_are_kept() -> None:
    assert build_reference_from_name("my__app.v2_x--y", _ID).name == "my__app.v2_x--y"


def test_separator_runs_outside_the_grammar_collapse_to_one_dash() -> None:
    assert build_reference_from_name("a._b___c .d", _ID).name == "a-b-c-d"


def test_separators_are_trimmed_at_the_ends() -> None:
    assert build_reference_from_name("--_.app._-", _ID).name == "app"


def test_unicode_characters_become_dashes() -> None:
    assert build_reference_from_name("café crème", _ID).name == "caf-cr-me"


def test_unicode_next_to_a_dash_gives_a_valid_double_dash() -> None:
    assert build_reference_from_name("café-crème", _ID).name == "caf--cr-me"


def test_all_invalid_name_falls_back_to_the_container_id() -> None:
    assert build_reference_from_name("/ ∆∆ /", _ID) == Reference(name="container-0123456789ab", tag="latest")


def test_empty_name_falls_back_to_the_container_id() -> None:
    assert build_reference_from_name("", _ID).name == "container-0123456789ab"


def test_fallback_survives_a_strange_container_id() -> None:
    assert build_reference_from_name("", "").name == "container"
    assert build_reference_from_name("", "ABC DEF").name == "container-abc-def"


def test_very_long_name_is_truncated_to_255() -> None:
    ref = build_reference_from_name("x" * 1000, _ID)
    assert ref.name == "x" * 255


def test_truncation_does_not_leave_a_trailing_separator() -> None:
    ref = build_reference_from_name("a" * 254 + "__bbb", _ID)
    assert ref.name == "a" * 254


def test_built_reference_always_has_latest_tag() -> None:
    assert build_reference_from_name("Some Name", _ID).tag == "latest"


@settings(max_examples=500)
@given(container_name=st.text(max_size=400), container_id=st.text(max_size=64))
def test_built_reference_always_parses(container_name: str, container_id: str) -> None:
    ref = build_reference_from_name(container_name, container_id)
    assert parse_reference(str(ref)) == ref
    assert ref.domain is None
    assert ref.tag == "latest"
    assert 0 < len(ref.name) <= 255


@given(
    container_name=st.text(alphabet=st.sampled_from("aZ09._-/ :@\u00e9"), max_size=300),
    container_id=st.text(alphabet="0123456789abcdef", min_size=12, max_size=64),
)
def test_built_reference_from_separator_heavy_names_always_parses(container_name: str, container_id: str) -> None:
    ref = build_reference_from_name(container_name, container_id)
    assert parse_reference(ref.name) == ref

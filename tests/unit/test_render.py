"""daemon.files.render: payload fields into file contents; a bad payload is an error, never an empty file."""

from __future__ import annotations

import json
import time

import pytest

from daemon.errors import PayloadError
from daemon.files.render import (
    check_templates,
    render,
    render_env,
)
from daemon.model import Secret
from daemon.payload import MAX_DEPTH, MAX_PAYLOAD, fields_of, payload_object, salvage_fields

SECRET = "s3cr3t-Pa55-7f1c"  # a test value that must never leak
DB_FILES = {
    "password": "{{ password }}",
    "dsn": "postgresql://{{ username }}:{{ password }}@db:5432/app",
}


def _db(**fields: object) -> Secret:
    return Secret(json.dumps({"username": "app", "password": SECRET, **fields}))


def test_a_json_object_payload_exposes_its_fields_to_the_templates() -> None:
    files = render(DB_FILES, _db())

    assert files == {
        "password": SECRET.encode(),
        "dsn": f"postgresql://app:{SECRET}@db:5432/app".encode(),
    }


def test_a_plain_payload_is_the_value_field() -> None:
    assert render({"value": "{{ value }}"}, Secret(SECRET)) == {"value": SECRET.encode()}


@pytest.mark.parametrize("payload", ['["a", "b"]', '"quoted"', "42", "null", "{not json"])
def test_a_payload_that_is_not_a_json_object_is_the_value_field_verbatim(payload: str) -> None:
    assert fields_of(Secret(payload)) == {"value": payload}
    assert render({"f": "{{ value }}"}, Secret(payload)) == {"f": payload.encode()}


def test_a_trailing_newline_of_the_template_is_kept() -> None:
    assert render({"f": "{{ value }}\n"}, Secret(SECRET)) == {"f": (SECRET + "\n").encode()}


def test_non_ascii_values_are_written_as_utf_8() -> None:
    assert render({"f": "{{ value }}"}, Secret("pässwörd-€")) == {"f": "pässwörd-€".encode()}


def test_env_templates_render_to_text() -> None:
    env = render_env({"PGPASSWORD": "{{ password }}", "PGUSER": "{{ username }}"}, _db())

    assert env == {"PGPASSWORD": SECRET, "PGUSER": "app"}


def test_a_missing_field_is_a_payload_error_naming_the_file_and_the_field() -> None:
    with pytest.raises(PayloadError) as info:
        render(DB_FILES, Secret(json.dumps({"password": SECRET})))

    message = str(info.value)
    assert "'dsn'" in message
    assert "username" in message
    assert SECRET not in message


def test_a_plain_payload_against_field_templates_is_an_error_not_an_empty_file() -> None:
    with pytest.raises(PayloadError, match="password"):
        render(DB_FILES, Secret(SECRET))


def test_a_template_that_renders_nothing_is_refused() -> None:
    with pytest.raises(PayloadError, match="empty file"):
        render({"f": "{% if false %}x{% endif %}"}, Secret(SECRET))


@pytest.mark.parametrize(
    "template",
    [
        "{{ password.nope }}",
        "{{ password[999] }}",
        "{{ password + 1 }}",
        "{{ (password | int) / 0 }}",
        "{{ password.__class__ }}",
        "{{ lookup[password] }}",
        "{{ lookup[password].x }}",
        "{{ password | nosuchfilter }}",
        "{% for x in %}",
    ],
)
def test_no_template_error_quotes_the_secret(template: str) -> None:
    with pytest.raises(PayloadError) as info:
        render({"f": template}, _db(lookup={}))

    message = str(info.value)
    assert SECRET not in message
    assert "'f'" in message
    # Nothing chained that a traceback could print either.
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__


def test_the_sandbox_refuses_attribute_escapes() -> None:
    with pytest.raises(PayloadError):
        render({"f": "{{ value.__class__.__mro__[1].__subclasses__() }}"}, Secret(SECRET))


def test_check_templates_reports_syntax_errors_by_file_name_and_line() -> None:
    problems = check_templates({"good": "{{ value }}", "bad": "x\n{{ value"})

    assert len(problems) == 1
    assert problems[0].startswith("bad: template syntax error on line 2")


# ---------------------------------------------------------------- hostile payloads (issue 10)


def _reason(files: dict[str, str], payload: Secret, **kw: int) -> str:
    with pytest.raises(PayloadError) as info:
        render(files, payload, **kw)
    assert SECRET not in str(info.value)
    assert info.value.__cause__ is None
    return info.value.reason


def test_a_lone_surrogate_as_a_json_escape_is_an_encoding_rejection() -> None:
    # Valid UTF-8 JSON text whose string cannot be encoded back: was UnicodeEncodeError.
    payload = Secret('{"password": "' + SECRET + '\\ud800y"}')

    assert _reason({"password": "{{ password }}"}, payload) == "encoding"


def test_a_lone_surrogate_in_a_field_name_or_a_nested_value_is_refused_too() -> None:
    assert _reason({"f": "{{ password }}"}, Secret('{"password": "p", "\\udfff": 1}')) == "encoding"
    assert _reason({"f": "{{ password }}"}, Secret('{"password": "p", "x": [["\\ud83d"]]}')) == "encoding"


def test_a_raw_surrogate_in_the_payload_text_is_an_encoding_rejection() -> None:
    assert _reason({"f": "{{ value }}"}, Secret(SECRET + "\ud800")) == "encoding"


def test_json_nested_past_the_recursion_limit_is_a_depth_rejection_not_a_recursion_error() -> None:
    deep = "[" * 100_000 + "]" * 100_000

    assert _reason({"f": "{{ value }}"}, Secret(deep)) == "depth"
    assert _reason({"f": "{{ password }}"}, Secret('{"password": "p", "x": ' + deep + "}")) == "depth"


def test_nesting_is_bounded_at_max_depth_levels() -> None:
    def nested(levels: int) -> Secret:
        return Secret('{"password": "p", "x": ' + '{"a": ' * (levels - 1) + "1" + "}" * (levels - 1) + "}")

    assert render({"f": "{{ password }}"}, nested(MAX_DEPTH)) == {"f": b"p"}
    assert _reason({"f": "{{ password }}"}, nested(MAX_DEPTH + 1)) == "depth"


def test_a_payload_over_one_mib_is_a_size_rejection() -> None:
    assert _reason({"f": "{{ value }}"}, Secret("x" * (MAX_PAYLOAD + 1))) == "size"
    # Counted in bytes, not characters.
    assert _reason({"f": "{{ value }}"}, Secret("€" * (MAX_PAYLOAD // 3 + 1))) == "size"


def test_output_over_the_bound_is_an_output_size_rejection_and_stops_the_loop_early() -> None:
    started = time.monotonic()
    runaway = "{% for i in range(99999) %}{% for j in range(99999) %}{{ value }}{% endfor %}{% endfor %}"

    assert _reason({"f": runaway}, Secret(SECRET), max_bytes=4096) == "output_size"
    # Stopped at the bound, not after 10^10 iterations.
    assert time.monotonic() - started < 5
    assert render({"f": "{{ value }}"}, Secret(SECRET), max_bytes=len(SECRET)) == {"f": SECRET.encode()}
    assert _reason({"f": "{{ value }}!"}, Secret(SECRET), max_bytes=len(SECRET)) == "output_size"


def test_an_env_value_holding_a_nul_is_refused_since_exec_could_not_pass_it() -> None:
    with pytest.raises(PayloadError) as info:
        render_env({"TOKEN": "{{ password }}"}, Secret(json.dumps({"password": SECRET + "\0"})))

    assert info.value.reason == "encoding"
    assert SECRET not in str(info.value)


def test_template_errors_carry_the_template_reason() -> None:
    assert _reason(DB_FILES, Secret(json.dumps({"password": SECRET}))) == "template"
    assert _reason({"f": "{% macro m() %}{{ m() }}{% endmacro %}{{ m() }}"}, Secret(SECRET)) == "template"


def test_payload_object_is_the_checked_object_or_none() -> None:
    assert payload_object(_db()) == {"username": "app", "password": SECRET}
    assert payload_object(Secret("[1]")) is None
    assert payload_object(Secret(SECRET)) is None
    with pytest.raises(PayloadError):
        payload_object(Secret('{"a": "\\ud800"}'))


def test_salvage_keeps_only_the_fields_that_are_fine_on_their_own() -> None:
    payload = Secret('{"username": "app", "password": "x\\ud800", "deep": ' + "[" * 70 + "]" * 70 + "}")

    assert salvage_fields(payload) == {"username": "app"}
    assert salvage_fields(Secret("[" * 100_000 + "]" * 100_000)) == {}
    assert salvage_fields(Secret("not json")) == {}

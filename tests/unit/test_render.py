"""daemon.render: payload fields into file contents; a bad payload is an error, never an empty file."""

from __future__ import annotations

import json

import pytest

from daemon.errors import PayloadError
from daemon.model import Secret
from daemon.render import check_templates, fields_of, render, render_env

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

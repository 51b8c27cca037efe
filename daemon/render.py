"""Render a secret payload into file contents through the configured templates.

Jinja2 in a sandbox with StrictUndefined: a template naming a field the payload
lacks is an error for that version (the last good version stays), never an
empty file. Error messages name the file and the missing field, never a value.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import jinja2
from jinja2 import meta
from jinja2.sandbox import SandboxedEnvironment

from daemon.errors import PayloadError
from daemon.model import Secret


def _finalize(value: Any) -> Any:
    # A null field would render as the text "None": refuse it like a missing one.
    if value is None:
        raise PayloadError("a field used by the template is null")
    return value


_ENV = SandboxedEnvironment(
    undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=True, finalize=_finalize
)


def fields_of(payload: Secret) -> dict[str, Any]:
    """A JSON object payload exposes its fields; anything else is ``value``."""
    text = payload.reveal()
    try:
        data = json.loads(text)
    except ValueError:
        return {"value": text}
    if isinstance(data, dict):
        return data
    return {"value": text}


def check_templates(templates: Mapping[str, str]) -> list[str]:
    """Syntax errors of templates, one line each (used by config checks)."""
    problems = []
    for name, source in templates.items():
        try:
            _ENV.parse(source)
        except jinja2.TemplateSyntaxError as e:
            problems.append(f"{name}: template syntax error on line {e.lineno}: {e.message}")
    return problems


def render(templates: Mapping[str, str], payload: Secret) -> dict[str, bytes]:
    """Render every file template against the payload. Raises ``PayloadError``."""
    return {name: text.encode() for name, text in _render_all(templates, payload).items()}


def render_env(templates: Mapping[str, str], payload: Secret) -> dict[str, str]:
    """Render env var templates (for ``baton exec``). Raises ``PayloadError``."""
    return _render_all(templates, payload)


def _render_all(templates: Mapping[str, str], payload: Secret) -> dict[str, str]:
    fields = fields_of(payload)
    out: dict[str, str] = {}
    for name, source in templates.items():
        try:
            text = _ENV.from_string(source).render(fields)
        except jinja2.UndefinedError:
            # jinja's own message may quote a value ("'dict object' has no
            # attribute '<value>'"): name only the top-level fields that are missing.
            missing = sorted(meta.find_undeclared_variables(_ENV.parse(source)) - fields.keys())
            what = f"uses missing field(s) {', '.join(missing)}" if missing else "uses an undefined attribute or item"
            raise PayloadError(f"template for {name!r} {what}") from None
        except jinja2.TemplateSyntaxError as e:
            raise PayloadError(f"template for {name!r}: syntax error on line {e.lineno}: {e.message}") from None
        except PayloadError as e:
            raise PayloadError(f"template for {name!r}: {e}") from None
        except Exception as e:
            # Other template errors may quote a value in their message: say only the kind.
            raise PayloadError(f"template for {name!r} failed: {type(e).__name__}") from None
        if not text.strip():
            raise PayloadError(f"template for {name!r} rendered an empty file")
        out[name] = text
    return out

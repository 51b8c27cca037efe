"""Render a secret payload into file contents through the configured templates.

Jinja2 in a sandbox with StrictUndefined: a template naming a field the payload
lacks is an error for that version (the last good version stays), never an
empty file. Error messages name the file and the missing field, never a value.

A payload is hostile until proven otherwise: it is parsed by ``daemon.payload``
(a nesting bound, lone surrogates refused), and every rendered file is bounded in size. Each
refusal is a ``PayloadError`` whose ``reason`` (``errors.PAYLOAD_REASONS``) is
safe as a metric label. Nothing here bounds time: the agent and ``baton exec``
render through ``daemon.files.renderworker``, which runs :func:`serve` in a child
process it can kill, so a runaway template never runs in the daemon itself.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import jinja2
from jinja2 import meta
from jinja2.sandbox import SandboxedEnvironment

from daemon.errors import PayloadError
from daemon.model import Secret
from daemon.payload import fields_of

# Default bound of one rendered file or env value (config: agent.max_file_size).
DEFAULT_MAX_OUTPUT = 1 << 20


def _finalize(value: Any) -> Any:
    # A null field would render as the text "None": refuse it like a missing one.
    if value is None:
        raise PayloadError("a field used by the template is null", reason="template")
    return value


_ENV = SandboxedEnvironment(
    undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=True, finalize=_finalize
)

# A filter's binary output (a PKCS#12 keystore) is base64 after a prefix only this
# process knows: a payload field cannot forge it, and a file that is nothing else
# is written as the decoded bytes. It starts with NUL, so an env value refuses it.
_BINARY = "\0baton-binary-" + secrets.token_hex(16) + ":"


def _pkcs12(private_key: Any, certificate: Any, chain: Any = "", password: Any = "", name: Any = "baton") -> str:
    """``{{ private_key | pkcs12(certificate, ca_chain, password="changeit") }}``: a whole file, PKCS#12."""
    from daemon.errors import CertificateError
    from daemon.kit.x509 import pkcs12_bundle

    try:
        blob = pkcs12_bundle(
            str(certificate), str(private_key), str(chain or ""), password=str(password), name=str(name)
        )
    except CertificateError as e:
        raise PayloadError(f"pkcs12: {e}", reason="template") from None
    return _BINARY + base64.b64encode(blob).decode()


_ENV.filters["pkcs12"] = _pkcs12


def _binary_of(name: str, text: str) -> bytes | None:
    """The bytes of a file that is one binary filter's output; None for a text file."""
    if _BINARY not in text:
        return None
    body = text.strip()
    if not body.startswith(_BINARY) or _BINARY in body[len(_BINARY) :]:
        raise PayloadError(f"template for {name!r}: a binary filter (pkcs12) must be the whole file", reason="template")
    try:
        return base64.b64decode(body[len(_BINARY) :], validate=True)
    except (binascii.Error, ValueError):
        raise PayloadError(f"template for {name!r}: a binary filter's output is damaged", reason="template") from None


@dataclass(frozen=True)
class Rendered:
    """One version's rendered files (bytes) and env values (text)."""

    files: dict[str, bytes] = field(repr=False)
    env: dict[str, str] = field(repr=False)


def check_templates(templates: Mapping[str, str]) -> list[str]:
    """Syntax errors of templates, one line each (used by config checks)."""
    problems = []
    for name, source in templates.items():
        try:
            _ENV.parse(source)
        except jinja2.TemplateSyntaxError as e:
            problems.append(f"{name}: template syntax error on line {e.lineno}: {e.message}")
    return problems


def render(templates: Mapping[str, str], payload: Secret, *, max_bytes: int = DEFAULT_MAX_OUTPUT) -> dict[str, bytes]:
    """Render every file template against the payload, in this process. Raises ``PayloadError``."""
    return render_version(templates, {}, payload, max_bytes=max_bytes).files


def render_env(templates: Mapping[str, str], payload: Secret, *, max_bytes: int = DEFAULT_MAX_OUTPUT) -> dict[str, str]:
    """Render env var templates (for ``baton exec``), in this process. Raises ``PayloadError``."""
    return render_version({}, templates, payload, max_bytes=max_bytes).env


def render_version(
    files: Mapping[str, str], env: Mapping[str, str], payload: Secret, *, max_bytes: int = DEFAULT_MAX_OUTPUT
) -> Rendered:
    """Files and env of one version, in this process (no time bound). Raises ``PayloadError``."""
    texts, env_texts = _render_texts(files, env, payload, max_bytes)
    return Rendered({k: file_bytes(k, v) for k, v in texts.items()}, env_texts)


def file_bytes(name: str, text: str) -> bytes:
    """A rendered file's bytes: its UTF-8 text, or a binary filter's decoded output."""
    binary = _binary_of(name, text)
    return binary if binary is not None else text.encode()


def _render_texts(
    files: Mapping[str, str], env: Mapping[str, str], payload: Secret, max_bytes: int
) -> tuple[dict[str, str], dict[str, str]]:
    fields = fields_of(payload)
    out = {name: _render_one(name, source, fields, max_bytes) for name, source in files.items()}
    out_env = {}
    for name, source in env.items():
        text = _render_one(name, source, fields, max_bytes)
        if "\0" in text:
            # execve cannot carry it: the child would never start.
            raise PayloadError(f"template for {name!r} rendered a NUL character", reason="encoding")
        out_env[name] = text
    return out, out_env


# Compiled templates by source: the worker renders the same few again and again.
_COMPILED: dict[str, jinja2.Template] = {}


def _compile(source: str) -> jinja2.Template:
    template = _COMPILED.get(source)
    if template is None:
        if len(_COMPILED) >= 256:
            _COMPILED.clear()
        template = _COMPILED[source] = _ENV.from_string(source)
    return template


def _render_one(name: str, source: str, fields: dict[str, Any], max_bytes: int) -> str:
    try:
        out = io.StringIO()
        size = 0
        # Chunk by chunk, so a loop that would write gigabytes stops at the bound.
        for chunk in _compile(source).generate(fields):
            size += len(chunk)
            if size > max_bytes:
                break
            out.write(chunk)
        text = out.getvalue()
    except jinja2.UndefinedError:
        # jinja's own message may quote a value ("'dict object' has no
        # attribute '<value>'"): name only the top-level fields that are missing.
        missing = sorted(meta.find_undeclared_variables(_ENV.parse(source)) - fields.keys())
        what = f"uses missing field(s) {', '.join(missing)}" if missing else "uses an undefined attribute or item"
        raise PayloadError(f"template for {name!r} {what}", reason="template") from None
    except jinja2.TemplateSyntaxError as e:
        raise PayloadError(
            f"template for {name!r}: syntax error on line {e.lineno}: {e.message}", reason="template"
        ) from None
    except PayloadError as e:
        raise PayloadError(f"template for {name!r}: {e}", reason=e.reason) from None
    except MemoryError:
        raise PayloadError(f"template for {name!r} ran out of memory", reason="memory") from None
    except Exception as e:
        # Other template errors may quote a value in their message: say only the kind.
        raise PayloadError(f"template for {name!r} failed: {type(e).__name__}", reason="template") from None
    if size > max_bytes:
        raise PayloadError(f"template for {name!r} renders more than {max_bytes} bytes", reason="output_size")
    if not text.strip():
        raise PayloadError(f"template for {name!r} rendered an empty file", reason="template")
    try:
        size = len(text.encode())
    except UnicodeEncodeError:  # a lone surrogate from the template's own text
        raise PayloadError(f"template for {name!r} rendered text not encodable as UTF-8", reason="encoding") from None
    if size > max_bytes:
        raise PayloadError(f"template for {name!r} renders more than {max_bytes} bytes", reason="output_size")
    return text


# ---------------------------------------------------------------- the worker's side


def serve(channel_in: BinaryIO, channel_out: BinaryIO, *, hello: dict[str, Any]) -> None:
    """The render worker's loop (``daemon.files.renderworker`` starts it): one request, one reply, until EOF.

    Frames are a 4-byte big-endian length and a JSON object. The first frame
    out is ``hello`` (the child is up). A request is ``{"files", "env",
    "payload", "max_bytes"}``; a reply ``{"files", "binary", "env"}`` (``binary``: base64 of the
    files a binary filter made) or ``{"error",
    "reason"}``. Every error is a reply: the worker ends only at EOF, or when
    its parent kills it.
    """
    _send(channel_out, hello)
    while True:
        header = channel_in.read(4)
        if len(header) < 4:
            return
        body = channel_in.read(int.from_bytes(header, "big"))
        _send(channel_out, _handle(body))


def _send(channel_out: BinaryIO, reply: dict[str, Any]) -> None:
    # Texts were checked encodable; the reason and message are ours.
    data = json.dumps(reply, ensure_ascii=False).encode()
    channel_out.write(len(data).to_bytes(4, "big") + data)
    channel_out.flush()


def _handle(body: bytes) -> dict[str, Any]:
    try:
        request = json.loads(body)
        texts, env = _render_texts(
            request["files"], request["env"], Secret(request["payload"]), int(request["max_bytes"])
        )
        # Binary files go as base64 of their bytes: the marker is this process's own.
        files, binary = {}, {}
        for name, text in texts.items():
            data = _binary_of(name, text)
            if data is None:
                files[name] = text
            else:
                binary[name] = base64.b64encode(data).decode()
    except PayloadError as e:
        return {"error": str(e), "reason": e.reason}
    except MemoryError:
        return {"error": "rendering ran out of memory", "reason": "memory"}
    except Exception as e:
        return {"error": f"the render worker failed: {type(e).__name__}", "reason": "worker"}
    return {"files": files, "binary": binary, "env": env}

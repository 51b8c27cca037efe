"""The shape of a secret payload: its JSON object (checked) or its ``value``, for templates and providers alike.

A payload is hostile until proven otherwise: over 1 MiB, lone surrogates (raw or
as JSON escapes) and JSON nested deeper than ``MAX_DEPTH`` are ``PayloadError``s
whose ``reason`` is safe as a metric label. Pure: no I/O, never a value in a message.
"""

from __future__ import annotations

import json
import re
from typing import Any

from daemon.errors import PayloadError
from daemon.model import Secret

# Real credentials are a few levels deep; anything much deeper is an attack on
# the parser or on whatever walks the value later (repr, json.dumps).
MAX_DEPTH = 64
# The stores' limit (daemon.stores.base.MAX_PAYLOAD), checked again here.
MAX_PAYLOAD = 1 << 20

_SURROGATE = re.compile("[\ud800-\udfff]")


def fields_of(payload: Secret) -> dict[str, Any]:
    """A JSON object payload exposes its fields; anything else is ``value``.

    Raises ``PayloadError`` (size, encoding, depth) for a payload no template
    may see: over 1 MiB, lone surrogates (raw or as JSON escapes), or JSON
    nested deeper than ``MAX_DEPTH``.
    """
    data = payload_object(payload)
    return data if data is not None else {"value": payload.reveal()}


def payload_object(payload: Secret) -> dict[str, Any] | None:
    """The payload's JSON object, checked as :func:`fields_of` says; None when it is not one."""
    text = payload.reveal()
    if len(text) > MAX_PAYLOAD:  # characters <= bytes: no need to encode a huge one
        raise PayloadError(f"payload is over the {MAX_PAYLOAD} byte limit", reason="size")
    _check_text(text, "payload")
    if len(text.encode()) > MAX_PAYLOAD:
        raise PayloadError(f"payload is over the {MAX_PAYLOAD} byte limit", reason="size")
    try:
        data = json.loads(text)
    except RecursionError:
        raise PayloadError(f"payload JSON nests deeper than {MAX_DEPTH} levels", reason="depth") from None
    except ValueError:
        return None
    if isinstance(data, dict | list):
        # A list too, though templates see it as text: how deep json.loads gets
        # before RecursionError depends on the caller's stack, the bound must not.
        _check_tree(data)
    return data if isinstance(data, dict) else None


def salvage_fields(payload: Secret) -> dict[str, Any]:
    """The top-level fields of a rejected JSON object payload that pass the checks on their own.

    For a generator that keeps the other fields while it replaces one: the
    rotation that follows a bad version drops only what made it bad.
    """
    text = payload.reveal()
    if len(text) > MAX_PAYLOAD:
        return {}
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        return {}
    if not isinstance(data, dict):
        return {}
    kept = {}
    for k, v in data.items():
        try:
            _check_tree({k: v})
        except PayloadError:
            continue
        kept[k] = v
    return kept


def _check_text(text: str, what: str) -> None:
    if _SURROGATE.search(text):
        raise PayloadError(f"{what} holds a lone UTF-16 surrogate (not encodable as UTF-8)", reason="encoding")


def _check_tree(data: dict[str, Any] | list[Any]) -> None:
    """Depth and encoding of every container, key and string; iterative, so depth cannot hurt it."""
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise PayloadError(f"payload JSON nests deeper than {MAX_DEPTH} levels", reason="depth")
        if isinstance(node, dict):
            for k, v in node.items():
                _check_text(k, "a payload field name")
                if isinstance(v, str):
                    _check_text(v, "a payload field")
                elif isinstance(v, dict | list):
                    stack.append((v, depth + 1))
        else:
            for v in node:
                if isinstance(v, str):
                    _check_text(v, "a payload field")
                elif isinstance(v, dict | list):
                    stack.append((v, depth + 1))

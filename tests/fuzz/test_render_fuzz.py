"""Fuzz: hostile payloads through render and the real Writer, in process and through the render worker.

Hypothesis draws sequences of payloads (arbitrary JSON values, with lone
surrogates and NULs in strings and keys, raw text and bytes, deep nesting,
oversize) and renders each with a few fixed templates, then writes what
rendered into a real output directory. Properties:

- nothing but a Baton error (``BatonError``) ever comes out of render or write;
- the render worker (a child process) agrees with the in-process renderer:
  the same files, or a rejection with the same reason;
- nothing is written outside the output directory;
- after a rejected payload the previous version is still current and its
  files are intact, byte for byte.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.config import OutputConfig
from daemon.errors import BatonError, PayloadError
from daemon.files.render import Rendered, render_version
from daemon.files.renderworker import RenderWorker
from daemon.files.writer import Writer
from daemon.model import Secret, VersionId
from daemon.payload import MAX_PAYLOAD
from tests.fuzz import scale

pytestmark = pytest.mark.fuzz

TEMPLATES: list[dict[str, str]] = [
    {"value": "{{ value }}"},
    {"password": "{{ password }}", "dsn": "postgresql://{{ username }}:{{ password }}@db/app"},
    {"json": "{{ password | tojson }}"},
    {"lines": "{% for x in items %}{{ x }}\n{% endfor %}", "n": "{{ items | length }}"},
    {"joined": "{{ username ~ ':' ~ password }}\n"},
]
MAX_BYTES = 64 * 1024  # small, so that the output bound is met often

# Every code point, lone surrogates and NUL included.
chars = st.characters(codec=None, categories=None)
texts = st.text(chars, max_size=40)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | texts,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=20,
)
field_names = st.sampled_from(["value", "password", "username", "items"]) | texts


def _json_object(fields: dict[str, Any], ensure_ascii: bool) -> str:
    return json.dumps(fields, ensure_ascii=ensure_ascii)


payloads = st.one_of(
    # A JSON object with the fields the templates use (or not), any values.
    st.builds(_json_object, st.dictionaries(field_names, json_values, max_size=5), st.booleans()),
    # Any JSON value at all.
    st.builds(json.dumps, json_values),
    # Raw text, lone surrogates included; raw bytes as the store could not decode them.
    texts,
    st.binary(max_size=64).map(lambda b: b.decode("utf-8", "surrogateescape")),
    # Nesting from harmless to past the recursion limit, in an object or bare.
    st.integers(1, 5000).map(lambda n: '{"password": "p", "username": "u", "d": ' + "[" * n + "]" * n + "}"),
    st.integers(1, 5000).map(lambda n: "[" * n + "]" * n),
    # Output past the bound; payload past the store's limit.
    st.integers(1, 3).map(lambda k: json.dumps({"password": "x" * (k * MAX_BYTES // 2), "username": "u"})),
    st.just("y" * (MAX_PAYLOAD + 1)),
)


@pytest.fixture(scope="module")
def loop_and_worker() -> Iterator[tuple[asyncio.AbstractEventLoop, RenderWorker]]:
    loop = asyncio.new_event_loop()
    worker = RenderWorker()
    try:
        yield loop, worker
    finally:
        loop.run_until_complete(worker.aclose())
        loop.close()


def _outcome(fn: Any) -> Rendered | str:
    """The rendered version, or the rejection's reason. Anything else escapes and fails the test."""
    try:
        result: Rendered = fn()
    except PayloadError as e:
        return e.reason
    return result


def _snapshot(out: Path, names: list[str]) -> dict[str, bytes]:
    return {name: (out / name).read_bytes() for name in names}


# Each example fsyncs a few versions: 5,000 under make fuzz is ~10 minutes on a busy 2-core box.
@settings(max_examples=scale(200, 5000))
@given(templates=st.sampled_from(TEMPLATES), sequence=st.lists(payloads, min_size=1, max_size=4))
def test_render_then_write_raises_only_baton_errors_stays_in_its_dir_and_keeps_the_last_good_version(
    loop_and_worker: tuple[asyncio.AbstractEventLoop, RenderWorker], templates: dict[str, str], sequence: list[str]
) -> None:
    loop, worker = loop_and_worker
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        out = root / "out"
        writer = Writer(OutputConfig(dir=out, files=templates))
        try:
            names = sorted(templates)
            good = {name: f"good-{name}\n".encode() for name in names}
            assert writer.write(VersionId("0"), good)
            last: tuple[str, dict[str, bytes]] = ("0", good)

            for i, text in enumerate(sequence, start=1):
                payload = Secret(text)
                here = _outcome(lambda p=payload: render_version(templates, {}, p, max_bytes=MAX_BYTES))
                there = _outcome(
                    lambda p=payload: loop.run_until_complete(
                        worker.render(files=templates, env={}, payload=p, time_limit=30, max_bytes=MAX_BYTES)
                    )
                )
                if isinstance(here, str) or isinstance(there, str):
                    assert here == there, f"in process: {here!r}, worker: {there!r}"
                else:
                    assert here.files == there.files
                if not isinstance(here, str):
                    try:
                        # False: the same content as current, relabelled with the new id.
                        writer.write(VersionId(str(i)), here.files)
                    except BatonError:
                        pass
                    else:
                        last = (str(i), here.files)
                # Last good kept: current is the last version written, its files intact.
                assert writer.current() == last[0]
                assert _snapshot(out, names) == last[1]
                assert os.listdir(root) == ["out"], "something was written outside the output dir"
        finally:
            writer.close()

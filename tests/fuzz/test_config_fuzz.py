"""The config loader against arbitrary input: only ``ConfigError``, one line per problem naming a field, no secret.

Three sources of input, each written to a real file and read through
``daemon.cli.load_checked`` (what ``baton check-config`` and ``baton agent``
run): raw text, arbitrary YAML-able structures, and a valid config with a few
random mutations (a value replaced, a key dropped, an unknown key added). A
payload-looking string planted where a pasted secret would sit (a template, the
vault auth section, a secret-named field, an unknown key) never shows in the
message.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel

from daemon.cli import load_checked
from daemon.config import Config
from daemon.errors import ConfigError

pytestmark = pytest.mark.fuzz

# One jinja name token, so a message quoting "the token it got" would quote all of it.
SECRET = "pw_Payload9f3ac1Zq"


def _field_names(model: type[BaseModel], seen: set[type[BaseModel]]) -> set[str]:
    names = set(model.model_fields)
    seen.add(model)
    for info in model.model_fields.values():
        for arg in _types(info.annotation):
            if isinstance(arg, type) and issubclass(arg, BaseModel) and arg not in seen:
                names |= _field_names(arg, seen)
    return names


def _types(annotation: Any) -> Iterator[Any]:
    yield annotation
    for arg in getattr(annotation, "__args__", ()):
        yield from _types(arg)


FIELDS = sorted(_field_names(Config, set()) | {"local", "vault", "aws", "kubernetes"})
INTERESTING = [
    "", ".", "..", "/", "/etc", "/run/baton/../../etc", "0", "0440", "0777", "4400", "400", "unix:", "unix:rel",
    "127.0.0.1:0", ":8787", "[::1]:8787", "{{", "{{ value }}", "{% if %}", "{{ a.b.c }}", "1h", "0s", "-1s",
    "250ms", "nan", "inf", "1e999", "9" * 400 + "d", "a\0b", "x" * 300, "x.tmp-1", "..current", "SIGHUP", "nobody",
    "root", "no-such-user-baton", "http://", "https://h:0", "https://h:99999", "ftp://h", "local", "vault", "aws",
    "kubernetes", "password", "postgres", "restart", ".*", "(", "a\nb", "\u2028", SECRET,
]  # fmt: skip
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from([0, -1, 2**32 - 1, 2**63, 10**400, 0o400, 400]),
    st.floats(),
    st.text(st.characters(exclude_categories=["Cs"]), max_size=30),
    st.sampled_from(INTERESTING),
)
keys = st.one_of(st.sampled_from(FIELDS), st.text(st.characters(exclude_categories=["Cs"]), max_size=12))
values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(keys, children, max_size=5),
    max_leaves=25,
)

LINE = re.compile(r"^(?P<head>[^\n]+?)(: | line \d+ invalid YAML: | invalid YAML: )\S")


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("config-fuzz")


def base(root: Path) -> dict[str, Any]:
    return {
        "node_id": "node-a",
        "store": {"kind": "local", "path": str(root / "store.db")},
        "api": {"listen": "127.0.0.1:8787", "token_file": str(root / "token")},
        "report": {"heartbeat": "30s"},
        "agent": {"debounce": "1s"},
        "credentials": [
            {
                "name": "app-db",
                "key": "app/db",
                "output": {
                    "dir": str(root / "out" / "app-db"),
                    "mode": "0440",
                    "files": {"password": "{{ password }}", "dsn": "postgres://{{ username }}@db/app"},
                    "env": {"DB_PASSWORD": "{{ password }}"},
                },
                "consumers": [
                    {"name": "api", "match": {"pidfile": str(root / "api.pid")}, "reload": {"signal": "SIGHUP"}},
                    {"name": "worker", "match": {"cmdline": "worker"}, "health": {"http": "http://127.0.0.1:1/h"}},
                ],
                "rotation": {"every": "24h", "generator": {"length": 32}},
            },
            {"name": "other", "key": "other", "output": {"dir": str(root / "out" / "other")}},
        ],
    }


def load(root: Path, text: str) -> list[str]:
    """The problem lines of loading ``text``; [] when it is valid. Any other exception fails the test."""
    path = root / "baton.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogateescape")
    try:
        load_checked(str(path))
    except ConfigError as e:
        assert e.problems, "a ConfigError with no problem line"
        return e.problems
    return []


def assert_lines_name_a_field(problems: list[str], root: Path) -> None:
    for line in problems:
        assert line == line.strip() and len(line.splitlines()) == 1, repr(line)
        m = LINE.match(line)
        assert m, f"no field path in {line!r}"
        head = m.group("head")
        if not head.startswith(str(root)):
            assert head == "(top level)" or not head.startswith(" "), line


def all_paths(node: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from all_paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from all_paths(v, (*prefix, i))


def parent_of(config: Any, path: tuple[Any, ...]) -> Any:
    node = config
    for p in path[:-1]:
        node = node[p]
    return node


def mutate(
    config: dict[str, Any],
    data: st.DataObject,
    vals: st.SearchStrategy[Any] = values,
    ks: st.SearchStrategy[str] = keys,
) -> dict[str, Any]:
    config = copy.deepcopy(config)
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        paths = [p for p in all_paths(config) if p]
        path = data.draw(st.sampled_from(paths), label="path")
        parent = parent_of(config, path)
        op = data.draw(st.sampled_from(["set", "set", "drop", "add"]), label="op")
        if op == "set":
            parent[path[-1]] = data.draw(vals, label="value")
        elif op == "drop":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[data.draw(ks, label="key")] = data.draw(vals, label="value")
        else:
            parent.append(data.draw(vals, label="value"))
    return config


@given(text=st.text(max_size=300))
def test_raw_text_gives_a_config_or_config_errors_that_name_a_field(root: Path, text: str) -> None:
    assert_lines_name_a_field(load(root, text), root)


@given(data=values)
def test_any_yaml_structure_gives_config_errors_that_name_a_field(root: Path, data: Any) -> None:
    assert_lines_name_a_field(load(root, yaml.safe_dump(data)), root)


def test_the_base_config_is_valid(root: Path) -> None:
    assert load(root, yaml.safe_dump(base(root))) == []


@given(data=st.data())
def test_a_mutated_valid_config_gives_config_errors_that_name_a_field(root: Path, data: st.DataObject) -> None:
    config = mutate(base(root), data)

    problems = load(root, yaml.safe_dump(config))

    assert_lines_name_a_field(problems, root)
    top = set(Config.model_fields) | {"(top level)"} | {str(k) for k in config}
    for line in problems:
        head = LINE.match(line).group("head")  # type: ignore[union-attr]
        named = any(head == k or head.startswith(k + ".") for k in top)
        assert named or head.startswith(("'", '"')), line  # or an odd key, quoted


PLANTED = st.sampled_from(
    [
        SECRET,
        "{{ " + SECRET + " " + SECRET + " }}",
        "{% " + SECRET + " %}",
        "{{ x }" + SECRET,
        [SECRET],
        {"nested": SECRET},
        SECRET + "\0",
    ]
)
SECRET_SPOTS: list[tuple[Any, ...]] = [
    ("credentials", 0, "output", "files", "password"),
    ("credentials", 0, "output", "files", "dsn"),
    ("credentials", 0, "output", "env", "DB_PASSWORD"),
    ("api", "token_file"),
    ("store", "token"),
    ("password",),
    ("credentials", 0, "output", "password"),
    ("credentials", 0, "rotation", "provider", "admin_dsn_file"),
]


@given(data=st.data(), spot=st.sampled_from(SECRET_SPOTS), planted=PLANTED)
def test_a_secret_pasted_into_the_config_never_shows_in_the_message(
    root: Path, data: st.DataObject, spot: tuple[Any, ...], planted: Any
) -> None:
    config = base(root)
    if data.draw(st.booleans(), label="also mutate"):
        # Elsewhere, anything but the secret (hypothesis also draws this file's string constants).
        clean = values.filter(lambda v: "Payload9f3ac1" not in repr(v))
        config = mutate(config, data, clean, keys.filter(lambda k: "Payload9f3ac1" not in k))
    node: Any = config
    try:
        for p in spot[:-1]:
            node = node[p] if isinstance(node, list) else node.setdefault(p, {})
        node[spot[-1]] = planted
    except (KeyError, IndexError, TypeError, AttributeError):
        pass  # the mutation took the spot's parent away: the secret is not in the file

    problems = load(root, yaml.safe_dump(config))

    assert_lines_name_a_field(problems, root)
    assert not any(SECRET in line or "Payload9f3ac1" in line for line in problems), problems


def test_a_planted_secret_is_refused_somewhere_it_does_not_belong(root: Path) -> None:
    # The property above is not vacuous: these plants make the config invalid.
    for spot, planted in [
        (("credentials", 0, "output", "files", "password"), "{{ " + SECRET + " " + SECRET + " }}"),
        (("password",), SECRET),
        (("credentials", 0, "output", "env", "DB_PASSWORD"), {"nested": SECRET}),
    ]:
        config = base(root)
        parent_of(config, spot)[spot[-1]] = planted

        problems = load(root, yaml.safe_dump(config))

        assert problems, spot
        assert not any(SECRET in line for line in problems), problems

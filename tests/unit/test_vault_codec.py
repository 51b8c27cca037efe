"""Pure parts of the Vault store: payload coding, metadata parsing, error mapping, config."""

from __future__ import annotations

import json

import hvac.exceptions
import pytest
import requests

from daemon.clients.vault import _mapped, parse_time
from daemon.config import parse_config
from daemon.errors import ConfigError, StoreAuthError, StoreConflict, StoreError, StoreNotFound, StoreUnavailable
from daemon.model import CURRENT, PENDING, PREVIOUS
from daemon.stores import open_store
from daemon.stores.vault import (
    K_CURRENT,
    K_PENDING,
    K_PREVIOUS,
    K_RETIRED,
    VaultStore,
    _Meta,
    decode_payload,
    encode_payload,
)


def test_a_lone_value_field_is_the_payload_itself() -> None:
    assert decode_payload({"value": "pw"}) == "pw"


def test_any_other_map_is_its_json_with_sorted_keys() -> None:
    assert json.loads(decode_payload({"user": "u", "password": "p"})) == {"user": "u", "password": "p"}
    assert decode_payload({"b": 1, "a": 2}) == '{"a":2,"b":1}'
    assert json.loads(decode_payload({"value": 5})) == {"value": 5}


def test_a_json_object_payload_is_written_as_its_fields_and_anything_else_as_value() -> None:
    assert encode_payload('{"user": "u", "password": "p"}') == {"user": "u", "password": "p"}
    assert encode_payload("plain") == {"value": "plain"}
    assert encode_payload("{not json") == {"value": "{not json"}
    assert encode_payload("[1, 2]") == {"value": "[1, 2]"}
    assert encode_payload("{}") == {"value": "{}"}


def test_vault_timestamps_with_nanoseconds_and_offsets_parse() -> None:
    assert parse_time("2019-06-28T15:53:30.395814123Z") == pytest.approx(1561737210.395814)
    assert parse_time("2018-05-19T11:35:54.466476215-04:00") == pytest.approx(1526744154.466476)
    assert parse_time("2019-06-28T15:53:30Z") == 1561737210.0
    assert parse_time("") == 0.0
    assert parse_time("garbage") == 0.0


def meta(custom: dict[str, str], current_version: int = 4, gone: tuple[int, ...] = ()) -> _Meta:
    versions = {
        str(n): {
            "created_time": f"2024-01-0{n}T00:00:00.000000000Z",
            "deletion_time": "",
            "destroyed": n in gone,
        }
        for n in range(1, current_version + 1)
    }
    return _Meta.parse({"data": {"current_version": current_version, "versions": versions, "custom_metadata": custom}})


def test_stages_come_from_baton_entries_over_kv_current_version() -> None:
    m = meta({K_CURRENT: "3", K_PENDING: "4", K_PREVIOUS: "1,2", K_RETIRED: "1"}, gone=(1,))
    assert m.current == 3
    infos = {n: m.info(n) for n in range(1, 5)}
    assert infos[3].stages == frozenset({CURRENT})
    assert infos[4].stages == frozenset({PENDING})
    assert infos[2].stages == frozenset({PREVIOUS}) and not infos[2].retired
    assert infos[1].retired
    assert infos[4].created > infos[3].created > 0


def test_without_a_pin_the_newest_kv_version_is_current() -> None:
    m = meta({})
    assert m.current == 4 and m.info(4).is_current
    assert meta({K_CURRENT: "0"}).current == 0


def test_a_destroyed_version_counts_as_retired() -> None:
    m = meta({}, gone=(2,))
    assert m.info(2).retired and not m.info(3).retired


def err(cls: type[hvac.exceptions.VaultError], *errors: str) -> hvac.exceptions.VaultError:
    return cls(errors=list(errors), method="get", url="http://vault/v1/secret/data/x", text='{"data":"S3CRET"}')


@pytest.mark.parametrize(
    ("exc", "want"),
    [
        (err(hvac.exceptions.Forbidden, "permission denied"), StoreAuthError),
        (err(hvac.exceptions.Unauthorized), StoreAuthError),
        (err(hvac.exceptions.InvalidPath), StoreNotFound),
        (err(hvac.exceptions.VaultDown, "Vault is sealed"), StoreUnavailable),
        (err(hvac.exceptions.InternalServerError), StoreUnavailable),
        (err(hvac.exceptions.RateLimitExceeded), StoreUnavailable),
        (
            err(hvac.exceptions.InvalidRequest, "check-and-set parameter did not match the current version"),
            StoreConflict,
        ),
        (err(hvac.exceptions.InvalidRequest, "something else"), StoreError),
        (requests.exceptions.ConnectTimeout(), StoreUnavailable),
        (requests.exceptions.ReadTimeout(), StoreUnavailable),
        (requests.exceptions.ConnectionError(), StoreUnavailable),
    ],
)
def test_client_errors_map_into_the_baton_tree_without_the_body(exc: BaseException, want: type[Exception]) -> None:
    mapped = _mapped(exc, "read x")
    assert type(mapped) is want
    assert "S3CRET" not in str(mapped)


def test_the_64_key_error_of_vault_says_to_use_status_path() -> None:
    mapped = _mapped(
        err(hvac.exceptions.InvalidRequest, "custom_metadata validation failed: payload must contain at most 64 keys"),
        "merge",
    )
    assert type(mapped) is StoreError and "status_path" in str(mapped)


def test_an_unknown_exception_is_not_mapped() -> None:
    e = KeyError("x")
    assert _mapped(e, "read") is e


def test_open_store_builds_a_vault_store_from_config(tmp_path: object) -> None:
    config = parse_config(
        {
            "store": {"kind": "vault", "url": "http://127.0.0.1:8200", "mount": "kv", "poll_interval": "5s"},
            "credentials": [{"name": "db", "key": "app/db", "output": {"dir": "/tmp/x"}}],
        }
    )
    store = open_store(config)
    assert isinstance(store, VaultStore)
    assert (store.client.url, store.mount, store.poll_interval, store.retire_mode) == (
        "http://127.0.0.1:8200",
        "kv",
        5.0,
        "destroy",
    )


def test_from_config_refuses_another_store_kind() -> None:
    config = parse_config({"credentials": [{"name": "db", "key": "app/db", "output": {"dir": "/tmp/x"}}]})
    with pytest.raises(ConfigError):
        VaultStore.from_config(config)

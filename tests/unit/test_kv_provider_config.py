"""The ``mysql`` and ``redis`` provider blocks: chosen by ``kind``, checked field by field, never echoing a secret."""

from __future__ import annotations

from typing import Any

import pytest

from daemon.config import MysqlProviderConfig, RedisProviderConfig, parse_config
from daemon.errors import ConfigError
from daemon.kit import plugins


def _config(provider: dict[str, Any]) -> dict[str, Any]:
    return {
        "credentials": [
            {
                "name": "db",
                "key": "app/db",
                "output": {"dir": "/run/baton-test/db"},
                "rotation": {"every": 60, "provider": provider},
            }
        ]
    }


def _problems(provider: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as e:
        parse_config(_config(provider))
    return e.value.problems


def test_each_kind_picks_its_model_with_its_defaults_and_its_provider_class() -> None:
    mysql = parse_config(_config({"kind": "mysql", "admin_dsn_file": "/etc/baton/my.dsn", "username": "app"}))
    spec = mysql.credentials[0].rotation.provider  # type: ignore[union-attr]
    assert isinstance(spec, MysqlProviderConfig)
    assert (spec.strategy, spec.account_host, spec.grant_role) == ("alternating-users", "%", None)
    redis = parse_config(_config({"kind": "redis", "admin_url_file": "/etc/baton/r.url", "username": "app"}))
    rspec = redis.credentials[0].rotation.provider  # type: ignore[union-attr]
    assert isinstance(rspec, RedisProviderConfig)
    assert (rspec.strategy, rspec.acl_rules) == ("alternating-users", ["~*", "&*", "+@all"])
    assert plugins.load(plugins.PROVIDERS, "mysql", kind="provider").__name__ == "MysqlProvider"
    assert plugins.load(plugins.PROVIDERS, "redis", kind="provider").__name__ == "RedisProvider"


@pytest.mark.parametrize(
    ("provider", "field"),
    [
        ({"kind": "mysql", "admin_dsn_file": "/x", "username": "App"}, "provider.username"),
        ({"kind": "mysql", "admin_dsn_file": "/x", "username": "a" * 31}, "provider.username"),
        (
            {"kind": "mysql", "admin_dsn_file": "/x", "username": "app", "account_host": "x' OR 1"},
            "provider.account_host",
        ),
        ({"kind": "mysql", "admin_dsn_file": "/x", "username": "app", "grant_role": "r`w"}, "provider.grant_role"),
        ({"kind": "mysql", "admin_dsn_file": "/x", "username": "app", "strategy": "single-user"}, "provider.strategy"),
        ({"kind": "mysql", "username": "app"}, "provider.admin_dsn_file"),
        ({"kind": "redis", "admin_url_file": "/x", "username": "a b"}, "provider.username"),
        ({"kind": "redis", "admin_url_file": "/x", "username": "app", "acl_rules": ["nopass"]}, "provider.acl_rules.0"),
        ({"kind": "redis", "admin_url_file": "/x", "username": "app", "db": -1}, "provider.db"),
    ],
)
def test_a_bad_field_is_named_by_its_path(provider: dict[str, Any], field: str) -> None:
    problems = _problems(provider)
    assert any(p.startswith(f"credentials.0.rotation.{field}") for p in problems), problems


def test_a_password_pasted_into_acl_rules_is_refused_and_never_echoed() -> None:
    problems = _problems(
        {"kind": "redis", "admin_url_file": "/x", "username": "app", "acl_rules": ["~*", ">hunter2-pasted"]}
    )
    assert any(p.startswith("credentials.0.rotation.provider.acl_rules.1: ") for p in problems), problems
    assert not any("hunter2" in p for p in problems)

"""The certificate: block: every bad value is refused naming its field, never echoing a key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from daemon.config import parse_config
from daemon.errors import ConfigError


def _cfg(cert: dict[str, Any], **more: Any) -> dict[str, Any]:
    return {
        "store": {"kind": "vault", "url": "http://127.0.0.1:8200"},
        "credentials": [
            {
                "name": "web-tls",
                "certificate": {
                    "issuer": {"kind": "vault", "path": "pki/sign/web"},
                    "common_name": "web.example.test",
                    **cert,
                },
                "output": {"dir": "/srv/baton/web-tls", "files": {"tls.crt": "{{ certificate }}"}},
                **more,
            }
        ],
    }


def _problems(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as e:
        parse_config(data)
    return e.value.problems


def test_the_issues_example_loads_with_its_defaults() -> None:
    cfg = parse_config(
        _cfg(
            {"alt_names": ["localhost"], "ip_sans": ["127.0.0.1"], "ttl": "24h", "key": {"type": "ec", "curve": "p256"}}
        )
    )
    cred = cfg.credentials[0]
    assert cred.issued_kind() == "certificate" and cred.key == "web-tls"
    assert cred.certificate is not None
    spec = cred.certificate
    assert spec.issuer.kind == "vault" and spec.issuer.mode == "sign" and spec.issuer.mount == "pki"
    assert spec.renew_at == 0.67 and spec.ttl == 86400 and not spec.revoke_retired


@pytest.mark.parametrize(
    ("cert", "field"),
    [
        ({"issuer": {"kind": "vault", "path": "pki/read/web"}}, "credentials.0.certificate.issuer.vault.path"),
        ({"issuer": {"kind": "vault", "path": "pki/sign/../web"}}, "credentials.0.certificate.issuer.vault.path"),
        ({"common_name": "not a name"}, "credentials.0.certificate.common_name"),
        ({"ip_sans": ["300.1.1.1"]}, "credentials.0.certificate.ip_sans.0"),
        ({"renew_at": 1.2}, "credentials.0.certificate.renew_at"),
        ({"renew_at": 0.1, "jitter": 0.2}, "credentials.0.certificate"),
        ({"ttl": "1s"}, "credentials.0.certificate.ttl"),
        ({"key": {"type": "dsa"}}, "credentials.0.certificate.key.type"),
        ({"key": {"type": "rsa", "bits": 1024}}, "credentials.0.certificate.key.bits"),
        (
            {"issuer": {"kind": "local-ca", "cert_file": "ca.crt", "key_file": "/ca.key"}},
            "credentials.0.certificate.issuer.local-ca.cert_file",
        ),
    ],
)
def test_a_bad_certificate_field_is_named(cert: dict[str, Any], field: str) -> None:
    problems = _problems(_cfg(cert))
    assert any(p.startswith(field) for p in problems), problems


def test_a_vault_issuer_without_a_url_needs_the_vault_store() -> None:
    data = _cfg({})
    data["store"] = {"kind": "local", "path": "/tmp/x.db"}
    assert any(p.startswith("credentials.0.certificate.issuer.url") for p in _problems(data))


def test_a_certificate_is_issued_one_way_and_not_rotated() -> None:
    problems = _problems(_cfg({}, rotation={"every": "1h"}))
    assert any("remove rotation" in p for p in problems)


def test_children_is_a_match_option_not_a_match_kind() -> None:
    cons = {"name": "nginx", "match": {"pidfile": "/run/nginx.pid", "children": True}}
    cfg = parse_config(_cfg({}, consumers=[cons]))
    assert cfg.credentials[0].consumers[0].match.children
    bad = {"name": "nginx", "match": {"children": True}}
    assert any("match needs exactly one" in p for p in _problems(_cfg({}, consumers=[bad])))


def test_the_example_config_loads() -> None:
    import yaml

    data = yaml.safe_load(Path("examples/certificate-nginx.yaml").read_text(encoding="utf-8"))
    cfg = parse_config(data)
    cred = cfg.credentials[0]
    assert cred.issued_kind() == "certificate" and cred.consumers[0].match.children

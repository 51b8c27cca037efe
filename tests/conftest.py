"""Shared test setup. Server fixtures live in tests/fixtures/, one module per server."""

from __future__ import annotations

pytest_plugins = [
    "tests.fixtures.moto",
    "tests.fixtures.postgres",
    "tests.fixtures.mariadb",
    "tests.fixtures.redis",
    "tests.fixtures.vault",
    "tests.fixtures.openbao",
    "tests.fixtures.pki",
    "tests.fixtures.kube",
]

# The hypothesis profile: bounded under make test, long under make fuzz.
import tests.fuzz  # noqa: E402, F401

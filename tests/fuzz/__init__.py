"""Hypothesis profiles for the fuzz suite (loaded by tests/conftest.py for every test).

``make test`` runs every fuzz test with a bounded example count (profile
``ci``); ``make fuzz`` runs the same tests much longer (``BATON_FUZZ=1``,
profile ``fuzz``) together with the long crash campaigns. A test that needs
its own count (a crash campaign's kills) reads :func:`scale`.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

FUZZ = os.environ.get("BATON_FUZZ") == "1"

settings.register_profile(
    "ci",
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile(
    "fuzz",
    max_examples=20_000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile("fuzz" if FUZZ else "ci")


def scale(ci: int, fuzz: int) -> int:
    """The count for this run: ``ci`` under ``make test``, ``fuzz`` under ``make fuzz``."""
    return fuzz if FUZZ else ci

"""When a certificate is renewed: renew_at of its own lifetime, up to jitter earlier, from when it was issued."""

from __future__ import annotations

import pytest

from daemon.issuers.certificate import renewal_time


def test_renewal_is_at_renew_at_of_the_lifetime_drawn_up_to_jitter_earlier() -> None:
    times = [
        renewal_time(not_before=1000.0, not_after=2000.0, issued_at=1000.0, renew_at=0.67, jitter=0.05)
        for _ in range(500)
    ]
    assert all(1620.0 <= t <= 1670.0 for t in times)
    assert max(times) - min(times) > 25  # spread, not one instant for a whole fleet


def test_a_back_dated_certificate_counts_its_lifetime_from_when_it_was_issued() -> None:
    # A CA back-dates not_before (OpenBao: 30 s); the lifetime left is what matters.
    t = renewal_time(not_before=970.0, not_after=1100.0, issued_at=1000.0, renew_at=0.5, jitter=0.0)
    assert t == pytest.approx(1050.0)


def test_an_adopted_certificate_issued_long_ago_is_due_at_once() -> None:
    t = renewal_time(not_before=0.0, not_after=100.0, issued_at=0.0, renew_at=0.5, jitter=0.0)
    assert t == pytest.approx(50.0)

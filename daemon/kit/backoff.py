"""Exponential backoff with jitter, for retries against a store that is down."""

from __future__ import annotations

import random


class Backoff:
    """Delays of ``minimum * 2**n``, capped at ``maximum``, each jittered to 50-100 %."""

    def __init__(self, minimum: float = 1.0, maximum: float = 300.0) -> None:
        self.minimum = minimum
        self.maximum = maximum
        self.failures = 0

    def next(self) -> float:
        base = min(self.maximum, self.minimum * (2 ** min(self.failures, 30)))
        self.failures += 1
        return float(base * random.uniform(0.5, 1.0))

    def reset(self) -> None:
        self.failures = 0

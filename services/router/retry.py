"""Retry rules: which failures are safe to retry, a token-bucket retry budget, and jittered backoff."""

from __future__ import annotations

import random
import time
from collections.abc import Callable

import grpc

# The backend never started the work: the connection failed or it refused the call.
SAFE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE})
# Retried only when the caller says its request is idempotent (x-servegrid-retry: true).
OPT_IN_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    }
)
RETRY_HEADER = "x-servegrid-retry"


def retryable(code: grpc.StatusCode, caller_opted_in: bool) -> bool:
    return code in (OPT_IN_CODES if caller_opted_in else SAFE_CODES)


class RetryBudget:
    """Token bucket: every request deposits `ratio` tokens, time deposits `min_per_s`, a retry takes one.

    So retries stay under ~ratio of traffic when a backend fails, and a quiet router can still
    retry a little; a retry storm cannot multiply load on backends that are already struggling.
    """

    def __init__(
        self, ratio: float, min_per_s: float, cap: float, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.ratio = ratio
        self.min_per_s = min_per_s
        self.cap = cap
        self._clock = clock
        self._tokens = cap
        self._last = clock()

    def deposit(self) -> None:
        tokens = self._tokens + self.ratio
        self._tokens = tokens if tokens < self.cap else self.cap

    def try_withdraw(self) -> bool:
        now = self._clock()
        self._tokens = min(self.cap, self._tokens + (now - self._last) * self.min_per_s)
        self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    @property
    def tokens(self) -> float:
        return self._tokens


def backoff_s(attempt: int, base_s: float, max_s: float) -> float:
    """Full-jitter exponential backoff before retry number `attempt` (1-based)."""
    ceiling = min(max_s, base_s * (2 ** (attempt - 1)))
    return random.uniform(0.0, ceiling)

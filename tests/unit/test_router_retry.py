"""Retry budget (token bucket with a floor), backoff bounds, and which codes are retried."""

from __future__ import annotations

import grpc

from services.router.retry import RetryBudget, backoff_s, retryable


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_budget_allows_about_ratio_of_requests_once_savings_are_spent() -> None:
    clock = Clock()
    budget = RetryBudget(ratio=0.2, min_per_s=0.0, cap=5.0, clock=clock)
    assert sum(budget.try_withdraw() for _ in range(10)) == 5  # the saved-up cap
    allowed = 0
    for _ in range(1000):
        budget.deposit()
        allowed += budget.try_withdraw()
    assert 195 <= allowed <= 205


def test_floor_refills_with_time() -> None:
    clock = Clock()
    budget = RetryBudget(ratio=0.0, min_per_s=10.0, cap=5.0, clock=clock)
    while budget.try_withdraw():
        pass
    clock.now = 0.5
    assert sum(budget.try_withdraw() for _ in range(10)) == 5
    clock.now = 100.0
    assert sum(budget.try_withdraw() for _ in range(10)) == 5  # capped, not 1000


def test_backoff_is_jittered_and_capped() -> None:
    samples = [backoff_s(attempt, 0.01, 0.05) for attempt in (1, 2, 3, 8) for _ in range(200)]
    assert all(0 <= s <= 0.05 for s in samples)
    assert max(backoff_s(1, 0.01, 0.05) for _ in range(200)) <= 0.01


def test_only_safe_codes_are_retried_unless_the_caller_opts_in() -> None:
    assert retryable(grpc.StatusCode.UNAVAILABLE, caller_opted_in=False)
    assert not retryable(grpc.StatusCode.INTERNAL, caller_opted_in=False)
    assert retryable(grpc.StatusCode.INTERNAL, caller_opted_in=True)
    assert not retryable(grpc.StatusCode.INVALID_ARGUMENT, caller_opted_in=True)

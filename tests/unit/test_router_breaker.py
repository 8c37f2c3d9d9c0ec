"""Circuit breaker transitions: consecutive failures, error rate, half-open trials."""

from __future__ import annotations

from typing import Any

from services.router.breaker import BreakerPolicy, BreakerState, CircuitBreaker


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make(**policy: Any) -> tuple[CircuitBreaker, Clock, list[tuple[BreakerState, BreakerState]]]:
    clock = Clock()
    moves: list[tuple[BreakerState, BreakerState]] = []
    breaker = CircuitBreaker(
        "b", BreakerPolicy(**policy), clock=clock, on_transition=lambda _, old, new: moves.append((old, new))
    )
    return breaker, clock, moves


def test_opens_after_consecutive_failures_and_recovers_through_half_open() -> None:
    breaker, clock, moves = make(consecutive_failures=3, open_s=1.0, half_open_trials=2)
    for _ in range(2):
        breaker.record(False)
    breaker.record(True)  # a success resets the streak
    for _ in range(3):
        breaker.record(False)
    assert breaker.state is BreakerState.OPEN and not breaker.allows()
    clock.now = 1.5
    assert breaker.allows() and breaker.state is BreakerState.HALF_OPEN
    breaker.on_send()
    assert not breaker.allows()  # one trial at a time
    breaker.record(True)
    breaker.on_send()
    breaker.record(True)
    assert breaker.state is BreakerState.CLOSED
    assert moves == [
        (BreakerState.CLOSED, BreakerState.OPEN),
        (BreakerState.OPEN, BreakerState.HALF_OPEN),
        (BreakerState.HALF_OPEN, BreakerState.CLOSED),
    ]


def test_failed_trial_opens_again() -> None:
    breaker, clock, _ = make(consecutive_failures=1, open_s=1.0)
    breaker.record(False)
    clock.now = 2.0
    assert breaker.allows()
    breaker.on_send()
    breaker.record(False)
    assert breaker.state is BreakerState.OPEN and not breaker.allows()


def test_error_rate_opens_without_a_streak() -> None:
    breaker, _, _ = make(consecutive_failures=100, error_rate=0.5, window=20, min_requests=10)
    for i in range(20):
        breaker.record(i % 2 == 0)  # alternating: never two failures in a row
        if breaker.state is BreakerState.OPEN:
            break
    assert breaker.state is BreakerState.OPEN


def test_low_error_rate_stays_closed() -> None:
    breaker, _, _ = make(consecutive_failures=100, error_rate=0.5, window=20, min_requests=10)
    for i in range(200):
        breaker.record(i % 5 != 0)  # 20% failures
    assert breaker.state is BreakerState.CLOSED


def test_cancelled_trial_frees_the_slot() -> None:
    breaker, clock, _ = make(consecutive_failures=1, open_s=1.0)
    breaker.record(False)
    clock.now = 2.0
    assert breaker.allows()
    breaker.on_send()
    assert not breaker.allows()
    breaker.release()
    assert breaker.allows() and breaker.state is BreakerState.HALF_OPEN

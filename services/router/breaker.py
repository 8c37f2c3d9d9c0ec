"""Per-backend circuit breaker: closed -> open on failures -> half-open trials -> closed."""

from __future__ import annotations

import enum
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)


class BreakerState(enum.IntEnum):
    # Values match servegrid.router.v1.BreakerState so the admin API can pass them through.
    CLOSED = 1
    OPEN = 2
    HALF_OPEN = 3


@dataclass(frozen=True)
class BreakerPolicy:
    consecutive_failures: int = 5
    error_rate: float = 0.5
    window: int = 50
    min_requests: int = 20
    open_s: float = 2.0
    half_open_trials: int = 3


class CircuitBreaker:
    """Opens after N consecutive failures or a failure share over a sliding window of outcomes.

    While open it admits nothing; after `open_s` it admits one trial at a time (half-open), and
    `half_open_trials` successes close it while any failure opens it again.
    """

    def __init__(
        self,
        name: str,
        policy: BreakerPolicy,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_transition: Callable[[str, BreakerState, BreakerState], None] | None = None,
    ) -> None:
        self.name = name
        self.policy = policy
        self.state = BreakerState.CLOSED
        self._clock = clock
        self._on_transition = on_transition
        self._consecutive = 0
        self._outcomes: deque[bool] = deque(maxlen=policy.window)
        self._failures_in_window = 0
        self._opened_at = 0.0
        self._trial_in_flight = False
        self._trial_successes = 0

    def allows(self) -> bool:
        """Whether a request may go now. In half-open, only one trial at a time is let through."""
        if self.state is BreakerState.CLOSED:
            return True
        if self.state is BreakerState.OPEN:
            if self._clock() - self._opened_at < self.policy.open_s:
                return False
            self._move(BreakerState.HALF_OPEN)
        return not self._trial_in_flight

    def on_send(self) -> None:
        if self.state is BreakerState.HALF_OPEN:
            self._trial_in_flight = True

    def release(self) -> None:
        """A request sent in half-open ended without an answer (the caller cancelled): free the trial slot."""
        if self.state is BreakerState.HALF_OPEN:
            self._trial_in_flight = False

    def record(self, success: bool) -> None:
        if self.state is BreakerState.HALF_OPEN:
            self._trial_in_flight = False
            if not success:
                self._open()
                return
            self._trial_successes += 1
            if self._trial_successes >= self.policy.half_open_trials:
                self._close()
            return
        if self.state is BreakerState.OPEN:
            return  # an answer to a request sent before opening says nothing new
        if len(self._outcomes) == self._outcomes.maxlen and not self._outcomes[0]:
            self._failures_in_window -= 1
        self._outcomes.append(success)
        if success:
            self._consecutive = 0
            return
        self._failures_in_window += 1
        self._consecutive += 1
        total = len(self._outcomes)
        if self._consecutive >= self.policy.consecutive_failures or (
            total >= self.policy.min_requests and self._failures_in_window / total >= self.policy.error_rate
        ):
            self._open()

    def _open(self) -> None:
        self._opened_at = self._clock()
        self._trial_successes = 0
        self._move(BreakerState.OPEN)

    def _close(self) -> None:
        self._consecutive = 0
        self._outcomes.clear()
        self._failures_in_window = 0
        self._move(BreakerState.CLOSED)

    def _move(self, new: BreakerState) -> None:
        old, self.state = self.state, new
        if old is new:
            return
        log.warning(
            "breaker %s: %s -> %s",
            self.name,
            old.name,
            new.name,
            extra={"backend_id": self.name, "from": old.name, "to": new.name},
        )
        if self._on_transition is not None:
            self._on_transition(self.name, old, new)

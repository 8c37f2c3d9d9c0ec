"""Backend choice within a version: power of two choices on EWMA latency x load, round-robin, weighted."""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from typing import Protocol, TypeVar

from servegrid.registry.v1 import registry_pb2


class Candidate(Protocol):
    @property
    def weight(self) -> int: ...

    def score(self, now: float) -> float: ...


C = TypeVar("C", bound=Candidate)


class Balancer:
    """Picks one candidate. One instance per (model, version), so round-robin turns are per version."""

    def __init__(self, policy: int) -> None:
        self.policy = policy or registry_pb2.LOAD_BALANCING_P2C
        self._turn = itertools.count()

    def pick(self, candidates: Sequence[C], now: float) -> C:
        n = len(candidates)
        if n == 1:
            return candidates[0]
        if self.policy == registry_pb2.LOAD_BALANCING_ROUND_ROBIN:
            return candidates[next(self._turn) % n]
        if self.policy == registry_pb2.LOAD_BALANCING_WEIGHTED:
            return random.choices(candidates, weights=[max(c.weight, 0) or 1 for c in candidates])[0]
        if n == 2:
            a, b = candidates
        else:
            # Two distinct random indexes without random.sample's overhead (this runs per request).
            first = int(random.random() * n)
            second = int(random.random() * (n - 1))
            if second >= first:
                second += 1
            a, b = candidates[first], candidates[second]
        return a if a.score(now) <= b.score(now) else b

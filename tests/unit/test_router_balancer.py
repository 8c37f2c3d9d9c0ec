"""Balancing: P2C prefers the cheaper backend, round-robin takes turns, weighted follows weights."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from servegrid.registry.v1 import registry_pb2 as rpb

from services.router.backends import Backend
from services.router.balancer import Balancer
from services.router.settings import RouterSettings


@dataclass
class Fake:
    name: str
    cost: float
    weight: int = 1

    def score(self, now: float) -> float:
        return self.cost


def test_p2c_with_two_always_picks_the_cheaper() -> None:
    fast, slow = Fake("fast", 1.0), Fake("slow", 5.0)
    balancer = Balancer(rpb.LOAD_BALANCING_P2C)
    assert {balancer.pick([fast, slow], 0).name for _ in range(100)} == {"fast"}


def test_p2c_over_many_never_picks_the_worst() -> None:
    backends = [Fake(str(i), float(i)) for i in range(5)]
    picks = Counter(Balancer(rpb.LOAD_BALANCING_UNSPECIFIED).pick(backends, 0).name for _ in range(2000))
    assert picks["4"] == 0 and picks["0"] > picks["3"]


def test_round_robin_takes_turns() -> None:
    backends = [Fake("a", 9), Fake("b", 1), Fake("c", 1)]
    balancer = Balancer(rpb.LOAD_BALANCING_ROUND_ROBIN)
    assert [balancer.pick(backends, 0).name for _ in range(6)] == ["a", "b", "c", "a", "b", "c"]


def test_weighted_follows_weights() -> None:
    backends = [Fake("a", 1, weight=3), Fake("b", 1, weight=1)]
    picks = Counter(Balancer(rpb.LOAD_BALANCING_WEIGHTED).pick(backends, 0).name for _ in range(8000))
    assert abs(picks["a"] / 8000 - 0.75) < 0.03


async def test_backend_score_uses_peak_ewma_and_in_flight_and_decays_when_idle() -> None:
    backend = Backend("b", "127.0.0.1:1", 1, RouterSettings(ewma_decay_s=1.0))
    try:
        backend.observe(0.010, now=100.0)
        assert backend.cost_s == 0.010
        backend.observe(0.050, now=100.001)  # peak: a slowdown counts at once
        assert backend.cost_s == 0.050
        backend.observe(0.010, now=101.0)  # then it relaxes with time
        assert 0.010 < backend.cost_s < 0.050
        base = backend.score(101.0)
        backend.in_flight = 3
        assert backend.score(101.0) == base * 4
        backend.in_flight = 0
        assert backend.score(105.0) < base / 10  # idle: tried again eventually
    finally:
        await backend.close()

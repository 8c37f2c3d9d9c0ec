"""Job progress: items per second and an ETA, from the job's counters over time."""

from __future__ import annotations

import datetime as dt
import time
from collections import deque

from services.batch.store import Job

WINDOW_S = 5.0


def average_rate(job: Job, now: dt.datetime | None = None) -> float:
    """Items finished per second since the job started (what a single GetBatchJob can know)."""
    if job.start_time is None or job.done_items == 0:
        return 0.0
    end = job.end_time or now or dt.datetime.now(dt.UTC)
    elapsed = (end - job.start_time).total_seconds()
    return job.done_items / elapsed if elapsed > 0 else 0.0


def eta_seconds(job: Job, rate: float) -> float:
    """Seconds until the job ends at `rate`; 0 once ended, negative when unknown."""
    if job.terminal:
        return 0.0
    remaining = job.total_items - job.done_items
    return remaining / rate if rate > 0 else -1.0


class RateWindow:
    """Items per second over the last few seconds, from successive samples of a job's done count."""

    def __init__(self, window_s: float = WINDOW_S) -> None:
        self._window_s = window_s
        self._samples: deque[tuple[float, int]] = deque()

    def add(self, done: int, at: float | None = None) -> float:
        now = time.monotonic() if at is None else at
        self._samples.append((now, done))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self._window_s:
            self._samples.popleft()
        first_t, first_done = self._samples[0]
        if now - first_t <= 0:
            return 0.0
        return max(0.0, (done - first_done) / (now - first_t))

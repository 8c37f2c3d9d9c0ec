"""SnapshotPublisher: bursts are one build; nothing is published before a table; a failed build keeps the last."""

from __future__ import annotations

import asyncio

import pytest

from services.router.publisher import SnapshotPublisher, snapshot_version
from services.router.xds import XdsSnapshot


class Recorder:
    def __init__(self) -> None:
        self.revision = 1
        self.built = 0
        self.fail = False
        self.published: list[XdsSnapshot] = []

    def build(self) -> XdsSnapshot:
        self.built += 1
        if self.fail:
            raise ValueError("bad table")
        return XdsSnapshot.build(self.revision, {})

    def publish(self, snapshot: XdsSnapshot) -> None:
        self.published.append(snapshot)


async def test_a_burst_of_changes_is_one_build_and_flush_waits_for_it() -> None:
    recorder = Recorder()
    publisher = SnapshotPublisher(recorder.build, recorder.publish, coalesce_s=0.01)
    for _ in range(50):
        publisher.request()
    await publisher.flush()
    assert recorder.built == 1 and len(recorder.published) == 1
    recorder.revision = 2
    publisher.request()
    await publisher.flush()
    assert [s.revision for s in recorder.published] == [1, 2]


async def test_a_change_during_a_build_gets_a_build_of_its_own() -> None:
    recorder = Recorder()
    started = asyncio.Event()
    release = asyncio.Event()

    async def prepare() -> None:
        started.set()
        await release.wait()

    publisher = SnapshotPublisher(recorder.build, recorder.publish, prepare=prepare, coalesce_s=0)
    publisher.request()
    await started.wait()
    publisher.request()  # arrives while the first build is preparing
    release.set()
    await publisher.flush()
    assert recorder.built == 2


async def test_nothing_is_published_before_the_table_is_loaded() -> None:
    recorder = Recorder()
    loaded = False
    publisher = SnapshotPublisher(recorder.build, recorder.publish, ready=lambda: loaded, coalesce_s=0)
    publisher.request()
    await publisher.flush()
    assert recorder.published == []  # an Envoy that reconnects to a fresh replica keeps what it has
    loaded = True
    publisher.request()
    await publisher.flush()
    assert len(recorder.published) == 1


async def test_a_failed_build_keeps_the_last_snapshot_and_shows_in_health() -> None:
    recorder = Recorder()
    publisher = SnapshotPublisher(recorder.build, recorder.publish, coalesce_s=0)
    publisher.request()
    await publisher.flush()
    recorder.fail = True
    publisher.request()
    await publisher.flush()
    assert len(recorder.published) == 1
    with pytest.raises(RuntimeError):
        await publisher.check()
    recorder.fail = False
    publisher.request()
    await publisher.flush()
    await publisher.check()
    assert len(recorder.published) == 2
    await publisher.close()


def test_snapshot_version_is_deterministic_and_leads_with_the_revision() -> None:
    one, same = XdsSnapshot.build(7, {}), XdsSnapshot.build(7, {})
    assert snapshot_version(one) == snapshot_version(same) and snapshot_version(one).startswith("7.")
    assert snapshot_version(XdsSnapshot.build(8, {})) != snapshot_version(one)

"""The collector's upload purge on the in-memory fakes: which sessions and staging areas go,
and which stay."""

from __future__ import annotations

import pytest

from collector.model import SessionState
from collector.testing import HOUR, World

EXPIRY = 24 * HOUR


@pytest.fixture
def world() -> World:
    return World()


def test_an_active_session_idle_but_written_directly_lately_is_kept(world: World) -> None:
    session = world.links.create_session("a/app")
    world.blobs.write(session, 100)
    world.clock.advance(EXPIRY + 1)
    world.blobs.write(session, 100)  # a direct write: blobsvc sees it, linksvc does not
    stats = world.run()
    assert (stats.sessions_purged, stats.sessions_kept, stats.staging_aborted) == (0, 1, 0)
    assert world.links.sessions[session].state == SessionState.ACTIVE
    assert world.blobs.staging[session].size == 200


def test_an_active_session_idle_with_its_staging_is_cancelled_and_purged(world: World) -> None:
    session = world.links.create_session("a/app")
    world.blobs.write(session, 100)
    never_written = world.links.create_session("a/app")
    world.clock.advance(EXPIRY + 1)
    stats = world.run()
    assert (stats.sessions_purged, stats.staging_aborted) == (2, 1)
    assert world.links.sessions == {} and world.blobs.staging == {}
    # Cancelled before its staging went, so the gateway accepted no write in between.
    calls = world.links.faults.calls
    assert calls.index("finish_session") < calls.index("abort") < calls.index("purge_session")
    assert never_written not in world.links.sessions


def test_a_session_not_idle_for_long_enough_stays(world: World) -> None:
    session = world.links.create_session("a/app")
    world.blobs.write(session, 1)
    world.clock.advance(EXPIRY - 60)
    stats = world.run()
    assert stats.sessions_purged == stats.staging_aborted == 0
    assert session in world.links.sessions and session in world.blobs.staging


def test_finished_sessions_idle_that_long_are_purged(world: World) -> None:
    committed = world.links.create_session("a/app", SessionState.COMMITTED)
    cancelled = world.links.create_session("a/app", SessionState.CANCELLED)
    world.blobs.write(cancelled, 9)  # a cancel that could not reach blobsvc
    world.clock.advance(EXPIRY + 1)
    stats = world.run()
    assert (stats.sessions_purged, stats.staging_aborted) == (2, 1)
    assert committed not in world.links.sessions and cancelled not in world.links.sessions
    assert world.blobs.staging == {}


def test_a_cancelled_sessions_staging_is_aborted_even_before_the_session_expires(
    world: World,
) -> None:
    session = world.links.create_session("a/app")
    world.blobs.write(session, 9)
    world.clock.advance(EXPIRY + 1)
    # Cancelled just now, while blobsvc was down: the session is fresh, its bytes are not.
    world.links.finish_session(session, SessionState.CANCELLED)
    stats = world.run()
    assert (stats.sessions_purged, stats.staging_aborted) == (0, 1)
    assert world.blobs.staging == {}
    assert world.links.sessions[session].state == SessionState.CANCELLED


def test_idle_push_staging_is_aborted_and_recent_one_kept(world: World) -> None:
    world.blobs.write("push-crashed", 50)
    world.clock.advance(EXPIRY + 1)
    world.blobs.write("push-inflight", 50)
    world.blobs.write("someone-elses", 50)  # no session by that id
    world.clock.advance(60)
    stats = world.run()
    assert stats.staging_aborted == 1
    assert set(world.blobs.staging) == {"push-inflight", "someone-elses"}
    world.clock.advance(EXPIRY)
    assert world.run().staging_aborted == 2
    assert world.blobs.staging == {}


def test_an_idle_staging_area_of_a_live_active_session_is_kept(world: World) -> None:
    session = world.links.create_session("a/app")
    world.blobs.write(session, 3)
    world.clock.advance(EXPIRY + 1)
    world.links.sessions[session] = world.links.sessions[session].__class__(
        session, "a/app", SessionState.ACTIVE, world.clock()
    )  # the session was touched through the gateway
    stats = world.run()
    assert stats.staging_aborted == 0 and session in world.blobs.staging


def test_an_abort_that_fails_keeps_the_session_for_the_next_run(world: World) -> None:
    session = world.links.create_session("a/app", SessionState.CANCELLED)
    world.blobs.write(session, 3)
    world.clock.advance(EXPIRY + 1)
    world.blobs.down = True
    stats = world.run()
    # The abort fails (counted), then listing the staging areas fails: the run ends there.
    assert stats.outcome == "error" and stats.failures == 1 and stats.sessions_purged == 0
    assert session in world.links.sessions
    world.blobs.down = False
    assert world.run().sessions_purged == 1
    assert world.blobs.staging == {} and world.links.sessions == {}


def test_many_kept_sessions_do_not_stall_the_purge(world: World) -> None:
    # More kept sessions than a page (page size 2 here): the loop ends, the rest are seen.
    kept = [world.links.create_session("a/app") for _ in range(5)]
    for session in kept:
        world.blobs.write(session, 1)
    world.clock.advance(EXPIRY + 1)
    for session in kept:
        world.blobs.write(session, 1)
    stats = world.run()
    assert stats.sessions_kept == 2 and stats.sessions_purged == 0

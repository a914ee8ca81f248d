"""The collector's mark and sweep on the in-memory fakes: grace, the races the fence settles,
failed deletes and takeover, a runner killed at every step, dry runs, and the runner lock."""

from __future__ import annotations

import pytest

from collector.fakes import Crash
from collector.model import BlobState
from collector.stats import LOCK_LOST, OK, SKIPPED, STOPPED
from collector.testing import HOUR, World


@pytest.fixture
def world() -> World:
    return World()


def test_grace_is_respected_and_linked_blobs_stay(world: World) -> None:
    gone = world.push("a/app", "gone", size=7)
    shared = world.push("a/app", "shared", size=5)
    world.links.link("b/app", shared)
    world.links.unlink("a/app", gone)
    world.links.unlink("a/app", shared)

    first = world.run()
    assert (first.outcome, first.marked, first.candidates) == (OK, 1, 0)
    assert world.state(gone) == BlobState.MARKED
    world.clock.advance(HOUR - 1)
    assert world.run().candidates == 0
    assert gone in world.blobs.stored

    world.clock.advance(2)
    stats = world.run()
    assert (stats.candidates, stats.reclaimed_blobs, stats.reclaimed_bytes) == (1, 1, 7)
    assert gone not in world.blobs.stored and world.state(gone) is None
    assert world.state(shared) == BlobState.ACTIVE and shared in world.blobs.stored
    world.assert_consistent()
    assert world.links.locks == {}  # released


def test_a_blob_linked_between_mark_and_fence_is_not_deleted(world: World) -> None:
    digest = world.push("a/app", "relinked")
    world.links.unlink("a/app", digest)
    world.run()
    world.clock.advance(2 * HOUR)
    # Listed as collectable, then linked (a mount) before the fence.
    world.links.faults.calls_before["fence_blob"] = lambda: world.links.link("b/app", digest)
    stats = world.run()
    assert (stats.candidates, stats.fence_lost, stats.reclaimed_blobs) == (1, 1, 0)
    assert world.state(digest) == BlobState.ACTIVE  # the fence revived it
    assert digest in world.blobs.stored
    world.assert_consistent()


def test_a_lease_taken_before_the_fence_protects_the_blob(world: World) -> None:
    digest = world.push("a/app", "leased")
    world.links.unlink("a/app", digest)
    world.run()
    world.clock.advance(2 * HOUR)
    # A push of the same digest takes a lease (reviving the row) after the listing.
    world.links.faults.calls_before["fence_blob"] = lambda: world.links.lease(digest)
    stats = world.run()
    assert (stats.fence_lost, stats.reclaimed_blobs) == (1, 0)
    assert digest in world.blobs.stored
    # While the lease lives, mark leaves it alone; once it expired, it is marked again.
    assert world.run().marked == 0
    world.clock.advance(700)
    assert world.run().marked == 1


def test_an_unlinked_blob_with_a_live_lease_is_not_marked(world: World) -> None:
    digest = world.push("a/app", "inflight")
    world.links.unlink("a/app", digest)
    world.links.lease(digest)  # an upload of the same bytes in flight
    assert world.run().marked == 0
    assert world.state(digest) == BlobState.ACTIVE


def test_a_fence_lost_to_a_concurrent_fence_deletes_nothing(world: World) -> None:
    digest = world.push("a/app", "contended")
    world.links.unlink("a/app", digest)
    world.run()
    world.clock.advance(2 * HOUR)
    listed = world.links.blobs[digest].version
    # Another runner fences the same row first (it then deletes and forgets it).
    world.links.faults.calls_before["fence_blob"] = lambda: world.links.fence_blob(digest, listed)
    stats = world.run()
    assert (stats.candidates, stats.fence_lost, stats.reclaimed_blobs) == (1, 1, 0)
    assert world.state(digest) == BlobState.DELETING
    assert digest in world.blobs.stored  # this runner sent no delete
    assert "delete" not in world.links.faults.calls


def test_a_failed_delete_leaves_it_deleting_and_a_later_run_takes_it_over(world: World) -> None:
    digest = world.push("a/app", "stuck", size=3)
    world.links.unlink("a/app", digest)
    world.run()
    world.clock.advance(2 * HOUR)
    world.blobs.failing_deletes = 1
    stats = world.run()
    assert (stats.delete_failed, stats.stuck_deleting, stats.reclaimed_blobs) == (1, 1, 0)
    assert world.state(digest) == BlobState.DELETING and digest in world.blobs.stored

    # Too early for a takeover: nothing happens.
    world.clock.advance(60)
    assert world.run().candidates == 0
    # A push of the digest meanwhile is refused (retryable), not linked to doomed bytes.
    with pytest.raises(Exception, match="being deleted"):
        world.links.lease(digest)

    world.clock.advance(600)
    stats = world.run()
    assert (stats.taken_over, stats.reclaimed_blobs, stats.reclaimed_bytes) == (1, 1, 3)
    assert world.state(digest) is None and digest not in world.blobs.stored


def test_blobsvc_down_ends_the_sweep_at_the_first_failed_delete(world: World) -> None:
    digests = [world.push("a/app", f"blob{i}") for i in range(3)]
    for digest in digests:
        world.links.unlink("a/app", digest)
    world.run()
    world.clock.advance(2 * HOUR)
    world.blobs.failing_deletes = 3
    stats = world.run()
    assert (stats.outcome, stats.delete_failed, stats.stuck_deleting) == ("error", 1, 1)
    # Only one row is left deleting (pushes of it are refused until a takeover), not three.
    states = sorted(world.state(d) for d in digests)  # type: ignore[type-var]
    assert states == [BlobState.DELETING, BlobState.MARKED, BlobState.MARKED]


def test_a_delete_failing_for_one_blob_does_not_stop_the_others(world: World) -> None:
    import grpc

    from linkedblob.errors import LinkedBlobError, Reason

    digests = [world.push("a/app", f"blob{i}") for i in range(3)]
    for digest in digests:
        world.links.unlink("a/app", digest)
    world.run()
    world.clock.advance(2 * HOUR)
    world.blobs.failing_deletes = 1
    world.blobs.delete_failure = lambda: LinkedBlobError(
        grpc.StatusCode.INTERNAL, Reason.INTERNAL, "EIO"
    )
    stats = world.run()
    assert (stats.outcome, stats.delete_failed, stats.reclaimed_blobs) == (OK, 1, 2)


def test_a_stalled_runner_does_not_delete_past_half_the_takeover_time(world: World) -> None:
    digest = world.push("a/app", "stalled")
    world.links.unlink("a/app", digest)
    world.run()
    world.clock.advance(2 * HOUR)
    # The runner stalls for 5 minutes right after its fence (takeover: 10 minutes).
    original = world.links.fence_blob

    def slow_fence(digest: str, version: int):  # type: ignore[no-untyped-def]
        fence = original(digest, version)
        world.clock.advance(301)
        return fence

    world.links.fence_blob = slow_fence  # type: ignore[method-assign]
    stats = world.run()
    assert (stats.delete_failed, stats.stuck_deleting) == (1, 1)
    assert digest in world.blobs.stored
    assert "delete" not in world.links.faults.calls


CRASH_POINTS = [
    "acquire_runner_lock",
    "abort",
    "purge_session",
    "mark_unreferenced",
    "fence_blob",
    "delete",
    "forget_blob",
]


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_a_runner_killed_after_any_step_then_a_new_run_converges(world: World, point: str) -> None:
    kept = world.push("a/app", "kept")
    doomed = [world.push("a/app", f"doomed{i}", size=i + 1) for i in range(5)]
    for digest in doomed:
        world.links.unlink("a/app", digest)
    stale = world.links.create_session("a/app")
    world.blobs.write(stale, 4)
    world.clock.advance(25 * HOUR)
    world.run()  # purges the session, marks the unlinked blobs
    stale = world.links.create_session("a/app")
    world.blobs.write(stale, 4)
    world.clock.advance(25 * HOUR)

    world.links.faults.crash_after.add(point)
    with pytest.raises(Crash):
        world.run()
    world.assert_consistent()

    world.restart()
    # The dead runner's lock and its deleting rows are taken over once they expire (10 min);
    # a session it cancelled but did not purge goes once it is idle for the expiry again.
    world.clock.advance(601)
    assert world.run().outcome == OK
    world.assert_consistent()
    assert set(world.blobs.stored) == {kept}
    world.clock.advance(25 * HOUR)
    stats = world.run()
    assert stats.outcome == OK
    world.assert_consistent()
    assert set(world.links.blobs) == {kept}
    assert set(world.blobs.stored) == {kept}
    assert world.links.sessions == {} and world.blobs.staging == {}


def test_a_dry_run_changes_nothing_and_reports_what_a_run_would_do(world: World) -> None:
    digest = world.push("a/app", "candidate")
    world.links.unlink("a/app", digest)
    world.run()
    world.clock.advance(2 * HOUR)
    world.links.unlink("a/app", world.push("a/app", "unmarked"))
    session = world.links.create_session("a/app")
    world.blobs.write("push-abandoned", 5)
    world.clock.advance(25 * HOUR)
    world.links.faults.calls.clear()
    before = world.snapshot()
    stats = world.run(dry_run=True)
    assert world.snapshot() == before
    assert stats.dry_run and stats.outcome == OK
    assert stats.would_collect == [digest]
    assert stats.would_purge == [session]
    assert stats.would_abort == ["push-abandoned"]
    assert "acquire_runner_lock" not in world.links.faults.calls


def test_only_the_lock_holder_runs(world: World) -> None:
    digest = world.push("a/app", "once")
    world.links.unlink("a/app", digest)
    world.run()
    world.clock.advance(2 * HOUR)
    other = world.runner(holder="second")
    seen: list[object] = []
    world.links.faults.calls_before["fence_blob"] = lambda: seen.append(other.run())
    first = world.runner(holder="first").run()
    assert first.reclaimed_blobs == 1
    (second,) = seen
    assert second.outcome == SKIPPED and second.lock_holder == "first"  # type: ignore[attr-defined]
    assert world.links.locks == {}
    assert other.run().outcome == OK  # free again


def test_a_runner_whose_lock_was_taken_stops(world: World) -> None:
    for i in range(4):
        world.links.unlink("a/app", world.push("a/app", f"blob{i}"))
    world.run()
    world.clock.advance(2 * HOUR)

    def lose_lock() -> None:  # the runner stalls past its lock; another takes it
        world.clock.advance(400)
        world.links.acquire_runner_lock("gc", "usurper", 300)

    world.links.faults.calls_before["delete"] = lose_lock
    stats = world.runner(holder="slow").run()
    assert stats.outcome == LOCK_LOST and "usurper" in stats.error
    assert stats.reclaimed_blobs == 1
    assert world.links.locks["gc"][0] == "usurper"  # not released by the loser


def test_a_stop_request_ends_the_run_between_steps(world: World) -> None:
    world.links.unlink("a/app", world.push("a/app", "x"))
    asks = iter([False, True])  # before the purge, before the mark
    runner = world.runner()
    runner.should_stop = lambda: next(asks, True)
    stats = runner.run()
    assert stats.outcome == STOPPED
    assert "mark_unreferenced" not in world.links.faults.calls
    assert world.links.locks == {}


def test_linksvc_failing_ends_the_run_as_an_error(world: World) -> None:
    from linkedblob.errors import unavailable

    def down() -> None:
        raise unavailable("linksvc is down")

    world.links.faults.calls_before["mark_unreferenced"] = down
    stats = world.run()
    assert stats.outcome == "error" and "linksvc is down" in stats.error

"""fsck on the in-memory fakes: what it finds, what --repair does (and never does), the report
as a table and as JSON."""

from __future__ import annotations

import json

import pytest

from collector.fakes import Crash
from collector.fsck import (
    DANGLING_LINK,
    MISSING_BYTES,
    ORPHAN,
    SIZE_MISMATCH,
    STRAY_STAGING,
    Fsck,
    FsckReport,
)
from collector.model import BlobState, SessionState
from collector.testing import HOUR, World, digest_of

EMPTY = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


@pytest.fixture
def world() -> World:
    return World()


def fsck(world: World, repair: bool = False) -> FsckReport:
    return Fsck(
        world.links,
        world.blobs,
        repair=repair,
        upload_expiry=24 * HOUR,
        clock=world.clock,
        page_size=2,
    ).run()


def test_a_consistent_system_is_clean(world: World) -> None:
    for i in range(5):
        world.push("a/app", f"blob{i}")
    world.links.link("b/app", digest_of("blob0"))
    world.links.blobs[EMPTY] = type(world.links.blobs[digest_of("blob0")])(0, BlobState.ACTIVE, 0)
    world.links.link("a/app", EMPTY)  # the empty blob: never stored, always there
    session = world.links.create_session("a/app")
    world.blobs.write(session, 3)  # an upload in progress
    world.blobs.write("push-inflight", 3)
    report = fsck(world)
    assert report.clean, report.table()
    assert (report.indexed_blobs, report.stored_blobs, report.links) == (6, 5, 7)
    assert report.table().endswith(": clean")
    assert json.loads(report.to_json())["clean"] is True


def test_it_finds_missing_bytes_wrong_sizes_orphans_dangling_links_and_stray_staging(
    world: World,
) -> None:
    lost = world.push("a/app", "lost", size=4)
    world.links.link("b/app", lost)
    resized = world.push("a/app", "resized", size=4)
    fine = world.push("a/app", "fine")
    del world.blobs.stored[lost]  # behind blobsvc's back
    world.blobs.stored[resized] = 3
    orphan = digest_of("orphan")
    world.blobs.stored[orphan] = 8
    cancelled = world.links.create_session("a/app", SessionState.CANCELLED)
    world.blobs.write(cancelled, 2)
    world.blobs.write("nobodys", 2)
    world.blobs.write("push-old", 2)
    world.clock.advance(HOUR)

    report = fsck(world)
    found = {(f.kind, f.subject, f.repository) for f in report.findings}
    assert found == {
        (MISSING_BYTES, lost, ""),
        (SIZE_MISMATCH, resized, ""),
        (ORPHAN, orphan, ""),
        (DANGLING_LINK, lost, "a/app"),
        (DANGLING_LINK, lost, "b/app"),
        (DANGLING_LINK, resized, "a/app"),
        (STRAY_STAGING, cancelled, ""),
        (STRAY_STAGING, "nobodys", ""),
        (STRAY_STAGING, "push-old", ""),
    }
    assert fine not in {f.subject for f in report.findings}
    table = report.table()
    assert table.splitlines()[0].split() == ["KIND", "SUBJECT", "REPOSITORY", "DETAIL", "REPAIR"]
    assert "9 found" in table
    as_json = json.loads(report.to_json())
    assert as_json["clean"] is False and as_json["counts"][DANGLING_LINK] == 3
    assert len(as_json["findings"]) == 9


def test_a_blob_being_deleted_may_lack_its_bytes(world: World) -> None:
    digest = world.push("a/app", "going")
    world.links.unlink("a/app", digest)
    world.run()
    world.clock.advance(2 * HOUR)
    world.links.faults.crash_after.add("delete")  # bytes gone, row still deleting
    with pytest.raises(Crash):
        world.run()
    world.restart()
    assert world.state(digest) == BlobState.DELETING
    assert fsck(world).clean


def test_repair_adopts_orphans_aborts_old_stray_staging_and_deletes_no_bytes(
    world: World,
) -> None:
    lost = world.push("a/app", "lost")
    del world.blobs.stored[lost]
    orphan = digest_of("orphan")
    world.blobs.stored[orphan] = 8
    world.blobs.write("push-old", 2)
    world.clock.advance(HOUR)
    world.blobs.write("push-young-but-stray", 2)
    world.clock.advance(HOUR)  # idle an hour: reported, not aborted

    stored_before = dict(world.blobs.stored)
    report = fsck(world, repair=True)
    assert world.blobs.stored == stored_before  # no bytes deleted, ever
    repairs = {f.subject: f.repair for f in report.findings}
    assert repairs[orphan].startswith("adopted")
    assert repairs[lost] == ""
    assert repairs["push-old"] == repairs["push-young-but-stray"] == ""  # not idle 24 h yet
    assert world.state(orphan) == BlobState.MARKED
    assert lost in world.links.blobs and ("a/app", lost) in world.links.links

    world.clock.advance(22.5 * HOUR)
    repairs = {f.subject: f.repair for f in fsck(world, repair=True).findings}
    assert repairs["push-old"] == "aborted" and repairs["push-young-but-stray"] == ""
    assert set(world.blobs.staging) == {"push-young-but-stray"}
    # The adopted orphan is GC's now: reclaimed after the grace period.
    world.clock.advance(2 * HOUR)
    world.run()
    assert orphan not in world.blobs.stored and world.state(orphan) is None


def test_it_refuses_lists_out_of_digest_order(world: World) -> None:
    from collector.model import Page, StoredBlob

    world.blobs.list_blobs = lambda size, token: Page(  # type: ignore[method-assign]
        [StoredBlob("sha256:b", 1), StoredBlob("sha256:a", 1)]
    )
    with pytest.raises(ValueError, match="not in digest order"):
        fsck(world)


def test_repair_does_not_adopt_bytes_deleted_after_they_were_listed(world: World) -> None:
    """The index and the bytes are listed at different moments: bytes a collector deleted (and
    whose row it forgot) in between look like an orphan in the listing. Adopting them would
    index bytes that are gone, which a later push would link without sending any."""
    gone = digest_of("collected meanwhile")
    world.blobs.stored[gone] = 8
    listed = world.blobs.list_blobs

    def list_then_collect(page_size: int, token: str):  # type: ignore[no-untyped-def]
        page = listed(page_size, token)
        world.blobs.stored.pop(gone, None)  # deleted by a collector right after the listing
        return page

    world.blobs.list_blobs = list_then_collect  # type: ignore[method-assign]
    report = fsck(world, repair=True)
    repairs = {f.subject: f.repair for f in report.findings}
    assert repairs[gone].startswith("gone")
    assert gone not in world.links.blobs  # not indexed

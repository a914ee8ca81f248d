"""One garbage-collection run: purge, mark, sweep, under the runner lock.

1. **purge** abandoned uploads (collector.purge).
2. **mark**: MarkUnreferenced (active blobs that nothing links and no live lease protects become
   marked; marked ones linked again become active).
3. **sweep**: every ListCollectable blob (marked for longer than ``grace``, or deleting for
   longer than ``takeover``: a runner stopped midway) is fenced (FenceBlob with the version
   listed: linksvc re-checks links and leases under the row's lock; a lost fence is skipped),
   its bytes deleted in blobsvc within a deadline, and its row forgotten (ForgetBlob with the
   fence's version). A failed delete leaves the row deleting; a later run takes it over.

Correctness rests on the fence, never on the lock: the lock (AcquireRunnerLock "gc", renewed
while a run lasts) only keeps two runners from doing the same work. One hazard is the runner's
own: blobsvc's Delete carries no fencing token, so a runner that stalls between its fence and
its delete must not delete after another runner took the row over, forgot it and a new upload
stored the digest again. So a delete is sent only while less than half of ``takeover`` has
passed since the fence, with a deadline that ends there (and ``takeover`` must be at least
twice ``delete_timeout``).

A dry run changes nothing (no lock, no mark): it lists what purge would remove and the blobs
collectable now. The clock is injected (unix seconds) so tests can move time.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from collector.model import BlobState, BlobStorage, IndexedBlob, LinkIndex, pages
from collector.purge import Purger
from collector.stats import (
    ERROR,
    LOCK_LOST,
    OK,
    SKIPPED,
    STOPPED,
    NoProgress,
    Progress,
    RunStats,
)
from linkedblob import requestid
from linkedblob.errors import LinkedBlobError

log = logging.getLogger(__name__)

LOCK_NAME = "gc"
DAY = 86400.0


@dataclass(frozen=True)
class Options:
    grace: float = DAY  # how long a blob stays marked before it may be deleted
    upload_expiry: float = DAY  # idle time after which an upload is abandoned
    takeover: float = 600.0  # how long a deleting row waits before another run finishes it
    delete_timeout: float = 30.0  # the deadline of one blobsvc Delete
    lock_ttl: float = 300.0  # the runner lock's lease (renewed when half of it is gone)
    page_size: int = 1000
    dry_run: bool = False

    def __post_init__(self) -> None:
        for name in ("grace", "upload_expiry", "takeover", "delete_timeout", "lock_ttl"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.delete_timeout <= 0:
            # With no time to delete, every fenced blob would stay deleting for good.
            raise ValueError("delete_timeout must be above 0")
        if self.takeover < 2 * self.delete_timeout:
            raise ValueError(
                f"takeover ({self.takeover:g}s) must be at least twice the delete timeout "
                f"({self.delete_timeout:g}s): a delete must be over before another runner "
                "may take its blob over"
            )
        if not 1 <= self.lock_ttl <= 3600:
            raise ValueError("lock_ttl must be 1-3600 s")
        if self.lock_ttl <= self.delete_timeout:
            raise ValueError("lock_ttl must be above the delete timeout")


class Stop(Exception):
    """Raised between two steps when the runner is asked to stop (SIGTERM)."""


class LockLost(Exception):
    """The runner lock expired and another runner holds it now."""


def new_holder() -> str:
    """A name unique to this runner process (host, pid and a random part)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


class Runner:
    def __init__(
        self,
        links: LinkIndex,
        blobs: BlobStorage,
        options: Options | None = None,
        *,
        clock: Callable[[], float] = time.time,
        holder: str = "",
        should_stop: Callable[[], bool] = lambda: False,
        progress: Progress | None = None,
    ) -> None:
        self.links = links
        self.blobs = blobs
        self.options = options or Options()
        self.clock = clock
        self.holder = holder or new_holder()
        self.should_stop = should_stop
        self.progress = progress or NoProgress()
        self._held = False
        self._renew_at = 0.0

    # --- one run ----------------------------------------------------------------------------

    def run(self) -> RunStats:
        """One run: purge, mark, sweep. Never raises for a failed call: the outcome says."""
        stats = RunStats(dry_run=self.options.dry_run)
        # One request id per run, on every call it makes (backends' access logs group them).
        requestid.REQUEST_ID.set("gc-" + requestid.new())
        started = self.clock()
        try:
            if not self.options.dry_run and not self._acquire(stats):
                stats.outcome = SKIPPED
                return stats
            for step in (self.purge, self.mark, self.sweep):
                self.checkpoint()
                step(stats)
        except Stop:
            stats.outcome = STOPPED
        except LockLost as exc:
            stats.outcome, stats.error = LOCK_LOST, str(exc)
        except LinkedBlobError as exc:
            stats.outcome, stats.error = ERROR, str(exc)
            log.warning("gc run failed: %s", exc)
        finally:
            self._release()
            self.progress.end()
            stats.duration = self.clock() - started
        return stats

    def checkpoint(self) -> None:
        """Between two steps (never inside fence-delete-forget): stop if asked, renew the
        lock when half of it is gone."""
        if self.should_stop():
            raise Stop
        if self._held and self.clock() >= self._renew_at:
            state = self.links.acquire_runner_lock(LOCK_NAME, self.holder, self.options.lock_ttl)
            if not state.acquired:
                self._held = False
                raise LockLost(f"the runner lock expired; {state.holder} holds it now")
            self._renew_at = self.clock() + self.options.lock_ttl / 2

    # --- the steps --------------------------------------------------------------------------

    def purge(self, stats: RunStats) -> None:
        Purger(
            self.links,
            self.blobs,
            upload_expiry=self.options.upload_expiry,
            dry_run=self.options.dry_run,
            page_size=self.options.page_size,
            clock=self.clock,
            checkpoint=self.checkpoint,
            progress=self.progress,
        ).run(stats)

    def mark(self, stats: RunStats) -> None:
        if self.options.dry_run:
            return
        self.progress.begin("mark")
        result = self.links.mark_unreferenced()
        stats.marked += result.marked
        stats.revived += result.revived
        log.info("marked %d blobs, revived %d", result.marked, result.revived)

    def sweep(self, stats: RunStats) -> None:
        self.progress.begin("sweep")
        o = self.options
        candidates = pages(
            lambda size, token: self.links.list_collectable(o.grace, o.takeover, size, token),
            o.page_size,
        )
        for blob in candidates:
            self.checkpoint()
            stats.candidates += 1
            if blob.state == BlobState.DELETING:
                stats.taken_over += 1
            if o.dry_run:
                stats.would_collect.append(blob.digest)
            else:
                self._collect(blob, stats)
            self.progress.advance()

    def _collect(self, blob: IndexedBlob, stats: RunStats) -> None:
        """Fence, delete the bytes, forget the row."""
        fenced_at = self.clock()
        fence = self.links.fence_blob(blob.digest, blob.version)
        if not fence.fenced or fence.blob is None:
            stats.fence_lost += 1
            log.info("not collecting %s: changed since listed (%s)", blob.digest, fence.blob)
            return
        version = fence.blob.version
        # Past half the takeover time another runner may take the row over: never delete then.
        deadline = fenced_at + self.options.takeover / 2
        timeout = min(self.options.delete_timeout, deadline - self.clock())
        if timeout <= 0:
            stats.delete_failed += 1
            stats.stuck_deleting += 1
            log.warning("not deleting %s: fenced too long ago; a later run takes it over", blob)
            return
        try:
            self.blobs.delete(blob.digest, timeout)
        except LinkedBlobError as exc:
            stats.delete_failed += 1
            stats.stuck_deleting += 1
            log.warning("cannot delete %s (left deleting): %s", blob.digest, exc)
            if exc.code == grpc.StatusCode.UNAVAILABLE:
                # blobsvc is down or too slow: fencing more would only leave more rows
                # deleting (refusing pushes of them until a takeover). End the run.
                raise
            return
        if self.links.forget_blob(blob.digest, version):
            stats.reclaimed_blobs += 1
            stats.reclaimed_bytes += blob.size
            log.info("collected %s (%d bytes)", blob.digest, blob.size)
        else:  # another runner took it over meanwhile; it forgets the row
            log.info("collected %s; its row was taken over meanwhile", blob.digest)

    # --- the runner lock --------------------------------------------------------------------

    def _acquire(self, stats: RunStats) -> bool:
        state = self.links.acquire_runner_lock(LOCK_NAME, self.holder, self.options.lock_ttl)
        if not state.acquired:
            stats.lock_holder = state.holder
            log.info("gc skipped: the runner lock is held by %s", state.holder)
            return False
        self._held = True
        self._renew_at = self.clock() + self.options.lock_ttl / 2
        return True

    def _release(self) -> None:
        if not self._held:
            return
        self._held = False
        try:
            self.links.release_runner_lock(LOCK_NAME, self.holder)
        except LinkedBlobError as exc:  # it expires by itself
            log.warning("cannot release the runner lock: %s", exc)


__all__ = ["LOCK_NAME", "OK", "LockLost", "Options", "Runner", "Stop"]

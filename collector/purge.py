"""Step 1 of a run: purge abandoned uploads (sessions in linksvc, staging areas in blobsvc).

- A session idle (not updated) for ``upload_expiry``: an ACTIVE one only if its staging area in
  blobsvc is idle that long too (direct writes reach blobsvc only, not the session), then
  FinishSession(CANCELLED) (a commit that won meanwhile is fine: its staging is gone), Abort the
  staging, PurgeSession. A finished one: Abort (idempotent), PurgeSession. The session row goes
  last, so a failed abort leaves it for the next run.
- A staging area idle for ``upload_expiry`` whose id has no ACTIVE session (unknown, or finished;
  the gateway's ``push-*`` areas never have one): Abort. This is how a cancel that could not
  reach blobsvc, or a crashed gateway's push, stops leaking.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import grpc

from collector.model import BlobStorage, LinkIndex, Session, SessionState, StagedUpload, pages
from collector.stats import Progress, RunStats
from linkedblob.errors import LinkedBlobError

log = logging.getLogger(__name__)

# The gateway's own staging areas (PushBlob): no session ever names them.
PUSH_PREFIX = "push-"


def _not_found(exc: LinkedBlobError) -> bool:
    return exc.code == grpc.StatusCode.NOT_FOUND


def _no_session(exc: LinkedBlobError) -> bool:
    """GetSession's answer for an id that has no session: unknown, or not even a session id
    (a staging area some other caller of blobsvc named)."""
    return exc.code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)


class Purger:
    def __init__(
        self,
        links: LinkIndex,
        blobs: BlobStorage,
        *,
        upload_expiry: float,
        dry_run: bool,
        page_size: int,
        clock: Callable[[], float],
        checkpoint: Callable[[], None],
        progress: Progress,
    ) -> None:
        self.links = links
        self.blobs = blobs
        self.expiry = upload_expiry
        self.dry_run = dry_run
        self.page_size = page_size
        self.clock = clock
        self.checkpoint = checkpoint
        self.progress = progress

    def run(self, stats: RunStats) -> None:
        self.progress.begin("purge sessions")
        done = self.sessions(stats)
        self.progress.begin("purge staging")
        self.staging(stats, done)

    # --- sessions ---------------------------------------------------------------------------

    def sessions(self, stats: RunStats) -> set[str]:
        """Purges the stale sessions; returns the ids handled (their staging is dealt with).

        ListStaleSessions has no cursor (oldest first, a limit): the sessions this run keeps
        (or fails to purge) come back on every call, so the loop stops at a page with nothing
        new in it.
        """
        seen: set[str] = set()
        while True:
            stale = self.links.list_stale_sessions(self.expiry, self.page_size)
            new = [s for s in stale if s.id not in seen]
            for session in new:
                self.checkpoint()
                seen.add(session.id)
                self._session(session, stats)
                self.progress.advance()
            if not new or len(stale) < self.page_size or self.dry_run:
                return seen

    def _session(self, session: Session, stats: RunStats) -> None:
        try:
            staged: StagedUpload | None = self.blobs.upload_status(session.id)
        except LinkedBlobError as exc:
            if not _not_found(exc):
                log.warning("cannot see upload %s's staging: %s", session.id, exc)
                stats.failures += 1
                return
            staged = None
        if (
            session.state == SessionState.ACTIVE
            and staged is not None
            and self.clock() - staged.updated_at < self.expiry
        ):
            stats.sessions_kept += 1  # written directly to blobsvc lately
            return
        if self.dry_run:
            stats.would_purge.append(session.id)
            return
        if session.state == SessionState.ACTIVE:
            try:
                self.links.finish_session(session.id, SessionState.CANCELLED)
            except LinkedBlobError as exc:
                if _not_found(exc):
                    return  # purged meanwhile (another runner)
                if exc.code != grpc.StatusCode.FAILED_PRECONDITION:
                    raise
                # It committed meanwhile: its staging was consumed; purge it all the same.
        try:
            self.blobs.abort(session.id)
        except LinkedBlobError as exc:
            log.warning("cannot abort upload %s (kept for the next run): %s", session.id, exc)
            stats.failures += 1
            return
        self.links.purge_session(session.id)
        stats.sessions_purged += 1
        if staged is not None:
            stats.staging_aborted += 1
        log.info("purged upload session %s (%s)", session.id, session.state.value)

    # --- staging areas that no active session owns ------------------------------------------

    def staging(self, stats: RunStats, handled: set[str]) -> None:
        for upload in pages(self.blobs.list_uploads, self.page_size):
            self.checkpoint()
            self.progress.advance()
            if upload.upload_id in handled or self.clock() - upload.updated_at < self.expiry:
                continue
            if not upload.upload_id.startswith(PUSH_PREFIX) and self._has_active_session(
                upload.upload_id
            ):
                continue  # its session's expiry decides (the session purge above)
            if self.dry_run:
                stats.would_abort.append(upload.upload_id)
                continue
            try:
                self.blobs.abort(upload.upload_id)
            except LinkedBlobError as exc:
                log.warning("cannot abort staging area %s: %s", upload.upload_id, exc)
                stats.failures += 1
                continue
            stats.staging_aborted += 1
            log.info("aborted staging area %s (%d bytes)", upload.upload_id, upload.size)

    def _has_active_session(self, upload_id: str) -> bool:
        try:
            return self.links.get_session(upload_id).state == SessionState.ACTIVE
        except LinkedBlobError as exc:
            if _no_session(exc):
                return False
            raise

"""In-memory LinkIndex and BlobStorage for the collector's unit tests.

Honest implementations of the rules in the protos (FenceBlob, ForgetBlob, MarkUnreferenced,
leases, sessions, the runner lock): state in dicts, compare-and-set on versions, one shared
clock. Tests reach the state directly (``links.blobs``, ``blobs.stored``) and can plan
failures: ``calls_before`` runs a hook before a named call (a concurrent push between two
steps), ``crash_after`` kills the runner right after a named call took effect, and
``blobs.failing_deletes`` makes deletes fail.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from collector.model import (
    BlobState,
    Fence,
    IndexedBlob,
    LinkedDigest,
    LockState,
    MarkResult,
    Page,
    Session,
    SessionState,
    StagedUpload,
    StoredBlob,
)
from linkedblob.errors import (
    LinkedBlobError,
    Reason,
    aborted,
    failed_precondition,
    not_found,
    unavailable,
)


class Crash(BaseException):
    """The runner process dies here (not an error it could handle)."""


class Clock:
    """A settable clock, in unix seconds."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class _Faults:
    def __init__(self) -> None:
        self.calls_before: dict[str, Callable[[], None]] = {}
        self.crash_after: set[str] = set()
        self.calls: list[str] = []
        self.dead = False  # crashed: every later call of the dead runner fails

    def before(self, name: str) -> None:
        if self.dead:
            raise Crash(f"{name} after the crash")
        self.calls.append(name)
        hook = self.calls_before.pop(name, None)
        if hook is not None:
            hook()

    def after(self, name: str) -> None:
        if name in self.crash_after:
            self.crash_after.discard(name)
            self.dead = True
            raise Crash(name)


def _page(keys: list[str], page_size: int, token: str) -> tuple[list[str], str]:
    keys = sorted(k for k in keys if k > token)
    chosen = keys[:page_size]
    return chosen, (chosen[-1] if len(keys) > page_size else "")


@dataclass
class _Row:
    size: int
    state: BlobState
    since: float
    version: int = 0


@dataclass
class FakeLinkIndex:
    clock: Clock
    blobs: dict[str, _Row] = field(default_factory=dict)
    links: dict[tuple[str, str], str] = field(default_factory=dict)  # (repo, digest) -> type
    leases: dict[str, tuple[str, float]] = field(default_factory=dict)  # id -> digest, expiry
    sessions: dict[str, Session] = field(default_factory=dict)
    locks: dict[str, tuple[str, float]] = field(default_factory=dict)
    faults: _Faults = field(default_factory=_Faults)
    _ids: itertools.count[int] = field(default_factory=itertools.count)

    # --- what the gateway does (for tests to set the scene) ---------------------------------

    def lease(self, digest: str, ttl: float = 600.0) -> str:
        row = self.blobs.get(digest)
        if row is not None and row.state == BlobState.DELETING:
            raise aborted(Reason.BLOB_DELETING, f"{digest} is being deleted")
        if row is not None and row.state == BlobState.MARKED:
            self._set(row, BlobState.ACTIVE)
        lease_id = f"lease-{next(self._ids)}"
        self.leases[lease_id] = (digest, self.clock() + ttl)
        return lease_id

    def link(self, repository: str, digest: str, size: int | None = None, lease: str = "") -> None:
        row = self.blobs.get(digest)
        if row is None:
            held = self.leases.get(lease)
            if size is None:
                raise not_found(Reason.BLOB_UNKNOWN, digest)
            if held is None or held[0] != digest or held[1] <= self.clock():
                raise aborted(Reason.BLOB_UPLOAD_INVALID, "the lease expired; upload again")
            row = self.blobs[digest] = _Row(size, BlobState.ACTIVE, self.clock())
        elif row.state == BlobState.DELETING:
            raise aborted(Reason.BLOB_DELETING, f"{digest} is being deleted")
        elif row.state == BlobState.MARKED:
            self._set(row, BlobState.ACTIVE)
        self.leases.pop(lease, None)
        self.links[(repository, digest)] = ""

    def unlink(self, repository: str, digest: str) -> None:
        del self.links[(repository, digest)]

    def create_session(self, repository: str, state: SessionState = SessionState.ACTIVE) -> str:
        session_id = f"session{next(self._ids)}"
        self.sessions[session_id] = Session(session_id, repository, state, self.clock())
        return session_id

    # --- LinkIndex --------------------------------------------------------------------------

    def _set(self, row: _Row, state: BlobState) -> None:
        row.state, row.since, row.version = state, self.clock(), row.version + 1

    def _live_lease(self, digest: str) -> bool:
        now = self.clock()
        return any(d == digest and exp > now for d, exp in self.leases.values())

    def _linked(self, digest: str) -> bool:
        return any(d == digest for _, d in self.links)

    def _indexed(self, digest: str) -> IndexedBlob | None:
        row = self.blobs.get(digest)
        if row is None:
            return None
        return IndexedBlob(digest, row.size, row.state, row.since, row.version)

    def mark_unreferenced(self) -> MarkResult:
        self.faults.before("mark_unreferenced")
        now = self.clock()
        self.leases = {k: v for k, v in self.leases.items() if v[1] > now}
        marked = revived = 0
        for digest, row in self.blobs.items():
            linked = self._linked(digest)
            if row.state == BlobState.ACTIVE and not linked and not self._live_lease(digest):
                self._set(row, BlobState.MARKED)
                marked += 1
            elif row.state == BlobState.MARKED and linked:
                self._set(row, BlobState.ACTIVE)
                revived += 1
        self.faults.after("mark_unreferenced")
        return MarkResult(marked, revived)

    def list_collectable(
        self, grace: float, takeover: float, page_size: int, token: str
    ) -> Page[IndexedBlob]:
        self.faults.before("list_collectable")
        now = self.clock()
        keys = [
            d
            for d, r in self.blobs.items()
            if (r.state == BlobState.MARKED and r.since <= now - grace)
            or (r.state == BlobState.DELETING and r.since <= now - takeover)
        ]
        chosen, next_token = _page(keys, page_size, token)
        return Page([b for d in chosen if (b := self._indexed(d)) is not None], next_token)

    def fence_blob(self, digest: str, version: int) -> Fence:
        self.faults.before("fence_blob")
        row = self.blobs.get(digest)
        if row is None or row.version != version:
            return Fence(False, self._indexed(digest))
        if row.state == BlobState.ACTIVE:
            return Fence(False, self._indexed(digest))
        if self._linked(digest):
            self._set(row, BlobState.ACTIVE)
            return Fence(False, self._indexed(digest))
        if self._live_lease(digest):
            return Fence(False, self._indexed(digest))
        self._set(row, BlobState.DELETING)
        self.faults.after("fence_blob")
        return Fence(True, self._indexed(digest))

    def forget_blob(self, digest: str, version: int) -> bool:
        self.faults.before("forget_blob")
        row = self.blobs.get(digest)
        if row is None or row.state != BlobState.DELETING or row.version != version:
            return False
        del self.blobs[digest]
        self.faults.after("forget_blob")
        return True

    def adopt_blob(self, digest: str, size: int) -> bool:
        self.faults.before("adopt_blob")
        row = self.blobs.get(digest)
        if row is not None:
            if row.size != size:
                raise failed_precondition(Reason.SIZE_INVALID, f"{digest} is recorded as {size}")
            return False
        self.blobs[digest] = _Row(size, BlobState.MARKED, self.clock())
        return True

    def list_blobs(self, page_size: int, token: str) -> Page[IndexedBlob]:
        self.faults.before("list_blobs")
        chosen, next_token = _page(list(self.blobs), page_size, token)
        return Page([b for d in chosen if (b := self._indexed(d)) is not None], next_token)

    def acquire_runner_lock(self, name: str, holder: str, ttl: float) -> LockState:
        self.faults.before("acquire_runner_lock")
        now = self.clock()
        current = self.locks.get(name)
        if current is None or current[1] <= now or current[0] == holder:
            self.locks[name] = (holder, now + ttl)
            self.faults.after("acquire_runner_lock")
            return LockState(True, holder, now + ttl)
        return LockState(False, current[0], current[1])

    def release_runner_lock(self, name: str, holder: str) -> None:
        self.faults.before("release_runner_lock")
        if self.locks.get(name, ("", 0.0))[0] == holder:
            del self.locks[name]

    def list_stale_sessions(self, older_than: float, limit: int) -> list[Session]:
        self.faults.before("list_stale_sessions")
        cutoff = self.clock() - older_than
        stale = [s for s in self.sessions.values() if s.updated_at <= cutoff]
        return sorted(stale, key=lambda s: s.updated_at)[:limit]

    def get_session(self, session_id: str) -> Session:
        self.faults.before("get_session")
        session = self.sessions.get(session_id)
        if session is None:
            raise not_found(Reason.BLOB_UPLOAD_UNKNOWN, f"upload session {session_id} is unknown")
        return session

    def finish_session(self, session_id: str, state: SessionState) -> Session:
        self.faults.before("finish_session")
        session = self.get_session(session_id)
        if session.state == SessionState.ACTIVE:
            session = self.sessions[session_id] = replace(
                session, state=state, updated_at=self.clock()
            )
        elif session.state != state:
            raise failed_precondition(Reason.BLOB_UPLOAD_INVALID, f"{session_id} is finished")
        return session

    def purge_session(self, session_id: str) -> None:
        self.faults.before("purge_session")
        self.sessions.pop(session_id, None)
        self.faults.after("purge_session")

    def list_repositories(self, page_size: int, token: str) -> Page[str]:
        chosen, next_token = _page(list({r for r, _ in self.links}), page_size, token)
        return Page(chosen, next_token)

    def list_links(self, repository: str, page_size: int, token: str) -> Page[LinkedDigest]:
        digests = [d for r, d in self.links if r == repository]
        chosen, next_token = _page(digests, page_size, token)
        return Page([LinkedDigest(repository, d, self.blobs[d].size) for d in chosen], next_token)


@dataclass
class FakeBlobStorage:
    clock: Clock
    stored: dict[str, int] = field(default_factory=dict)  # digest -> size
    staging: dict[str, StagedUpload] = field(default_factory=dict)
    failing_deletes: int = 0  # how many deletes fail next
    delete_failure: Callable[[], LinkedBlobError] = lambda: unavailable(
        "backend unavailable: Deadline Exceeded"
    )
    down: bool = False
    faults: _Faults = field(default_factory=_Faults)

    def _check(self) -> None:
        if self.faults.dead:
            raise Crash("blobsvc call after the crash")
        if self.down:
            raise unavailable("blobsvc is down")

    # --- what the gateway and clients do ----------------------------------------------------

    def put(self, digest: str, size: int) -> None:
        self.stored[digest] = size

    def write(self, upload_id: str, size: int) -> None:
        old = self.staging.get(upload_id)
        self.staging[upload_id] = StagedUpload(
            upload_id, (old.size if old else 0) + size, self.clock()
        )

    # --- BlobStorage ------------------------------------------------------------------------

    def delete(self, digest: str, timeout: float) -> bool:
        self.faults.before("delete")
        self._check()
        if self.failing_deletes > 0:
            self.failing_deletes -= 1
            raise self.delete_failure()
        deleted = self.stored.pop(digest, None) is not None
        self.faults.after("delete")
        return deleted

    def abort(self, upload_id: str) -> None:
        self.faults.before("abort")
        self._check()
        self.staging.pop(upload_id, None)
        self.faults.after("abort")

    def stored_size(self, digest: str) -> int | None:
        self._check()
        return self.stored.get(digest)

    def list_blobs(self, page_size: int, token: str) -> Page[StoredBlob]:
        self._check()
        chosen, next_token = _page(list(self.stored), page_size, token)
        return Page([StoredBlob(d, self.stored[d]) for d in chosen], next_token)

    def list_uploads(self, page_size: int, token: str) -> Page[StagedUpload]:
        self._check()
        chosen, next_token = _page(list(self.staging), page_size, token)
        return Page([self.staging[u] for u in chosen], next_token)

    def upload_status(self, upload_id: str) -> StagedUpload:
        self._check()
        upload = self.staging.get(upload_id)
        if upload is None:
            raise not_found(Reason.BLOB_UPLOAD_UNKNOWN, f"upload {upload_id} is unknown")
        return upload


__all__ = ["Clock", "Crash", "FakeBlobStorage", "FakeLinkIndex", "LinkedBlobError"]

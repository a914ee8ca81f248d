"""The gRPC surface of linksvc (linkedblob.link.v1.LinkService): validate, call, map.

Every argument is validated here, on the event loop, before any SQL runs; the store's blocking
methods then run through the database: the short ones on the event loop where that is cheaper
(SQLite), the rest in its SQL threads (see linksvc.database). Errors leave as LinkedBlobError (the
``servicer_method`` decorator turns them into a status with an ErrorInfo reason).
"""

from __future__ import annotations

from datetime import datetime, timedelta

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from linkedblob.errors import Reason, invalid_argument
from linkedblob.link.v1 import link_pb2, link_pb2_grpc
from linkedblob.rpc import servicer_method
from linksvc import validation as check
from linksvc.database import Database
from linksvc.lifecycle import IndexedBlob, LifecycleStore
from linksvc.models import BlobState, SessionState
from linksvc.sessions import SessionRecord
from linksvc.store import LinkedBlob, LinkStore

SERVICE_NAME = link_pb2.DESCRIPTOR.services_by_name["LinkService"].full_name

_STATE_TO_PROTO = {
    SessionState.ACTIVE: link_pb2.Session.ACTIVE,
    SessionState.COMMITTED: link_pb2.Session.COMMITTED,
    SessionState.CANCELLED: link_pb2.Session.CANCELLED,
}
_BLOB_STATE_TO_PROTO = {
    BlobState.ACTIVE: link_pb2.IndexedBlob.ACTIVE,
    BlobState.MARKED: link_pb2.IndexedBlob.MARKED,
    BlobState.DELETING: link_pb2.IndexedBlob.DELETING,
}
_FINISH_STATES = {
    link_pb2.Session.COMMITTED: SessionState.COMMITTED,
    link_pb2.Session.CANCELLED: SessionState.CANCELLED,
}

_MAX_AGE_SECONDS = 1000 * 365 * 24 * 3600


def _timestamp(value: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


def _descriptor(d: LinkedBlob) -> link_pb2.Descriptor:
    return link_pb2.Descriptor(digest=d.digest, size=d.size, media_type=d.media_type)


def _indexed(b: IndexedBlob) -> link_pb2.IndexedBlob:
    return link_pb2.IndexedBlob(
        digest=b.digest,
        size=b.size,
        state=_BLOB_STATE_TO_PROTO[b.state],
        since=_timestamp(b.since),
        version=b.version,
    )


def _session(s: SessionRecord) -> link_pb2.Session:
    return link_pb2.Session(
        id=s.id,
        repository=s.repository,
        size=s.size,
        state=_STATE_TO_PROTO[s.state],
        started_at=_timestamp(s.started_at),
        updated_at=_timestamp(s.updated_at),
    )


class LinkServicer(link_pb2_grpc.LinkServiceServicer):
    def __init__(self, db: Database, max_sessions_per_repository: int = 0) -> None:
        self.db = db
        self.max_sessions_per_repository = max_sessions_per_repository  # 0: no limit
        self.store = LinkStore(db)
        self.lifecycle = LifecycleStore(self.store)

    # --- blobs -----------------------------------------------------------------------------

    @servicer_method
    async def RecordBlob(
        self, request: link_pb2.RecordBlobRequest, context: grpc.aio.ServicerContext
    ) -> link_pb2.RecordBlobResponse:
        digest = check.digest(request.digest)
        size = check.blob_size(digest, request.size)
        lease_id = check.lease_id(request.lease_id) if request.lease_id else ""
        created = await self.db.run_hot(self.store.record_blob, digest, size, lease_id)
        return link_pb2.RecordBlobResponse(created=created)

    @servicer_method
    async def StatBlob(
        self, request: link_pb2.StatBlobRequest, context: grpc.aio.ServicerContext
    ) -> link_pb2.StatBlobResponse:
        digest = check.digest(request.digest)
        blob = await self.db.run_hot(self.store.stat_blob, digest)
        return link_pb2.StatBlobResponse(
            digest=blob.digest, size=blob.size, created_at=_timestamp(blob.created_at)
        )

    # --- links -----------------------------------------------------------------------------

    @servicer_method
    async def Link(
        self, request: link_pb2.LinkRequest, context: grpc.aio.ServicerContext
    ) -> link_pb2.LinkResponse:
        repository = check.repository(request.repository)
        digest = check.digest(request.digest)
        media_type = check.media_type(request.media_type)
        size = check.blob_size(digest, request.size) if request.HasField("size") else None
        session_id = (
            check.session_id(request.finish_session_id) if request.finish_session_id else ""
        )
        lease_id = check.lease_id(request.lease_id) if request.lease_id else ""
        blob, created = await self.db.run_hot(
            self.store.link, repository, digest, media_type, size, session_id, lease_id
        )
        return link_pb2.LinkResponse(blob=_descriptor(blob), created=created)

    @servicer_method
    async def Resolve(
        self, request: link_pb2.ResolveRequest, context: grpc.aio.ServicerContext
    ) -> link_pb2.ResolveResponse:
        repository = check.repository(request.repository)
        digest = check.digest(request.digest)
        blob = await self.db.run_hot(self.store.resolve, repository, digest)
        return link_pb2.ResolveResponse(blob=_descriptor(blob))

    @servicer_method
    async def Unlink(
        self, request: link_pb2.UnlinkRequest, context: grpc.aio.ServicerContext
    ) -> link_pb2.UnlinkResponse:
        repository = check.repository(request.repository)
        digest = check.digest(request.digest)
        await self.db.run_hot(self.store.unlink, repository, digest)
        return link_pb2.UnlinkResponse()

    @servicer_method
    async def Mount(
        self, request: link_pb2.MountRequest, context: grpc.aio.ServicerContext
    ) -> link_pb2.MountResponse:
        repository = check.repository(request.repository)
        source = (
            check.repository(request.from_repository, "from_repository")
            if request.from_repository
            else ""
        )
        digest = check.digest(request.digest)
        media_type = check.media_type(request.media_type)
        blob, created = await self.db.run_hot(
            self.store.mount, repository, source, digest, media_type
        )
        return link_pb2.MountResponse(blob=_descriptor(blob), created=created)

    @servicer_method
    async def ListLinks(
        self, request: link_pb2.ListLinksRequest, context: grpc.aio.ServicerContext
    ) -> link_pb2.ListLinksResponse:
        repository = check.repository(request.repository)
        limit = check.page_size(request.page_size)
        after = check.decode_page_token(request.page_token, check.LINKS_TOKEN, repository)
        page, last = await self.db.run(self.store.list_links, repository, after, limit)
        token = check.encode_page_token(check.LINKS_TOKEN, repository, last) if last else ""
        return link_pb2.ListLinksResponse(
            blobs=[_descriptor(d) for d in page], next_page_token=token
        )

    @servicer_method
    async def ListRepositories(
        self, request: link_pb2.ListRepositoriesRequest, context: grpc.aio.ServicerContext
    ) -> link_pb2.ListRepositoriesResponse:
        limit = check.page_size(request.page_size)
        after = check.decode_page_token(request.page_token, check.REPOSITORIES_TOKEN, "")
        page, last = await self.db.run(self.store.list_repositories, after, limit)
        token = check.encode_page_token(check.REPOSITORIES_TOKEN, "", last) if last else ""
        return link_pb2.ListRepositoriesResponse(repositories=page, next_page_token=token)

    @servicer_method
    async def ListLinkingRepositories(
        self, request: link_pb2.ListLinkingRepositoriesRequest, context: grpc.aio.ServicerContext
    ) -> link_pb2.ListLinkingRepositoriesResponse:
        digest = check.digest(request.digest)
        limit = check.page_size(request.page_size)
        # The token's scope is the digest: a token of another digest is refused.
        after = check.decode_page_token(request.page_token, check.LINKING_TOKEN, digest)
        page, last = await self.db.run(self.store.linking_repositories, digest, after, limit)
        token = check.encode_page_token(check.LINKING_TOKEN, digest, last) if last else ""
        return link_pb2.ListLinkingRepositoriesResponse(repositories=page, next_page_token=token)

    # --- upload sessions -------------------------------------------------------------------

    @servicer_method
    async def CreateSession(
        self, request: link_pb2.CreateSessionRequest, context: grpc.aio.ServicerContext
    ) -> link_pb2.Session:
        repository = check.repository(request.repository)
        return _session(
            await self.db.run_hot(
                self.store.create_session, repository, self.max_sessions_per_repository
            )
        )

    @servicer_method
    async def GetSession(
        self, request: link_pb2.GetSessionRequest, context: grpc.aio.ServicerContext
    ) -> link_pb2.Session:
        session_id = check.session_id(request.id)
        return _session(await self.db.run_hot(self.store.get_session, session_id))

    @servicer_method
    async def AdvanceSession(
        self, request: link_pb2.AdvanceSessionRequest, context: grpc.aio.ServicerContext
    ) -> link_pb2.Session:
        session_id = check.session_id(request.id)
        from_size = check.size(request.from_size, "from_size")
        to_size = check.size(request.to_size, "to_size")
        if to_size < from_size:
            raise invalid_argument(
                Reason.SIZE_INVALID, f"to_size {to_size} is below from_size {from_size}"
            )
        session = await self.db.run_hot(self.store.advance_session, session_id, from_size, to_size)
        return _session(session)

    @servicer_method
    async def FinishSession(
        self, request: link_pb2.FinishSessionRequest, context: grpc.aio.ServicerContext
    ) -> link_pb2.Session:
        session_id = check.session_id(request.id)
        state = _FINISH_STATES.get(request.state)
        if state is None:
            raise invalid_argument(
                Reason.BLOB_UPLOAD_INVALID,
                f"a session finishes COMMITTED or CANCELLED, not {request.state}",
            )
        return _session(await self.db.run_hot(self.store.finish_session, session_id, state))

    @servicer_method
    async def ListSessions(
        self, request: link_pb2.ListSessionsRequest, context: grpc.aio.ServicerContext
    ) -> link_pb2.ListSessionsResponse:
        repository = check.repository(request.repository)
        limit = check.page_size(request.page_size)
        after = check.decode_page_token(request.page_token, check.SESSIONS_TOKEN, repository)
        page, last = await self.db.run(self.store.list_sessions, repository, after, limit)
        token = check.encode_page_token(check.SESSIONS_TOKEN, repository, last) if last else ""
        return link_pb2.ListSessionsResponse(
            sessions=[_session(s) for s in page], next_page_token=token
        )

    @servicer_method
    async def ListStaleSessions(
        self, request: link_pb2.ListStaleSessionsRequest, context: grpc.aio.ServicerContext
    ) -> link_pb2.ListStaleSessionsResponse:
        if request.older_than_seconds < 0:
            raise invalid_argument(
                Reason.BLOB_UPLOAD_INVALID,
                f"older_than_seconds must be >= 0, got {request.older_than_seconds}",
            )
        limit = check.page_size(request.limit, "limit")
        # Clamped so the cutoff stays a representable date; nothing is that old anyway.
        older_than = timedelta(seconds=min(request.older_than_seconds, _MAX_AGE_SECONDS))
        sessions = await self.db.run(self.store.list_stale_sessions, older_than, limit)
        return link_pb2.ListStaleSessionsResponse(sessions=[_session(s) for s in sessions])

    @servicer_method
    async def PurgeSession(
        self, request: link_pb2.PurgeSessionRequest, context: grpc.aio.ServicerContext
    ) -> link_pb2.PurgeSessionResponse:
        session_id = check.session_id(request.id)
        await self.db.run_hot(self.store.purge_session, session_id)
        return link_pb2.PurgeSessionResponse()

    # --- leases and garbage collection (linksvc.lifecycle) ----------------------------------

    @servicer_method
    async def Lease(
        self, request: link_pb2.LeaseRequest, context: grpc.aio.ServicerContext
    ) -> link_pb2.LeaseResponse:
        digest = check.digest(request.digest)
        ttl = check.lease_ttl(request.ttl_seconds)
        repository = (
            check.repository(request.link_repository, "link_repository")
            if request.link_repository
            else ""
        )
        media_type = check.media_type(request.media_type)
        size = check.blob_size(digest, request.size) if request.HasField("size") else None
        grant = await self.db.run_hot(
            self.lifecycle.lease, digest, ttl, repository, media_type, size
        )
        if grant.linked is not None:
            blob, created = grant.linked
            return link_pb2.LeaseResponse(
                linked=link_pb2.LinkResponse(blob=_descriptor(blob), created=created)
            )
        assert grant.expires_at is not None
        return link_pb2.LeaseResponse(
            lease_id=grant.lease_id, expires_at=_timestamp(grant.expires_at)
        )

    @servicer_method
    async def ReleaseLease(
        self, request: link_pb2.ReleaseLeaseRequest, context: grpc.aio.ServicerContext
    ) -> link_pb2.ReleaseLeaseResponse:
        digest = check.digest(request.digest)
        lease_id = check.lease_id(request.lease_id)
        released = await self.db.run_hot(self.lifecycle.release_lease, digest, lease_id)
        return link_pb2.ReleaseLeaseResponse(released=released)

    @servicer_method
    async def MarkUnreferenced(
        self, request: link_pb2.MarkUnreferencedRequest, context: grpc.aio.ServicerContext
    ) -> link_pb2.MarkUnreferencedResponse:
        marked, revived = await self.db.run(self.lifecycle.mark_unreferenced)
        return link_pb2.MarkUnreferencedResponse(marked=marked, revived=revived)

    @servicer_method
    async def ListCollectable(
        self, request: link_pb2.ListCollectableRequest, context: grpc.aio.ServicerContext
    ) -> link_pb2.ListCollectableResponse:
        grace = check.age(request.grace_seconds, "grace_seconds")
        takeover = check.age(request.takeover_seconds, "takeover_seconds")
        limit = check.page_size(request.page_size)
        after = check.decode_page_token(request.page_token, check.COLLECTABLE_TOKEN, "")
        page, last = await self.db.run(
            self.lifecycle.list_collectable, grace, takeover, after, limit
        )
        token = check.encode_page_token(check.COLLECTABLE_TOKEN, "", last) if last else ""
        return link_pb2.ListCollectableResponse(
            blobs=[_indexed(b) for b in page], next_page_token=token
        )

    @servicer_method
    async def FenceBlob(
        self, request: link_pb2.FenceBlobRequest, context: grpc.aio.ServicerContext
    ) -> link_pb2.FenceBlobResponse:
        digest = check.digest(request.digest)
        version = check.version(request.version)
        fenced, blob = await self.db.run(self.lifecycle.fence_blob, digest, version)
        if blob is None:
            return link_pb2.FenceBlobResponse(fenced=fenced)
        return link_pb2.FenceBlobResponse(fenced=fenced, blob=_indexed(blob))

    @servicer_method
    async def ForgetBlob(
        self, request: link_pb2.ForgetBlobRequest, context: grpc.aio.ServicerContext
    ) -> link_pb2.ForgetBlobResponse:
        digest = check.digest(request.digest)
        version = check.version(request.version)
        forgotten = await self.db.run(self.lifecycle.forget_blob, digest, version)
        return link_pb2.ForgetBlobResponse(forgotten=forgotten)

    @servicer_method
    async def AdoptBlob(
        self, request: link_pb2.AdoptBlobRequest, context: grpc.aio.ServicerContext
    ) -> link_pb2.AdoptBlobResponse:
        digest = check.digest(request.digest)
        size = check.blob_size(digest, request.size)
        adopted = await self.db.run(self.lifecycle.adopt_blob, digest, size)
        return link_pb2.AdoptBlobResponse(adopted=adopted)

    @servicer_method
    async def ListBlobs(
        self, request: link_pb2.ListBlobsRequest, context: grpc.aio.ServicerContext
    ) -> link_pb2.ListBlobsResponse:
        limit = check.page_size(request.page_size)
        after = check.decode_page_token(request.page_token, check.BLOBS_TOKEN, "")
        page, last = await self.db.run(self.lifecycle.list_blobs, after, limit)
        token = check.encode_page_token(check.BLOBS_TOKEN, "", last) if last else ""
        return link_pb2.ListBlobsResponse(blobs=[_indexed(b) for b in page], next_page_token=token)

    @servicer_method
    async def AcquireRunnerLock(
        self, request: link_pb2.AcquireRunnerLockRequest, context: grpc.aio.ServicerContext
    ) -> link_pb2.AcquireRunnerLockResponse:
        name = check.lock_name(request.name, "name")
        holder = check.lock_name(request.holder, "holder")
        ttl = check.runner_lock_ttl(request.ttl_seconds)
        lock = await self.db.run(self.lifecycle.acquire_runner_lock, name, holder, ttl)
        response = link_pb2.AcquireRunnerLockResponse(acquired=lock.acquired, holder=lock.holder)
        if lock.expires_at is not None:
            response.expires_at.CopyFrom(_timestamp(lock.expires_at))
        return response

    @servicer_method
    async def ReleaseRunnerLock(
        self, request: link_pb2.ReleaseRunnerLockRequest, context: grpc.aio.ServicerContext
    ) -> link_pb2.ReleaseRunnerLockResponse:
        name = check.lock_name(request.name, "name")
        holder = check.lock_name(request.holder, "holder")
        await self.db.run(self.lifecycle.release_runner_lock, name, holder)
        return link_pb2.ReleaseRunnerLockResponse()

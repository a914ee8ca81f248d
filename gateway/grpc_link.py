"""The LinkBackend over gRPC: linksvc, on one aio channel reused by every call.

A failed call becomes a LinkedBlobError here, once (from_rpc_error: linksvc's code and reason
kept, a transport failure UNAVAILABLE).
"""

from __future__ import annotations

import math

import grpc

from gateway.grpc_calls import answer
from gateway.model import BlobDescriptor, Lease, LinkedBlob, Page, SessionState, UploadSession
from linkedblob import interceptors, tls, transport
from linkedblob.link.v1 import link_pb2, link_pb2_grpc

_STATES = {
    link_pb2.Session.ACTIVE: SessionState.ACTIVE,
    link_pb2.Session.COMMITTED: SessionState.COMMITTED,
    link_pb2.Session.CANCELLED: SessionState.CANCELLED,
}
_SESSION_STATES = {state: code for code, state in _STATES.items()}


def _linked(blob: link_pb2.Descriptor) -> LinkedBlob:
    return LinkedBlob(blob.digest, blob.size, blob.media_type)


def _session(session: link_pb2.Session) -> UploadSession:
    return UploadSession(
        id=session.id,
        repository=session.repository,
        size=session.size,
        # A state this gateway does not know (a newer linksvc's) is no active upload.
        state=_STATES.get(session.state, SessionState.CANCELLED),
        started_at_ns=session.started_at.ToNanoseconds(),
        updated_at_ns=session.updated_at.ToNanoseconds(),
    )


class GrpcLinkBackend:
    def __init__(self, address: str, credentials: grpc.ChannelCredentials | None = None) -> None:
        """Opens the channel (lazily connected; must run inside the server's event loop);
        ``credentials``: TLS (None: plaintext)."""
        self._channel = tls.aio_channel(
            address,
            credentials,
            [*transport.channel_options(), *transport.bounded_windows()],
            interceptors.aio_backend_interceptors(),  # metrics, request id, tracing
        )
        self._stub = link_pb2_grpc.LinkServiceStub(self._channel)  # type: ignore[no-untyped-call]

    async def close(self) -> None:
        await self._channel.close(None)

    async def stat_blob(self, digest: str) -> BlobDescriptor:
        recorded = await answer(self._stub.StatBlob, link_pb2.StatBlobRequest(digest=digest))
        return BlobDescriptor(recorded.digest, recorded.size)

    async def link(
        self,
        repository: str,
        digest: str,
        media_type: str,
        size: int | None = None,
        finish_session: str = "",
        lease_id: str = "",
    ) -> LinkedBlob:
        request = link_pb2.LinkRequest(
            repository=repository,
            digest=digest,
            media_type=media_type,
            size=size,
            finish_session_id=finish_session,
            lease_id=lease_id,
        )
        linked = await answer(self._stub.Link, request)
        return _linked(linked.blob)

    async def lease(
        self,
        digest: str,
        ttl: float,
        link_repository: str = "",
        media_type: str = "",
        size: int | None = None,
    ) -> Lease | LinkedBlob:
        request = link_pb2.LeaseRequest(
            digest=digest,
            ttl_seconds=max(1, math.ceil(ttl)),  # whole seconds, never 0 (linksvc's default)
            link_repository=link_repository,
            media_type=media_type,
            size=size,
        )
        granted = await answer(self._stub.Lease, request)
        if granted.HasField("linked"):
            return _linked(granted.linked.blob)
        return Lease(granted.lease_id, granted.expires_at.ToNanoseconds())

    async def release_lease(self, digest: str, lease_id: str) -> bool:
        released = await answer(
            self._stub.ReleaseLease,
            link_pb2.ReleaseLeaseRequest(digest=digest, lease_id=lease_id),
        )
        return released.released

    async def resolve(self, repository: str, digest: str, fresh: bool = False) -> LinkedBlob:
        resolved = await answer(
            self._stub.Resolve, link_pb2.ResolveRequest(repository=repository, digest=digest)
        )
        return _linked(resolved.blob)

    async def unlink(self, repository: str, digest: str) -> None:
        await answer(
            self._stub.Unlink, link_pb2.UnlinkRequest(repository=repository, digest=digest)
        )

    async def mount(self, repository: str, source: str, digest: str, media_type: str) -> LinkedBlob:
        mounted = await answer(
            self._stub.Mount,
            link_pb2.MountRequest(
                repository=repository,
                from_repository=source,
                digest=digest,
                media_type=media_type,
            ),
        )
        return _linked(mounted.blob)

    async def list_links(
        self, repository: str, page_size: int, page_token: str
    ) -> Page[LinkedBlob]:
        links = await answer(
            self._stub.ListLinks,
            link_pb2.ListLinksRequest(
                repository=repository, page_size=page_size, page_token=page_token
            ),
        )
        return Page([_linked(blob) for blob in links.blobs], links.next_page_token)

    async def list_sessions(
        self, repository: str, page_size: int, page_token: str
    ) -> Page[UploadSession]:
        listed = await answer(
            self._stub.ListSessions,
            link_pb2.ListSessionsRequest(
                repository=repository, page_size=page_size, page_token=page_token
            ),
        )
        return Page([_session(s) for s in listed.sessions], listed.next_page_token)

    async def list_repositories(self, page_size: int, page_token: str) -> Page[str]:
        names = await answer(
            self._stub.ListRepositories,
            link_pb2.ListRepositoriesRequest(page_size=page_size, page_token=page_token),
        )
        return Page(list(names.repositories), names.next_page_token)

    async def list_linking_repositories(
        self, digest: str, page_size: int, page_token: str
    ) -> Page[str]:
        names = await answer(
            self._stub.ListLinkingRepositories,
            link_pb2.ListLinkingRepositoriesRequest(
                digest=digest, page_size=page_size, page_token=page_token
            ),
        )
        return Page(list(names.repositories), names.next_page_token)

    async def create_session(self, repository: str) -> UploadSession:
        session = await answer(
            self._stub.CreateSession, link_pb2.CreateSessionRequest(repository=repository)
        )
        return _session(session)

    async def get_session(self, upload_id: str) -> UploadSession:
        session = await answer(self._stub.GetSession, link_pb2.GetSessionRequest(id=upload_id))
        return _session(session)

    async def advance_session(self, upload_id: str, from_size: int, to_size: int) -> None:
        await answer(
            self._stub.AdvanceSession,
            link_pb2.AdvanceSessionRequest(id=upload_id, from_size=from_size, to_size=to_size),
        )

    async def finish_session(self, upload_id: str, state: SessionState) -> None:
        await answer(
            self._stub.FinishSession,
            link_pb2.FinishSessionRequest(id=upload_id, state=_SESSION_STATES[state]),
        )

    def forget(self, repository: str, digest: str) -> None:
        pass  # linksvc keeps the link; only a cache in front of it remembers anything

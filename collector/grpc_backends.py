"""LinkIndex and BlobStorage over gRPC: linksvc's and blobsvc's stubs, on sync channels.

A failed call becomes a LinkedBlobError here, once (linkedblob.errors.from_rpc_error: the
service's code and reason kept, a transport failure or an expired deadline UNAVAILABLE). With a
grant secret, every blobsvc call carries an ``internal`` grant the collector signs itself, as
the gateway does (gateway.direct.GrantIssuer), re-signed when half of it is gone.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, TypeVar

import grpc
from google.protobuf import timestamp_pb2

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
from linkedblob import grants, tls, transport
from linkedblob.blob.v1 import blob_pb2, blob_pb2_grpc
from linkedblob.errors import LinkedBlobError, from_rpc_error
from linkedblob.interceptors import backend_channel
from linkedblob.link.v1 import link_pb2, link_pb2_grpc

R = TypeVar("R")

# The deadline of every call but Delete (which the runner bounds itself).
DEFAULT_TIMEOUT = 60.0

_BLOB_STATES = {
    link_pb2.IndexedBlob.ACTIVE: BlobState.ACTIVE,
    link_pb2.IndexedBlob.MARKED: BlobState.MARKED,
    link_pb2.IndexedBlob.DELETING: BlobState.DELETING,
}
_SESSION_STATES = {
    link_pb2.Session.ACTIVE: SessionState.ACTIVE,
    link_pb2.Session.COMMITTED: SessionState.COMMITTED,
    link_pb2.Session.CANCELLED: SessionState.CANCELLED,
}
_SESSION_CODES = {state: code for code, state in _SESSION_STATES.items()}


def _seconds(ts: timestamp_pb2.Timestamp) -> float:
    return ts.ToNanoseconds() / 1e9


def _written(message: Any) -> float:
    """A staging area's last write; one blobsvc does not report counts as now (never idle)."""
    return _seconds(message.updated_at) if message.HasField("updated_at") else time.time()


def _whole(seconds: float) -> int:
    """A duration as the protos take it (whole seconds), never shorter than asked."""
    return math.ceil(seconds)


def _call(method: Callable[..., R], request: Any, **kwargs: Any) -> R:
    try:
        return method(request, **kwargs)
    except grpc.RpcError as err:
        raise from_rpc_error(err) from None


def _indexed(blob: link_pb2.IndexedBlob) -> IndexedBlob:
    # A state this collector does not know (a newer linksvc's) is one it must not collect.
    state = _BLOB_STATES.get(blob.state, BlobState.ACTIVE)
    return IndexedBlob(blob.digest, blob.size, state, _seconds(blob.since), blob.version)


def _session(session: link_pb2.Session) -> Session:
    # A state this collector does not know is treated as a live upload (never cancelled).
    state = _SESSION_STATES.get(session.state, SessionState.ACTIVE)
    return Session(session.id, session.repository, state, _seconds(session.updated_at))


class _Channel:
    def __init__(self, address: str, credentials: grpc.ChannelCredentials | None = None) -> None:
        # Metrics, request id and tracing of the collector's calls (linkedblob.interceptors).
        self.channel = backend_channel(
            tls.channel(address, credentials, transport.channel_options())
        )

    def close(self) -> None:
        self.channel.close()


class GrpcLinkIndex(_Channel):
    def __init__(
        self,
        address: str,
        timeout: float = DEFAULT_TIMEOUT,
        *,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        super().__init__(address, credentials)
        self._stub = link_pb2_grpc.LinkServiceStub(self.channel)  # type: ignore[no-untyped-call]
        self._timeout = timeout

    def _do(self, method: Callable[..., R], request: Any) -> R:
        return _call(method, request, timeout=self._timeout)

    def mark_unreferenced(self) -> MarkResult:
        done = self._do(self._stub.MarkUnreferenced, link_pb2.MarkUnreferencedRequest())
        return MarkResult(done.marked, done.revived)

    def list_collectable(
        self, grace: float, takeover: float, page_size: int, token: str
    ) -> Page[IndexedBlob]:
        request = link_pb2.ListCollectableRequest(
            grace_seconds=_whole(grace),
            takeover_seconds=_whole(takeover),
            page_size=page_size,
            page_token=token,
        )
        page = self._do(self._stub.ListCollectable, request)
        return Page([_indexed(b) for b in page.blobs], page.next_page_token)

    def fence_blob(self, digest: str, version: int) -> Fence:
        done = self._do(
            self._stub.FenceBlob, link_pb2.FenceBlobRequest(digest=digest, version=version)
        )
        return Fence(done.fenced, _indexed(done.blob) if done.HasField("blob") else None)

    def forget_blob(self, digest: str, version: int) -> bool:
        done = self._do(
            self._stub.ForgetBlob, link_pb2.ForgetBlobRequest(digest=digest, version=version)
        )
        return done.forgotten

    def adopt_blob(self, digest: str, size: int) -> bool:
        done = self._do(self._stub.AdoptBlob, link_pb2.AdoptBlobRequest(digest=digest, size=size))
        return done.adopted

    def list_blobs(self, page_size: int, token: str) -> Page[IndexedBlob]:
        request = link_pb2.ListBlobsRequest(page_size=page_size, page_token=token)
        page = self._do(self._stub.ListBlobs, request)
        return Page([_indexed(b) for b in page.blobs], page.next_page_token)

    def acquire_runner_lock(self, name: str, holder: str, ttl: float) -> LockState:
        request = link_pb2.AcquireRunnerLockRequest(
            name=name, holder=holder, ttl_seconds=_whole(ttl)
        )
        done = self._do(self._stub.AcquireRunnerLock, request)
        return LockState(done.acquired, done.holder, _seconds(done.expires_at))

    def release_runner_lock(self, name: str, holder: str) -> None:
        request = link_pb2.ReleaseRunnerLockRequest(name=name, holder=holder)
        self._do(self._stub.ReleaseRunnerLock, request)

    def list_stale_sessions(self, older_than: float, limit: int) -> list[Session]:
        request = link_pb2.ListStaleSessionsRequest(
            older_than_seconds=_whole(older_than), limit=limit
        )
        return [_session(s) for s in self._do(self._stub.ListStaleSessions, request).sessions]

    def get_session(self, session_id: str) -> Session:
        return _session(self._do(self._stub.GetSession, link_pb2.GetSessionRequest(id=session_id)))

    def finish_session(self, session_id: str, state: SessionState) -> Session:
        request = link_pb2.FinishSessionRequest(id=session_id, state=_SESSION_CODES[state])
        return _session(self._do(self._stub.FinishSession, request))

    def purge_session(self, session_id: str) -> None:
        self._do(self._stub.PurgeSession, link_pb2.PurgeSessionRequest(id=session_id))

    def list_repositories(self, page_size: int, token: str) -> Page[str]:
        request = link_pb2.ListRepositoriesRequest(page_size=page_size, page_token=token)
        page = self._do(self._stub.ListRepositories, request)
        return Page(list(page.repositories), page.next_page_token)

    def list_links(self, repository: str, page_size: int, token: str) -> Page[LinkedDigest]:
        request = link_pb2.ListLinksRequest(
            repository=repository, page_size=page_size, page_token=token
        )
        page = self._do(self._stub.ListLinks, request)
        return Page(
            [LinkedDigest(repository, b.digest, b.size) for b in page.blobs],
            page.next_page_token,
        )


class GrpcBlobStorage(_Channel):
    def __init__(
        self,
        address: str,
        grant_secret: str | grants.Signer | None = "",
        timeout: float = DEFAULT_TIMEOUT,
        *,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        super().__init__(address, credentials)
        self._stub = blob_pb2_grpc.BlobServiceStub(self.channel)  # type: ignore[no-untyped-call]
        self._grant = grants.InternalGrant(grant_secret)
        self._timeout = timeout

    def _do(self, method: Callable[..., R], request: Any, timeout: float | None = None) -> R:
        return _call(
            method,
            request,
            timeout=self._timeout if timeout is None else timeout,
            metadata=self._grant.metadata(),
        )

    def delete(self, digest: str, timeout: float) -> bool:
        done = self._do(self._stub.Delete, blob_pb2.DeleteRequest(digest=digest), timeout)
        return done.deleted

    def abort(self, upload_id: str) -> None:
        self._do(self._stub.Abort, blob_pb2.AbortRequest(upload_id=upload_id))

    def stored_size(self, digest: str) -> int | None:
        try:
            return int(self._do(self._stub.Stat, blob_pb2.StatRequest(digest=digest)).blob.size)
        except LinkedBlobError as exc:
            if exc.code == grpc.StatusCode.NOT_FOUND:
                return None
            raise

    def list_blobs(self, page_size: int, token: str) -> Page[StoredBlob]:
        page = self._do(
            self._stub.List, blob_pb2.ListRequest(page_size=page_size, page_token=token)
        )
        return Page([StoredBlob(b.digest, b.size) for b in page.blobs], page.next_page_token)

    def list_uploads(self, page_size: int, token: str) -> Page[StagedUpload]:
        request = blob_pb2.ListUploadsRequest(page_size=page_size, page_token=token)
        page = self._do(self._stub.ListUploads, request)
        return Page(
            [StagedUpload(u.upload_id, u.size, _written(u)) for u in page.uploads],
            page.next_page_token,
        )

    def upload_status(self, upload_id: str) -> StagedUpload:
        done = self._do(self._stub.UploadStatus, blob_pb2.UploadStatusRequest(upload_id=upload_id))
        return StagedUpload(upload_id, done.size, _written(done))

"""Pushes: a small blob in one call, a bigger one in one stream (straight to blobsvc when the
gateway offers direct access, else PushBlob through the gateway), or a resumable push through
the upload API that survives broken connections.

A push or put of a blob that garbage collection is deleting (ABORTED / BLOB_DELETING), or whose
lease expired before its link (ABORTED / BLOB_UPLOAD_INVALID: the bytes may be gone), is made
again with its bytes, within the retry budget, when the source can be read again (bytes, a path,
a seekable file; an iterable only when nothing was taken from it yet)."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import grpc

from linkedblob.client.channels import Gateway
from linkedblob.client.direct import DirectPath
from linkedblob.client.errors import (
    ClientError,
    DigestMismatchError,
    is_deleting,
    is_lease_expired,
    is_resumable,
    is_transient,
    must_push_again,
)
from linkedblob.client.model import Descriptor, Progress, Source, Upload
from linkedblob.client.retry import Retry
from linkedblob.client.sources import RequestStream, RewindableHash, SourceReader, hashed_chunks
from linkedblob.client.uploads import Uploads
from linkedblob.transport import PUSH_BLOB_DATA
from linkedblob.v1 import registry_pb2


@dataclass(frozen=True)
class _Push:
    """One push: where to, from what, and as what."""

    repository: str
    src: SourceReader
    media_type: str
    digest: str  # the declared digest ("" when none)
    progress: Progress | None

    def commit_request(self, upload_id: str, digest: str) -> registry_pb2.CommitUploadRequest:
        return registry_pb2.CommitUploadRequest(
            repository=self.repository,
            upload_id=upload_id,
            digest=digest,
            media_type=self.media_type,
        )


class Pusher:
    """Pushes in messages of ``chunk_size``; a resumable push (and a direct push's commit)
    retries for ``retry_timeout`` seconds without progress before it gives up."""

    def __init__(
        self,
        gateway: Gateway,
        direct: DirectPath,
        uploads: Uploads,
        *,
        chunk_size: int,
        retry_timeout: float,
    ) -> None:
        self.gateway = gateway
        self.direct = direct
        self.uploads = uploads
        self.chunk_size = chunk_size
        self.retry_timeout = retry_timeout

    def put(self, repository: str, data: bytes, media_type: str, digest: str) -> Descriptor:
        """PutBlob, made again while the blob is being deleted or the lease expired, and when
        the gateway is unavailable (the bytes are in hand and name their blob: storing and
        linking them twice is harmless)."""
        return Retry(self.retry_timeout).call(
            lambda: self.gateway.put(repository, data, media_type, digest), _put_again
        )

    def push(
        self,
        repository: str,
        source: Source,
        media_type: str,
        digest: str,
        resumable: bool,
        progress: Progress | None,
    ) -> Descriptor:
        with SourceReader(source) as src:
            job = _Push(repository, src, media_type, digest, progress)
            if resumable:
                # (It resumes after UNAVAILABLE by itself, within its own retry budget.)
                return self._again(job, self._push_resumable, on_unavailable=False)
            if src.size is not None:
                small = src.read_all() if src.size <= self.chunk_size else None
            else:
                small = src.small_content(self.chunk_size)
            if small is not None:
                # Small: one unary call (PutBlob: one backend call for a known blob, three for
                # a new one, instead of a stream's three or four).
                expected = digest or f"sha256:{hashlib.sha256(small).hexdigest()}"
                desc = self.put(repository, small, media_type, expected)
                if progress:
                    progress(len(small))
                return desc
            return self._again(job, self._push_large)

    def _push_large(self, job: _Push) -> Descriptor:
        if self.direct.wanted():
            pushed = self._push_direct(job)
            if pushed is not None:
                return pushed
        return self._push_stream(job)

    def _again(
        self,
        job: _Push,
        attempt: Callable[[_Push], Descriptor],
        *,
        on_unavailable: bool = True,
    ) -> Descriptor:
        """``attempt(job)``, made again from the source's start while it fails because the
        bytes must be sent again (:func:`~linkedblob.client.errors.must_push_again`), or, for a
        push that declares its digest (idempotent: the bytes name their blob), because the
        gateway is unavailable, within the retry budget; the progress shown goes back with the
        source. A push without a digest is not made again on UNAVAILABLE."""
        retry = Retry(self.retry_timeout)
        shown = 0

        def progress(n: int) -> None:
            nonlocal shown
            shown += n
            if job.progress:
                job.progress(n)

        counted = replace(job, progress=progress)
        while True:
            try:
                return attempt(counted)
            except ClientError as e:
                again = must_push_again(e) or (
                    on_unavailable and bool(job.digest) and is_unavailable(e)
                )
                if not again or not job.src.rewind():
                    raise
                retry.wait(e)
                if shown and job.progress:
                    job.progress(-shown)
                shown = 0

    def _push_stream(self, job: _Push) -> Descriptor:
        """PushBlob through the gateway."""
        header = registry_pb2.PushBlobRequest(
            header=registry_pb2.PushBlobRequest.Header(
                repository=job.repository,
                media_type=job.media_type,
                digest=job.digest,
                size=job.src.size,
            )
        ).SerializeToString()
        # Without a declared digest, hash what is sent to check the gateway's answer.
        hasher = None if job.digest else hashlib.sha256()
        chunks = hashed_chunks(job.src, self.chunk_size, hasher, job.progress)
        stream = RequestStream(header, PUSH_BLOB_DATA, chunks, self.chunk_size)
        desc = Descriptor.from_proto(stream.send(self.gateway.push_blob))
        if hasher is not None and desc.digest != f"sha256:{hasher.hexdigest()}":
            raise DigestMismatchError(
                f"the gateway stored {desc.digest}, but the bytes sent hash to "
                f"sha256:{hasher.hexdigest()}"
            )
        return desc

    def _push_direct(self, job: _Push) -> Descriptor | None:
        """Pushes through an upload written straight to blobsvc and committed through the
        gateway. None, with nothing of the source read, when the gateway offers no direct
        access or blobsvc cannot be reached: then the caller goes through the gateway."""
        if job.digest:
            linked = self._mount_declared(job)
            if linked is not None:
                return linked
        upload = self.direct.start_upload(job.repository)
        if upload is None:
            return None
        assert upload.direct is not None
        blobsvc = self.direct.blobsvc(upload.direct.address)
        if not blobsvc.reachable():
            self._cancel_quietly(job.repository, upload.id)
            return None
        # Without a declared digest, commit under the one the bytes sent hash to (blobsvc
        # hashes them as they arrive and checks it).
        hasher = None if job.digest else hashlib.sha256()
        chunks = hashed_chunks(job.src, self.chunk_size, hasher, job.progress)
        try:
            algorithm = job.digest.partition(":")[0] if job.digest else ""
            self.direct.write(
                blobsvc, upload.direct, upload.id, 0, chunks, algorithm, repository=job.repository
            )
            final = job.digest or f"sha256:{hasher.hexdigest() if hasher else ''}"
            # The bytes are staged: a gateway restarting meanwhile only delays the commit.
            commit = job.commit_request(upload.id, final)
            return Retry(self.retry_timeout).call(
                lambda: self.gateway.commit_upload(commit), _commit_again
            )
        except BaseException:
            self._cancel_quietly(job.repository, upload.id)  # drops the staged bytes
            raise

    def _mount_declared(self, job: _Push) -> Descriptor | None:
        """Links a blob that some repository links already without sending it (as PushBlob
        does from its header); None when no repository links it."""
        try:
            linked = self.gateway.mount(job.repository, job.digest, "", job.media_type)
        except ClientError as e:
            # Being deleted: upload it (its commit waits for the deletion to finish).
            if e.code != grpc.StatusCode.NOT_FOUND and not is_deleting(e):
                raise
            return None
        size = job.src.size
        if size is not None and size != linked.size:
            raise ClientError(
                grpc.StatusCode.INVALID_ARGUMENT,
                "SIZE_INVALID",
                f"{job.digest} is {linked.size} bytes, not the {size} given",
            )
        if job.progress and size:
            job.progress(size)
        return linked

    def _cancel_quietly(self, repository: str, upload_id: str) -> None:
        with contextlib.suppress(ClientError):
            self.gateway.cancel_upload(repository, upload_id)

    def _push_resumable(self, job: _Push) -> Descriptor:
        """Appends from where the upload is after every broken connection (UNAVAILABLE and
        the like: :func:`linkedblob.client.errors.is_resumable`), backing off, until the whole
        source is staged; then commits it."""
        repository, src, progress = job.repository, job.src, job.progress
        if not src.seekable:
            raise ValueError("a resumable push needs a path, bytes or a seekable file")
        retry = Retry(self.retry_timeout)
        direct = self.direct.wanted()
        upload: Upload = retry.call(lambda: self.uploads.start(repository, direct))
        hasher = RewindableHash(src) if not job.digest else None
        position = 0  # where the source was last rewound to / the confirmed offset
        sent = 0  # bytes handed to gRPC in the current attempt, from position
        while True:
            src.seek(position)
            if hasher is not None:
                hasher.rewind(position)
            sent = 0

            def chunks() -> Iterator[bytes | memoryview]:
                nonlocal sent
                for chunk in src.chunks(self.chunk_size):
                    if hasher is not None:
                        hasher.update(chunk)
                    yield chunk
                    # Taken by gRPC (not yet acknowledged: a broken stream rewinds to GetUpload).
                    sent += len(chunk)
                    if progress:
                        progress(len(chunk))

            try:
                position = self.uploads.append(upload, position, chunks()).offset
                break
            except ClientError as e:
                # An expired grant (a long outage) is renewed by GetUpload like the offset.
                expired = upload.direct is not None and e.code == grpc.StatusCode.UNAUTHENTICATED
                if not (is_resumable(e) or expired):
                    raise
                retry.wait(e)
                wants_grant = upload.direct is not None
                upload = retry.call(
                    lambda: self.uploads.get(repository, upload.id, wants_grant)  # noqa: B023
                )
                offset = upload.offset
                if progress and offset != position + sent:
                    progress(offset - (position + sent))  # rewind the progress shown
                if offset > position:
                    retry.reset()  # progress was made: the retry budget starts again
                position = offset
        if src.size is not None and position != src.size:
            raise ClientError(
                grpc.StatusCode.DATA_LOSS,
                "SIZE_INVALID",
                f"upload {upload.id} holds {position} bytes; the source has {src.size}",
            )
        final = job.digest or (hasher.hexdigest() if hasher is not None else "")
        commit = job.commit_request(upload.id, final)
        return retry.call(lambda: self.gateway.commit_upload(commit), _commit_again)


def is_unavailable(e: ClientError) -> bool:
    """The gateway (or a backend behind it) could not be reached: a call that stores bytes
    under their digest can be made again as it was (content addressing makes it idempotent)."""
    return e.code == grpc.StatusCode.UNAVAILABLE


def _put_again(e: ClientError) -> bool:
    return must_push_again(e) or is_unavailable(e)


def _commit_again(e: ClientError) -> bool:
    """Whether a push's commit is made again: on a transient failure, except a lease that
    expired (then the whole push is, its bytes sent again: see Pusher._again)."""
    return is_transient(e) and not is_lease_expired(e)

"""The Client: a thin facade over the client's collaborators (linkedblob.client.channels,
.direct, .uploads, .push, .pull), which it builds and wires together."""

from __future__ import annotations

import os
from collections.abc import Iterator

import grpc

from linkedblob import tuning
from linkedblob.client.channels import Gateway, Security
from linkedblob.client.direct import DirectPath
from linkedblob.client.errors import ClientError, is_deleting
from linkedblob.client.model import Descriptor, Destination, DirectGrant, Progress, Source, Upload
from linkedblob.client.pull import Puller
from linkedblob.client.push import Pusher
from linkedblob.client.retry import Retry
from linkedblob.client.sources import Pieces
from linkedblob.client.uploads import Uploads
from linkedblob.config import GATEWAY_PORT, MAX_CHUNK_BYTES, STREAM_CHUNK_BYTES
from linkedblob.v1 import registry_pb2

ADDR_ENV = "LINKEDBLOB_ADDR"
DEFAULT_ADDR = f"127.0.0.1:{GATEWAY_PORT}"
# "1" (or true, yes, on) makes Client tune malloc when not told by its keyword (see Client).
MALLOC_TUNING_ENV = tuning.MALLOC_TUNING_ENV


class Client:
    """A client of one gateway over one gRPC channel; safe to share between threads.

    ``addr`` defaults to $LINKEDBLOB_ADDR, then 127.0.0.1:50051. ``timeout`` (seconds) bounds
    each unary call; ``retry_timeout`` is how long a resumable push keeps retrying without
    progress before it gives up. ``direct`` moves bytes straight to and from blobsvc when the
    gateway offers it (one channel per blobsvc address, kept with the client). These settings
    are fixed when the client is made.

    A Client changes no process-wide setting unless asked. ``malloc_tuning=True`` (or, when the
    keyword is not given, LINKEDBLOB_MALLOC_TUNING=1 in the environment) tunes glibc's malloc as
    the servers do (:func:`linkedblob.tuning.tune_malloc`: mmap threshold 64 MiB, trim threshold
    1 GiB), once per process. With glibc's defaults the ~1 MiB buffers of received messages are
    mmap-ed or trimmed, and page-faulted in again, one by one, which costs a pull many faults,
    client CPU and throughput; pushes fault little either way (measured: bench/README.md). The
    setting is process-wide and stays: freed memory is kept for reuse instead of going back to
    the OS at once (a process can hand it back with
    :func:`linkedblob.tuning.release_free_memory`). The CLI's client commands ask for it. A
    no-op off glibc; :func:`linkedblob.tuning.applied` tells whether it was applied.

    Security (each from the environment when not given): ``tls`` (LINKEDBLOB_TLS) reaches the
    gateway over TLS, checked against the roots in ``ca`` (LINKEDBLOB_CA; empty: the system's);
    ``cert`` and ``key`` (LINKEDBLOB_CERT, LINKEDBLOB_KEY) present a client certificate; a
    ``ca``, ``cert`` or ``key`` implies TLS. ``token`` (LINKEDBLOB_TOKEN) is sent as
    ``authorization: Bearer <token>`` on every gateway call, over TLS, or in plain text only to
    a loopback address (ValueError otherwise). The direct path to blobsvc uses TLS with the
    same roots when the gateway channel does.
    """

    def __init__(
        self,
        addr: str | None = None,
        *,
        timeout: float | None = 30.0,
        retry_timeout: float = 60.0,
        chunk_size: int = STREAM_CHUNK_BYTES,
        direct: bool = True,
        malloc_tuning: bool | None = None,
        tls: bool | None = None,
        ca: str | None = None,
        cert: str | None = None,
        key: str | None = None,
        token: str | None = None,
    ) -> None:
        if not 0 < chunk_size <= MAX_CHUNK_BYTES:
            raise ValueError(f"chunk_size must be 1-{MAX_CHUNK_BYTES}")
        if malloc_tuning is None:
            malloc_tuning = tuning.wanted(default=False)
        if malloc_tuning:
            tuning.tune_malloc()  # once per process
        security = Security.resolve(tls, ca, cert, key, token)
        self._gateway = Gateway(addr or os.environ.get(ADDR_ENV) or DEFAULT_ADDR, timeout, security)
        self._direct = DirectPath(self._gateway, enabled=direct, chunk_size=chunk_size)
        self._uploads = Uploads(self._gateway, self._direct, chunk_size)
        self._pusher = Pusher(
            self._gateway,
            self._direct,
            self._uploads,
            chunk_size=chunk_size,
            retry_timeout=retry_timeout,
        )
        self._puller = Puller(self._gateway, self._direct)

    @property
    def addr(self) -> str:
        return self._gateway.addr

    @property
    def timeout(self) -> float | None:
        return self._gateway.timeout

    @property
    def retry_timeout(self) -> float:
        return self._pusher.retry_timeout

    @property
    def chunk_size(self) -> int:
        return self._uploads.chunk_size

    @property
    def direct(self) -> bool:
        return self._direct.enabled

    def close(self) -> None:
        self._direct.close()
        self._gateway.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- blobs ----------------------------------------------------------------------------------

    def stat(self, repository: str, digest: str) -> Descriptor:
        return self._gateway.stat(repository, digest)

    def exists(self, repository: str, digest: str) -> bool:
        """Whether the repository links the blob."""
        try:
            self.stat(repository, digest)
        except ClientError as e:
            if e.code == grpc.StatusCode.NOT_FOUND:
                return False
            raise
        return True

    def put(
        self, repository: str, data: bytes, *, media_type: str = "", digest: str = ""
    ) -> Descriptor:
        """Stores a small blob (at most 4 MiB) in one call; made again while garbage collection
        finishes deleting the blob, or when its lease expired (within ``retry_timeout``)."""
        return self._pusher.put(repository, data, media_type, digest)

    def push(
        self,
        repository: str,
        source: Source,
        *,
        media_type: str = "",
        digest: str = "",
        resumable: bool = False,
        progress: Progress | None = None,
    ) -> Descriptor:
        """Stores a blob from a path, bytes, a binary file (from its current position) or an
        iterable of bytes, and links it into ``repository``.

        With ``digest`` given, a blob the store already holds is linked without sending its
        bytes (through the gateway, which returns early; on the direct path, when some
        repository links it: a mount). Without it the digest (sha256) is computed while
        sending and checked. ``resumable`` (a path, bytes or a seekable file) goes through the
        upload API and resumes after broken connections. More than one message's worth goes
        straight to blobsvc when the gateway offers direct access (see the package's notes).

        A blob that garbage collection is deleting (ABORTED / BLOB_DELETING), or a lease that
        expired before the link (ABORTED / BLOB_UPLOAD_INVALID), makes the push start again
        from the source's start, within ``retry_timeout``, when the source can be read again
        (not an iterable that was read from: then the error is raised).
        """
        return self._pusher.push(repository, source, media_type, digest, resumable, progress)

    def get(self, repository: str, digest: str, *, offset: int = 0, length: int = 0) -> bytes:
        """A blob's bytes (or a range of them) in memory, verified when whole: for small
        blobs; use :meth:`pull` for big ones."""
        return self._puller.get(repository, digest, offset, length)

    def pull(
        self,
        repository: str,
        digest: str,
        dest: Destination,
        *,
        offset: int = 0,
        length: int = 0,
        progress: Progress | None = None,
    ) -> Descriptor:
        """Writes a blob (or the range ``offset``, ``length``; 0: to the end) to a path or a
        binary file, verifying the whole blob's digest as it reads.

        A path is written to a temporary file beside it and renamed into place only when
        complete and verified; on a mismatch it is removed and DigestMismatchError raised.
        """
        return self._puller.pull(repository, digest, dest, offset, length, progress)

    def mount(
        self, repository: str, digest: str, *, from_repository: str = "", media_type: str = ""
    ) -> Descriptor:
        """Links a blob that ``from_repository`` (empty: any repository) links; NOT_FOUND /
        BLOB_UNKNOWN when it does not (then push it)."""
        return self._gateway.mount(repository, digest, from_repository, media_type)

    def delete(self, repository: str, digest: str) -> None:
        """Unlinks a blob from the repository (needs a gateway with deletes enabled)."""
        self._gateway.delete(repository, digest)

    def list_blobs(self, repository: str, *, page_size: int = 0) -> Iterator[Descriptor]:
        """The repository's blobs in digest order, fetched page by page as iterated."""
        return self._gateway.list_blobs(repository, page_size)

    def list_repositories(self, *, page_size: int = 0) -> Iterator[str]:
        return self._gateway.list_repositories(page_size)

    def list_uploads(self, repository: str, *, page_size: int = 0) -> Iterator[Upload]:
        """The repository's uploads in progress, in id order (needs push on it): each one's
        offset as of its last completed write, its start and its last write (updated_at)."""
        token = ""
        while True:
            request = registry_pb2.ListUploadsRequest(
                repository=repository, page_size=page_size, page_token=token
            )
            page = self._gateway.call(self._gateway.stub.ListUploads, request)
            yield from (Upload.from_proto(upload) for upload in page.uploads)
            token = page.next_page_token
            if not token:
                return

    # --- resumable uploads, step by step ----------------------------------------------------------

    def start_upload(self, repository: str, *, direct: bool = False) -> Upload:
        """Starts a resumable upload. With ``direct``, asks for direct access too: the Upload
        then carries it (see :meth:`append`), unless the gateway does not offer it."""
        return self._uploads.start(repository, direct)

    def get_upload(self, repository: str, upload_id: str, *, direct: bool = False) -> Upload:
        """An upload's offset (the bytes staged); with ``direct``, a fresh grant to write it
        directly too, when the gateway offers that."""
        return self._uploads.get(repository, upload_id, direct)

    def append(self, upload: Upload, offset: int, chunks: Pieces) -> Upload:
        """Appends ``chunks`` (buffers of any size, sent in messages of ``chunk_size``) to an
        upload at ``offset`` in one stream: straight to blobsvc when the upload carries direct
        access and blobsvc is reachable, else through the gateway (:meth:`write_upload`). The
        upload at its new offset."""
        return self._uploads.append(upload, offset, chunks)

    def write_upload(self, repository: str, upload_id: str, offset: int, chunks: Pieces) -> Upload:
        """Appends ``chunks`` (buffers of any size, sent in messages of ``chunk_size``) at
        ``offset`` in one stream."""
        return self._uploads.write(repository, upload_id, offset, chunks)

    def commit_upload(
        self,
        repository: str,
        upload_id: str,
        digest: str,
        *,
        media_type: str = "",
        data: bytes = b"",
        offset: int = 0,
    ) -> Descriptor:
        """Commits an upload; made again while garbage collection finishes deleting a blob of
        the same digest (ABORTED / BLOB_DELETING), within ``retry_timeout``."""
        request = registry_pb2.CommitUploadRequest(
            repository=repository,
            upload_id=upload_id,
            digest=digest,
            media_type=media_type,
            data=data,
            offset=offset,
        )
        return Retry(self.retry_timeout).call(
            lambda: self._gateway.commit_upload(request), is_deleting
        )

    def cancel_upload(self, repository: str, upload_id: str) -> None:
        self._gateway.cancel_upload(repository, upload_id)

    # --- direct access to blobsvc -------------------------------------------------------------

    def locate(self, repository: str, digest: str) -> tuple[Descriptor, DirectGrant]:
        """Where to read a blob the repository links straight from blobsvc: its descriptor
        and direct access (address and a read grant). FAILED_PRECONDITION / UNSUPPORTED when
        the gateway does not offer direct access."""
        return self._direct.locate(repository, digest)

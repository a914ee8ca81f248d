"""blobsvc's domain logic: reads, resumable uploads with incremental hashing, commits.

Plain asyncio over a storage driver and its wrappers (blobsvc.storage.open_storage, which also
answers for the empty blob): every driver call runs in a worker thread (blobsvc.jobs), so the
event loop only moves messages. Callers pass parsed digests and validated arguments (the
servicer does that at the edge); this layer enforces the upload protocol (offsets,
exclusivity, verification before anything is stored).

Hashing: each upload's hash state is kept in memory as its bytes arrive (blobsvc.hashing), so
a commit, or the staged digest a Write without commit answers, only reads it. When no state
covers the staged bytes (after a restart, when another replica wrote, or for a commit with
another algorithm) they are re-read.

Protection: a Write opens no file before its first data byte, a client's write grant never
creates an upload, a failed one-shot Write drops its staging area (see write), and the storage
faults a client can act on (full disk, out of descriptors) become statuses here, once, for
every driver call (blobsvc.storage.faults).
"""

from __future__ import annotations

import asyncio
import builtins
import collections
import logging
from collections.abc import AsyncIterable, AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol, TypeVar

import grpc
from prometheus_client import Counter

from blobsvc.hashing import HashStates, RunningHash, hash_staged
from blobsvc.jobs import finish, finished, outcome, settle
from blobsvc.storage import StagedUpload, Storage, UploadInfo, busy, validate_upload_id
from blobsvc.storage.faults import mapped
from linkedblob import paging
from linkedblob.config import STREAM_CHUNK_BYTES
from linkedblob.digests import DEFAULT_ALGORITHM, Digest
from linkedblob.errors import LinkedBlobError, Reason, invalid_argument, not_found, out_of_range

log = logging.getLogger(__name__)

T = TypeVar("T")


class _Closable(Protocol):
    def close(self) -> None: ...


_Held = TypeVar("_Held", bound=_Closable | None)

MAX_FIND_MISSING = 1000  # digests per FindMissing call
# Defaults of BlobStore's tunables (see its constructor).
MAX_HASH_STATES = 10_000
PIPELINE_DEPTH = 2
READ_AHEAD = 4
READ_AHEAD_BUDGET_BYTES = 32 * 1024 * 1024
# The kinds of blobsvc's page tokens (linkedblob.paging).
_BLOBS_TOKEN = "blobs"
_UPLOADS_TOKEN = "uploads"

REHASHES = Counter(
    "linkedblob_blob_commit_rehash_total",
    "Times the staged bytes were re-read to hash them (no matching in-memory hash state): "
    "for a commit, or for the staged digest of a Write without commit",
)


@dataclass(frozen=True, slots=True)
class Committed:
    digest: Digest
    size: int
    already_existed: bool


@dataclass(frozen=True, slots=True)
class CommitSpec:
    """What a commit expects: a digest (None: whatever the bytes hash to) and maybe a size."""

    digest: Digest | None = None
    size: int | None = None


@dataclass(frozen=True, slots=True)
class WriteResult:
    size: int  # bytes staged after the stream
    committed: Committed | None
    # Without commit: the digest of all the staged bytes, with the upload's algorithm.
    staged_digest: Digest | None = None


class BlobStore:
    def __init__(
        self,
        storage: Storage,
        io_threads: int = 16,
        max_hash_states: int = MAX_HASH_STATES,
        *,
        pipeline_depth: int = PIPELINE_DEPTH,
        read_ahead: int = READ_AHEAD,
        read_ahead_budget_bytes: int = READ_AHEAD_BUDGET_BYTES,
    ) -> None:
        """The blob store over ``storage``: a driver with its wrappers
        (blobsvc.storage.open_storage), which answer for the empty blob.

        - ``io_threads``: worker threads for driver calls and hashing;
        - ``max_hash_states``: running hashes kept in memory (a few hundred bytes each);
          beyond it the oldest are dropped and their commits re-read the staged bytes;
        - ``pipeline_depth``: chunks of a Write stream queued per lane (write, hash) while the
          next one is received;
        - ``read_ahead``: chunks of a Read read ahead of the one being sent. Direct reads of
          uncached blobs go at the device's pace, which wants several requests in flight
          (measured: bench/README.md, section "blobsvc: read-ahead"). Every stream gets one;
          the others come from ``read_ahead_budget_bytes``, shared by all streams, so many
          concurrent reads hold at most that beyond one chunk each."""
        self.storage = storage
        # File I/O and hashing of large buffers release the GIL: threads overlap them with
        # the event loop receiving the next message.
        self._executor = ThreadPoolExecutor(io_threads, thread_name_prefix="blob-io")
        self._hashes = HashStates(max_hash_states)
        self._pipeline_depth = pipeline_depth
        self._read_ahead = read_ahead
        self._read_ahead_budget = read_ahead_budget_bytes  # bytes of extra read-ahead left
        # Write streams here that have not opened their upload yet (waiting for their first
        # byte), by upload id: an abort waits for them as for a holder (ABORTED, retry).
        self._arriving: collections.Counter[str] = collections.Counter()

    async def close(self) -> None:
        await asyncio.to_thread(self._executor.shutdown, wait=True)
        self.storage.close()

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        """fn(*args) in a worker thread. Cancelling the caller does not stop a job that has
        started: see blobsvc.jobs.outcome."""
        with mapped():
            return await outcome(self._executor.submit(fn, *args))

    async def _open(self, fn: Callable[..., _Held], *args: object) -> _Held:
        """Like _run, for a job that returns something to close (an upload, which holds its
        claim and lock until closed; a blob reader): if the caller is cancelled while the
        worker opens it, nobody else would ever close it, so it is closed here."""
        job = self._executor.submit(fn, *args)
        try:
            with mapped():
                return await outcome(job)
        except asyncio.CancelledError:
            if not job.cancelled() and job.exception() is None:
                held = job.result()
                if held is not None:
                    held.close()
            raise

    # --- blobs ---

    async def stat(self, digest: Digest) -> int:
        size = await self._run(self.storage.stat, digest)
        if size is None:
            raise not_found(Reason.BLOB_UNKNOWN, f"blob {digest} not found")
        return size

    async def find_missing(self, digests: list[Digest]) -> list[Digest]:
        def missing() -> list[Digest]:
            return [d for d in digests if self.storage.stat(d) is None]

        return await self._run(missing)

    async def read(self, digest: Digest, offset: int, limit: int) -> AsyncIterator[bytes]:
        """The blob's bytes from ``offset`` (at most ``limit``; 0: to the end), in chunks of
        STREAM_CHUNK_BYTES. Up to ``read_ahead`` chunks are read while the current one is
        sent."""
        if offset < 0 or limit < 0:
            raise invalid_argument(Reason.RANGE_INVALID, "offset and limit must not be negative")
        reader = await self._open(self.storage.open_blob, digest)
        if reader is None:
            raise not_found(Reason.BLOB_UNKNOWN, f"blob {digest} not found")
        pending: collections.deque[Future[bytes]] = collections.deque()
        borrowed = 0  # of the shared read-ahead budget, for the chunks beyond the first
        try:
            size = reader.size
            if offset > size:
                raise out_of_range(
                    Reason.RANGE_INVALID, f"offset {offset} is beyond size {size}", size=size
                )
            end = size if limit == 0 else min(size, offset + limit)
            position = offset  # of the next chunk to yield
            submitted = offset  # where the next read starts
            while True:
                while submitted < end and len(pending) < self._read_ahead:
                    length = min(STREAM_CHUNK_BYTES, end - submitted)
                    if pending:  # one more ahead: only while the shared budget allows
                        if self._read_ahead_budget < STREAM_CHUNK_BYTES:
                            break
                        self._read_ahead_budget -= STREAM_CHUNK_BYTES
                        borrowed += STREAM_CHUNK_BYTES
                    pending.append(self._submit(reader.read_at, submitted, length))
                    submitted += length
                if not pending:
                    break
                with mapped():
                    chunk = await outcome(pending[0])
                pending.popleft()
                if borrowed:  # one chunk fewer ahead
                    borrowed -= STREAM_CHUNK_BYTES
                    self._read_ahead_budget += STREAM_CHUNK_BYTES
                expected = min(STREAM_CHUNK_BYTES, end - position)
                if len(chunk) != expected:  # stored blobs are immutable: damage, not a race
                    raise LinkedBlobError(
                        grpc.StatusCode.DATA_LOSS,
                        Reason.INTERNAL,
                        f"blob {digest} ends at {position + len(chunk)}, before its size {size}",
                    )
                position += len(chunk)
                yield chunk
        finally:
            self._read_ahead_budget += borrowed
            for job in pending:  # the generator was closed early: the reads still use fd
                await finished(job)
            reader.close()

    def _in_order(
        self,
        previous: asyncio.Future[None] | None,
        fn: Callable[[bytes | memoryview], None],
        data: bytes | memoryview,
    ) -> asyncio.Future[None]:
        """Runs fn(data) in a worker thread once ``previous`` (the same lane's last job) is
        done; if that failed, this fails too without running."""

        async def run() -> None:
            if previous is not None:
                await previous
            await self._run(fn, data)

        return asyncio.ensure_future(run())

    def _submit(self, fn: Callable[..., T], *args: object) -> Future[T]:
        return self._executor.submit(fn, *args)

    async def put(self, data: bytes, expected: Digest | None) -> Committed:
        # One trip to a worker hashes, checks and stores: a thread hop costs more than hashing
        # a small blob (measured: bench/README.md, section "blobsvc: small blobs"), and the
        # fsyncs must stay off the event loop (inline they would hold up every other call,
        # and serialize the fsyncs of concurrent Puts that the disk could otherwise batch).
        return await self._run(self._put, data, expected)

    def _put(self, data: bytes, expected: Digest | None) -> Committed:
        """Worker thread."""
        actual = Digest.of(data, expected.algorithm if expected else DEFAULT_ALGORITHM)
        if expected is not None and actual != expected:
            raise invalid_argument(
                Reason.DIGEST_INVALID,
                f"data hashes to {actual}, not {expected}",
                digest=str(actual),
            )
        return Committed(actual, len(data), self.storage.put(actual, data))

    async def delete(self, digest: Digest) -> bool:
        return await self._run(self.storage.delete, digest)

    async def list(self, page_size: int, page_token: str) -> tuple[list[tuple[Digest, int]], str]:
        """One page of stored blobs in digest order, and the token of the next page ("" at
        the end)."""
        page_size = paging.page_size(page_size)
        after = paging.decode_page_token(page_token, _BLOBS_TOKEN, "", Digest.parse)
        found = await self._run(self.storage.list, after, page_size + 1)
        page = found[:page_size]
        next_token = ""
        if len(found) > page_size:
            next_token = paging.encode_page_token(_BLOBS_TOKEN, "", str(page[-1][0]))
        return page, next_token

    # --- uploads ---

    async def upload_info(self, upload_id: str) -> UploadInfo:
        """The upload's size and last write (NOT_FOUND / BLOB_UPLOAD_UNKNOWN when unknown)."""
        info = await self._run(self.storage.upload_info, upload_id)
        if info is None:
            raise not_found(Reason.BLOB_UPLOAD_UNKNOWN, f"upload {upload_id} not found")
        return info

    async def list_uploads(
        self, page_size: int, page_token: str
    ) -> tuple[builtins.list[UploadInfo], str]:
        """One page of staging areas in upload id order, and the token of the next page (""
        at the end)."""
        page_size = paging.page_size(page_size)
        after = paging.decode_page_token(page_token, _UPLOADS_TOKEN, "", validate_upload_id)
        found = await self._run(self.storage.list_uploads, after, page_size + 1)
        page = found[:page_size]
        next_token = ""
        if len(found) > page_size:
            next_token = paging.encode_page_token(_UPLOADS_TOKEN, "", page[-1].upload_id)
        return page, next_token

    async def abort(self, upload_id: str) -> None:
        """Drops the upload's staged bytes; an unknown upload is fine (idempotent). ABORTED
        while a stream writes it, or is about to (it has not received its first byte)."""
        if self._arriving[upload_id]:
            raise busy(upload_id)
        upload = await self._open(self.storage.open_upload, upload_id)
        self._hashes.forget(upload_id)
        if upload is None:
            return
        try:
            await self._run(upload.discard)
        finally:
            upload.close()

    async def commit(self, upload_id: str, spec: CommitSpec) -> Committed:
        upload = await self._open_existing(upload_id)
        try:
            return await self._commit_held(upload, spec)
        finally:
            upload.close()

    async def write(
        self,
        upload_id: str,
        offset: int,
        algorithm: str,
        chunks: AsyncIterable[bytes | memoryview],
        commit: CommitSpec | None = None,
        staged_digest: bool = False,
        *,
        create: bool = True,
    ) -> WriteResult:
        """Appends ``chunks`` to the upload at ``offset`` (which must equal its staged size;
        offset 0 creates an unknown upload hashing with ``algorithm``, unless ``create`` is
        False: a client's write grant, which only appends to an upload that exists), then
        commits when ``commit`` is given; otherwise, with ``staged_digest``, the result has the
        digest of all the staged bytes.

        Lazy: the offset is checked against the staged size (a stat) at once, but the upload
        is opened only when the first data byte arrives (or the stream ends), so an idle or
        header-only stream holds no descriptor. A stream that asks to commit and created the
        upload (one-shot) drops it when it fails; a resumable one keeps what was written.

        Pipelined: each chunk goes to two lanes, the file write and the running hash, each
        run in order in worker threads, beside each other and beside the caller's iterator
        receiving the next chunks. At most ``pipeline_depth`` chunks wait per lane (then receiving
        waits), so a stream holds a few chunks at most, whatever the blob's size."""
        if offset < 0:
            raise invalid_argument(Reason.BLOB_UPLOAD_INVALID, f"negative offset {offset}")
        self._arriving[upload_id] += 1
        try:
            staged = await self._run(self.storage.upload_size, upload_id)
            if staged is None and (offset > 0 or not create):
                raise not_found(Reason.BLOB_UPLOAD_UNKNOWN, f"upload {upload_id} not found")
            if staged is not None and staged != offset:
                raise _wrong_offset(staged, offset)
            messages = aiter(chunks)
            first: bytes | memoryview = b""
            async for data in messages:  # no descriptor until there is something to write
                if data:
                    first = data
                    break
            if not first and commit is None and not staged_digest and staged is not None:
                return WriteResult(staged, None)  # nothing to write or answer
            # Created only when it was not there: one committed meanwhile is not made again.
            create_with = algorithm if staged is None else None
            upload = await self._open(self.storage.open_upload, upload_id, create_with)
        finally:
            self._arriving[upload_id] -= 1
            if not self._arriving[upload_id]:
                del self._arriving[upload_id]
        if upload is None:  # committed or aborted meanwhile
            raise not_found(Reason.BLOB_UPLOAD_UNKNOWN, f"upload {upload_id} not found")
        one_shot = commit is not None and staged is None
        try:
            return await self._write_held(
                upload, offset, _chain(first, messages), commit, staged_digest
            )
        except BaseException:
            if one_shot:  # nothing resumable depends on it: free its space now
                self._hashes.forget(upload_id)
                await settle(asyncio.wrap_future(self._submit(upload.discard)))
            raise
        finally:
            upload.close()

    async def _write_held(
        self,
        upload: StagedUpload,
        offset: int,
        chunks: AsyncIterable[bytes | memoryview],
        commit: CommitSpec | None,
        staged_digest: bool,
    ) -> WriteResult:
        """write() once the upload is open (the caller closes it)."""
        if upload.size != offset:
            raise _wrong_offset(upload.size, offset)
        state = self._hashes.for_write(upload)
        in_flight: list[asyncio.Future[None]] = []  # the lanes' jobs, oldest first
        most_in_flight = self._pipeline_depth * (1 if state is None else 2)
        last_write: asyncio.Future[None] | None = None
        last_hash: asyncio.Future[None] | None = None
        try:
            async for data in chunks:
                if not data:
                    continue
                last_write = self._in_order(last_write, upload.append, data)
                in_flight.append(last_write)
                if state is not None:
                    last_hash = self._in_order(last_hash, state.update, data)
                    in_flight.append(last_hash)
                await finish(in_flight, keep=most_in_flight)
            await finish(in_flight)
        finally:
            for future in in_flight:
                await settle(future)
        size = upload.size
        if commit is not None:
            return WriteResult(size, await self._commit_held(upload, commit))
        if staged_digest:
            return WriteResult(size, None, await self._staged_digest(upload))
        return WriteResult(size, None)

    async def _staged_digest(self, upload: StagedUpload) -> Digest:
        """The digest of all of the (held) upload's bytes with its algorithm: from a copy of
        the running hash (the live one keeps going), else re-read and kept as the state."""
        state = self._hashes.trusted(upload, upload.algorithm)
        if state is not None:
            return Digest(upload.algorithm, state.hasher.copy().hexdigest())
        hasher = await self._rehash(upload, upload.algorithm)
        self._hashes.keep(upload, hasher)
        return Digest(upload.algorithm, hasher.copy().hexdigest())

    async def _rehash(self, upload: StagedUpload, algorithm: str) -> RunningHash:
        log.info(
            "re-hashing staged bytes",
            extra={"upload_id": upload.upload_id, "size": upload.size, "algorithm": algorithm},
        )
        REHASHES.inc()
        return await self._run(hash_staged, upload, algorithm)

    async def _open_existing(self, upload_id: str) -> StagedUpload:
        upload = await self._open(self.storage.open_upload, upload_id)
        if upload is None:
            raise not_found(Reason.BLOB_UPLOAD_UNKNOWN, f"upload {upload_id} not found")
        return upload

    async def _commit_held(self, upload: StagedUpload, spec: CommitSpec) -> Committed:
        size = upload.size
        if spec.size is not None and spec.size != size:
            raise invalid_argument(
                Reason.SIZE_INVALID,
                f"the staged bytes are {size} bytes, not {spec.size}",
                size=size,
            )
        algorithm = spec.digest.algorithm if spec.digest else upload.algorithm
        state = self._hashes.trusted(upload, algorithm)
        if state is not None:
            hexdigest = state.hasher.hexdigest()  # does not finalize: a retry can reuse it
        else:
            hexdigest = (await self._rehash(upload, algorithm)).hexdigest()
        actual = Digest(algorithm, hexdigest)
        if spec.digest is not None and actual != spec.digest:
            raise invalid_argument(
                Reason.DIGEST_INVALID,
                f"the staged bytes hash to {actual}, not {spec.digest}",
                digest=str(actual),
            )
        # Verified: store it (or find it already stored), and forget the upload.
        existed = await self._run(upload.store_as, actual)
        self._hashes.forget(upload.upload_id)
        return Committed(actual, size, existed)


def _wrong_offset(size: int, offset: int) -> LinkedBlobError:
    return out_of_range(
        Reason.BLOB_UPLOAD_INVALID,
        f"the upload has {size} bytes staged; cannot write at {offset}",
        size=size,
    )


async def _chain(
    first: bytes | memoryview, rest: AsyncIterator[bytes | memoryview]
) -> AsyncIterator[bytes | memoryview]:
    if first:
        yield first
    async for data in rest:
        yield data

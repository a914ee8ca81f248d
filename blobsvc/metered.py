"""blobsvc's store with its metrics: the latency and failures of each store operation, and the
bytes written and read (linkedblob.metrics: linkedblob_storage_*).

A subclass of BlobStore that times each public operation around the store's own; a Read is
timed until its stream ends, a Write until its result. The labels' children are looked up once.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable
from time import perf_counter
from typing import Any, TypeVar

from blobsvc.store import BlobStore, CommitSpec, Committed, WriteResult
from linkedblob import metrics
from linkedblob.digests import Digest
from linkedblob.errors import LinkedBlobError

T = TypeVar("T")

_OPS = ("stat", "find_missing", "read", "put", "write", "commit", "abort", "delete", "list")
_SECONDS = {op: metrics.STORAGE_SECONDS.labels(op) for op in _OPS}


def _failed(op: str, exc: BaseException) -> None:
    code = exc.code.name if isinstance(exc, LinkedBlobError) else "INTERNAL"
    metrics.STORAGE_ERRORS.labels(op, code).inc()


async def _timed(op: str, operation: Awaitable[T]) -> T:
    started = perf_counter()
    try:
        return await operation
    except Exception as exc:
        _failed(op, exc)
        raise
    finally:
        _SECONDS[op].observe(perf_counter() - started)


class MeteredBlobStore(BlobStore):
    async def stat(self, digest: Digest) -> int:
        return await _timed("stat", super().stat(digest))

    async def find_missing(self, digests: list[Digest]) -> list[Digest]:
        return await _timed("find_missing", super().find_missing(digests))

    async def read(self, digest: Digest, offset: int, limit: int) -> AsyncIterator[bytes]:
        started = perf_counter()
        read = 0
        try:
            async for chunk in super().read(digest, offset, limit):
                read += len(chunk)
                yield chunk
        except Exception as exc:
            _failed("read", exc)
            raise
        finally:
            _SECONDS["read"].observe(perf_counter() - started)
            metrics.STORAGE_BYTES_READ.inc(read)

    async def put(self, data: bytes, expected: Digest | None) -> Committed:
        committed = await _timed("put", super().put(data, expected))
        metrics.STORAGE_BYTES_WRITTEN.inc(len(data))
        return committed

    async def write(
        self,
        upload_id: str,
        offset: int,
        algorithm: str,
        chunks: Any,
        commit: CommitSpec | None = None,
        staged_digest: bool = False,
        *,
        create: bool = True,
    ) -> WriteResult:
        result = await _timed(
            "write",
            super().write(
                upload_id, offset, algorithm, chunks, commit, staged_digest, create=create
            ),
        )
        metrics.STORAGE_BYTES_WRITTEN.inc(max(0, result.size - offset))
        return result

    async def commit(self, upload_id: str, spec: CommitSpec) -> Committed:
        return await _timed("commit", super().commit(upload_id, spec))

    async def abort(self, upload_id: str) -> None:
        await _timed("abort", super().abort(upload_id))

    async def delete(self, digest: Digest) -> bool:
        return await _timed("delete", super().delete(digest))

    async def list(self, page_size: int, page_token: str) -> tuple[list[tuple[Digest, int]], str]:
        return await _timed("list", super().list(page_size, page_token))

"""Benchmark payloads: distinct blobs cut from one random buffer, streamed in chunks.

Random data is generated once per run (the client may hold one buffer of the largest blob
size); every blob is a fresh 32-byte nonce followed by a prefix of that buffer, so no two blobs
share a digest and no store can short-circuit a push as a duplicate.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass

NONCE_BYTES = 32


class Payload:
    """The run's random buffer, and a factory of distinct blobs of up to its size."""

    def __init__(self, max_size: int) -> None:
        if max_size < NONCE_BYTES:
            raise ValueError(f"payload must be at least {NONCE_BYTES} bytes")
        self.max_size = max_size
        self._view = memoryview(os.urandom(max_size))
        self._serial = itertools.count()

    def blob(self, size: int) -> Blob:
        if not NONCE_BYTES <= size <= self.max_size:
            raise ValueError(f"blob size {size} outside {NONCE_BYTES}..{self.max_size}")
        nonce = next(self._serial).to_bytes(8, "big") + os.urandom(NONCE_BYTES - 8)
        body = self._view[:size]
        hasher = hashlib.sha256(nonce)
        hasher.update(body[NONCE_BYTES:])
        return Blob(nonce, body, "sha256:" + hasher.hexdigest())


@dataclass(frozen=True)
class Blob:
    """A blob's bytes are ``nonce + body[NONCE_BYTES:]``; nothing here copies the whole blob."""

    nonce: bytes
    body: memoryview
    digest: str

    @property
    def size(self) -> int:
        return len(self.body)

    def chunks(self, chunk_bytes: int, start: int = 0, stop: int | None = None) -> Iterator[bytes]:
        """The bytes of [start, stop) as ``bytes`` pieces of at most ``chunk_bytes``."""
        for piece in self.views(chunk_bytes, start, stop):
            yield bytes(piece)

    def views(
        self, chunk_bytes: int, start: int = 0, stop: int | None = None
    ) -> Iterator[bytes | memoryview]:
        """Like :meth:`chunks`, without copying (memoryviews) except around the nonce."""
        stop = self.size if stop is None else stop
        for offset in range(start, stop, chunk_bytes):
            end = min(offset + chunk_bytes, stop)
            if offset < NONCE_BYTES:
                yield self.nonce[offset:end] + bytes(self.body[NONCE_BYTES:end])
            else:
                yield self.body[offset:end]

    def data(self) -> bytes:
        """The whole blob as bytes: for small blobs only."""
        return self.nonce + bytes(self.body[NONCE_BYTES:])

    def reader(self) -> io.BufferedReader:
        """A binary file object over the blob, for clients that read from files."""
        return io.BufferedReader(_BlobReader(self), buffer_size=1024 * 1024)


class _BlobReader(io.RawIOBase):
    def __init__(self, blob: Blob) -> None:
        self._blob = blob
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._blob.size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        out = memoryview(buffer).cast("B")
        n = min(len(out), self._blob.size - self._pos)
        if n <= 0:
            return 0
        filled = 0
        for piece in self._blob.views(n, self._pos, self._pos + n):
            out[filled : filled + len(piece)] = piece
            filled += len(piece)
        self._pos += n
        return n

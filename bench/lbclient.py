"""linkedblob's side of the client: the project's own ``linkedblob.client.Client``.

Pushes hand it the blob as an iterable of memoryviews (no copies; it frames them as data
messages itself) with the digest declared, as the registry client declares it; pulls go to a
sink that discards the bytes after the client has verified them; the resumable push uses its
step-by-step upload calls, one write stream per chunk, as the registry gets one PATCH per chunk.

The client takes the direct path that ``linkedblob up`` offers (as the registry's clients follow
its redirects to storage): pulls read from blobsvc after LocateBlob, pushes and the resumable
upload's chunks are written to blobsvc under the gateway's grant and committed through the
gateway. Stat, mount and small pushes are gateway calls. ``python -m bench --relay`` turns the
direct path off, so the bytes cross the gateway's relay too (what callers without a route to
blobsvc get).
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable
from typing import IO, cast

from bench.payload import Blob
from bench.systems import BenchError
from linkedblob.client import Client, Descriptor
from linkedblob.config import STREAM_CHUNK_BYTES

# Set by ``python -m bench --relay``: the client does not take the direct path.
RELAY_ENV = "LINKEDBLOB_BENCH_RELAY"


def relayed() -> bool:
    return os.environ.get(RELAY_ENV) == "1"


def client_note() -> str:
    path = "relayed by the gateway (--relay)" if relayed() else "direct to blobsvc when offered"
    return f"linkedblob.client.Client (sync grpc, one channel each), 1 MiB data messages, {path}"


class _Discard(io.RawIOBase):
    """A destination that drops what it is given (the client verifies before writing)."""

    def writable(self) -> bool:
        return True

    def write(self, data: object) -> int:  # type: ignore[override]
        return memoryview(data).nbytes  # type: ignore[arg-type]


class LinkedblobClient:
    def __init__(self, address: str) -> None:
        self.direct = not relayed()
        self.client = Client(address, timeout=120, direct=self.direct, malloc_tuning=True)
        self._sink = cast(IO[bytes], _Discard())

    def close(self) -> None:
        self.client.close()

    def push(self, repository: str, blob: Blob) -> None:
        # Iterable[bytes] in the client's signature; it takes any buffer (memoryview(item)).
        pieces = cast(Iterable[bytes], blob.views(STREAM_CHUNK_BYTES))
        _check(self.client.push(repository, pieces, digest=blob.digest), blob)

    def push_chunked(self, repository: str, blob: Blob, chunk_bytes: int) -> None:
        upload = self.client.start_upload(repository, direct=self.direct)
        for start in range(0, blob.size, chunk_bytes):
            stop = min(start + chunk_bytes, blob.size)
            pieces = blob.views(STREAM_CHUNK_BYTES, start, stop)
            upload = self.client.append(upload, start, pieces)
            if upload.offset != stop:
                raise BenchError(f"linkedblob upload write: offset {upload.offset}, want {stop}")
        _check(self.client.commit_upload(repository, upload.id, blob.digest), blob)

    def pull_verified(self, repository: str, digest: str, size: int) -> None:
        desc = self.client.pull(repository, digest, self._sink)  # raises unless verified
        if desc.size != size:
            raise BenchError(f"linkedblob pull {digest}: {desc.size} bytes, expected {size}")

    def stat(self, repository: str, digest: str) -> None:
        self.client.stat(repository, digest)

    def mount(self, repository: str, from_repository: str, digest: str) -> None:
        self.client.mount(repository, digest, from_repository=from_repository)

    def push_small(self, repository: str, blob: Blob) -> None:
        _check(self.client.put(repository, blob.data(), digest=blob.digest), blob)


def _check(descriptor: Descriptor, blob: Blob) -> None:
    if descriptor.digest != blob.digest or descriptor.size != blob.size:
        raise BenchError(
            f"linkedblob stored {descriptor.digest} ({descriptor.size} bytes), "
            f"expected {blob.digest} ({blob.size} bytes)"
        )

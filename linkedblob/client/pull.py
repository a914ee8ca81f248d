"""Pulls and verified reads: straight from blobsvc when the gateway offers direct access, else
ReadBlob through the gateway; the bytes are counted, and hashed when the read is whole, as they
arrive.

A verified read hashes as it receives, in the caller's thread (which also receives from
blobsvc: see linkedblob.client.direct.READ_IN_CALLER). Hashing in a worker thread fed through
a bounded queue was slower (measured: bench/README.md): on two cores blobsvc, grpc and the
hash already keep both busy, and the handoffs cost more than the overlap gains.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from pathlib import Path
from typing import IO

from linkedblob import wire
from linkedblob.client.channels import Gateway, end_read
from linkedblob.client.direct import DirectPath
from linkedblob.client.errors import DigestMismatchError, rpc_errors
from linkedblob.client.model import Chunks, Descriptor, Destination, Progress
from linkedblob.transport import READ_BLOB_DATA
from linkedblob.v1 import registry_pb2


class Verifier:
    """Checks the bytes of a read: the exact count, and the digest when the read is whole."""

    def __init__(self, desc: Descriptor, digest: str, offset: int, length: int) -> None:
        self.digest = desc.digest or digest
        available = max(desc.size - offset, 0)
        self.expected = available if length == 0 else min(length, available)
        self.received = 0
        whole = offset == 0 and self.expected == desc.size
        algorithm = self.digest.partition(":")[0]
        self.hasher = hashlib.new(algorithm) if whole and algorithm else None

    def update(self, chunk: memoryview) -> None:
        self.received += len(chunk)
        if self.hasher is not None:
            self.hasher.update(chunk)

    def finish(self) -> None:
        if self.received != self.expected:
            raise DigestMismatchError(
                f"received {self.received} bytes of {self.digest}, expected {self.expected}"
            )
        if self.hasher is not None:
            got = f"{self.hasher.name}:{self.hasher.hexdigest()}"
            if got != self.digest:
                raise DigestMismatchError(f"received bytes hash to {got}, not {self.digest}")


class Puller:
    """Reads blobs through ``direct`` when it is wanted and offered, else through ``gateway``."""

    def __init__(self, gateway: Gateway, direct: DirectPath) -> None:
        self.gateway = gateway
        self.direct = direct

    def get(self, repository: str, digest: str, offset: int, length: int) -> bytes:
        parts: list[memoryview] = []  # views into the received messages: one copy, the join
        desc, chunks = self._open(repository, digest, offset, length)
        check = Verifier(desc, digest, offset, length)
        with rpc_errors(), contextlib.closing(chunks):  # ends the read if this stops early
            for chunk in chunks:
                check.update(chunk)
                parts.append(chunk)
        check.finish()
        return b"".join(parts)

    def pull(
        self,
        repository: str,
        digest: str,
        dest: Destination,
        offset: int,
        length: int,
        progress: Progress | None,
    ) -> Descriptor:
        desc, chunks = self._open(repository, digest, offset, length)
        check = Verifier(desc, digest, offset, length)
        # Closed at once when this stops early (a failed open or write, a progress callback
        # that raises): that ends the read, which the exception's traceback would keep open.
        with contextlib.closing(chunks):
            if isinstance(dest, (str, os.PathLike)):
                path = Path(dest)
                part = path.with_name(f".{path.name}.part-{os.getpid()}-{threading.get_ident()}")
                try:
                    with open(part, "wb") as out:
                        _copy(chunks, out, check, progress)
                    os.replace(part, path)
                finally:
                    part.unlink(missing_ok=True)
            else:
                _copy(chunks, dest, check, progress)
        return desc

    def _open(
        self, repository: str, digest: str, offset: int, length: int
    ) -> tuple[Descriptor, Chunks]:
        """Opens a read: the descriptor, then the data as views into the received messages
        (no copies). Straight from blobsvc when the gateway offers it, else through it."""
        if self.direct.wanted():
            opened = self.direct.open_read(repository, digest, offset, length)
            if opened is not None:
                return opened
        return self._open_gateway(repository, digest, offset, length)

    def _open_gateway(
        self, repository: str, digest: str, offset: int, length: int
    ) -> tuple[Descriptor, Chunks]:
        """Opens ReadBlob: the descriptor (from the first message), then the data."""
        stream = self.gateway.read_blob(
            registry_pb2.ReadBlobRequest(
                repository=repository, digest=digest, offset=offset, length=length
            )
        )
        with rpc_errors():
            first = registry_pb2.ReadBlobResponse.FromString(next(iter(stream)))
        desc = Descriptor.from_proto(first.blob)

        def data() -> Chunks:
            try:
                if first.data:
                    yield memoryview(first.data)
                for raw in stream:
                    view = wire.data_payload(raw, READ_BLOB_DATA)
                    if view is None:
                        view = memoryview(registry_pb2.ReadBlobResponse.FromString(raw).data)
                    yield view
            finally:
                end_read(stream)

        return desc, data()


def _copy(chunks: Chunks, out: IO[bytes], check: Verifier, progress: Progress | None) -> None:
    with rpc_errors():
        for chunk in chunks:
            check.update(chunk)
            out.write(chunk)
            if progress:
                progress(len(chunk))
    check.finish()

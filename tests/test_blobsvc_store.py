"""blobsvc's domain logic (blobsvc.store) on the memory driver: when the running hash is
trusted at commit, and when the staged bytes are read again instead."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from blobsvc.storage import BlobReader, StagedUpload
from blobsvc.storage.filesystem import FilesystemStorage
from blobsvc.storage.forwarding import ForwardingStagedUpload, ForwardingStorage
from blobsvc.storage.memory import MemoryStorage
from blobsvc.store import BlobStore, CommitSpec
from linkedblob.config import STREAM_CHUNK_BYTES
from linkedblob.digests import Digest
from linkedblob.errors import LinkedBlobError, Reason


async def chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


def digest(data: bytes) -> Digest:
    return Digest("sha256", hashlib.sha256(data).hexdigest())


def rehashes(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.upload_id for r in caplog.records if r.getMessage() == "re-hashing staged bytes"]  # type: ignore[attr-defined]


def test_hash_states_are_bounded_and_the_forgotten_rehash(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="blobsvc.store")

    async def scenario() -> None:
        store = BlobStore(MemoryStorage(), io_threads=2, max_hash_states=2)
        try:
            for name in ("a", "b", "c"):  # "a"'s running hash is dropped for "c"'s
                await store.write(name, 0, "sha256", chunks(name.encode() * 100))
            for name in ("b", "c", "a"):
                committed = await store.commit(name, CommitSpec(digest(name.encode() * 100)))
                assert committed.size == 100
        finally:
            await store.close()

    asyncio.run(scenario())
    assert rehashes(caplog) == ["a"]


def test_a_replica_writing_in_between_makes_the_hash_stale(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Two stores on one storage stand for two replicas: a's running hash covers only its
    own bytes, so its commit must not trust it."""
    caplog.set_level(logging.INFO, logger="blobsvc.store")

    async def scenario() -> None:
        shared = MemoryStorage()
        a, b = BlobStore(shared, io_threads=2), BlobStore(shared, io_threads=2)
        try:
            await a.write("u", 0, "sha256", chunks(b"first "))
            # b has no state for "u": its staged digest re-reads the bytes (and keeps the hash)
            written = await b.write("u", 6, "sha256", chunks(b"second"), staged_digest=True)
            assert written.staged_digest == digest(b"first second")
            # a's hash is stale: not extended; its staged digest re-reads (and keeps the hash)
            written = await a.write("u", 12, "sha256", chunks(b" third"), staged_digest=True)
            assert written.staged_digest == digest(b"first second third")
            committed = await a.commit("u", CommitSpec(digest(b"first second third")))
            assert committed.size == 18  # from the hash kept: no re-read
            # an upload aborted and started again elsewhere is a new generation
            await a.write("v", 0, "sha256", chunks(b"old"))
            await b.abort("v")
            await b.write("v", 0, "sha256", chunks(b"new"))
            committed = await a.commit("v", CommitSpec())
            assert committed.digest == digest(b"new")
        finally:
            await a.close()
            await b.close()

    asyncio.run(scenario())
    assert rehashes(caplog) == ["u", "u", "v"]


class _CutShortOnSecondRead(ForwardingStorage):
    """Truncates a blob's file to ``cut`` bytes just before its second chunk is read, in the
    reading thread: with one I/O thread no read is in flight at that moment (a truncate that
    races a read in flight may hand that read zeroes: the kernel's doing, not blobsvc's)."""

    def __init__(self, base: FilesystemStorage, cut: int) -> None:
        super().__init__(base)
        self.filesystem = base
        self.cut = cut

    def open_blob(self, digest: Digest) -> BlobReader | None:
        reader = self.base.open_blob(digest)
        if reader is None:
            return None
        path = self.filesystem.blob_path(digest)
        cut = self.cut

        class Reader:
            size = reader.size

            def read_at(self, offset: int, length: int) -> bytes:
                if offset > 0 and os.stat(path).st_size > cut:
                    os.truncate(path, cut)
                return reader.read_at(offset, length)

            def close(self) -> None:
                reader.close()

        return Reader()


@pytest.mark.parametrize("cut", [1, STREAM_CHUNK_BYTES + 5, 3 * STREAM_CHUNK_BYTES - 1])
def test_a_blob_cut_short_on_disk_is_data_loss(tmp_path: Path, cut: int) -> None:
    """A stored blob whose file lost bytes after it was opened (chunks are read ahead at fixed
    offsets, so a short one would leave a gap) ends the read with DATA_LOSS, never with fewer or
    shifted bytes."""
    data = os.urandom(8 * STREAM_CHUNK_BYTES + 17)  # more than is read ahead before the cut

    async def scenario() -> None:
        storage = _CutShortOnSecondRead(FilesystemStorage(str(tmp_path)), cut)
        store = BlobStore(storage, io_threads=1)
        try:
            blob = await store.put(data, None)
            received = bytearray()
            with pytest.raises(LinkedBlobError) as err:
                async for chunk in store.read(blob.digest, 0, 0):
                    received += chunk
            assert err.value.reason == Reason.INTERNAL
            assert err.value.code.name == "DATA_LOSS"
            assert bytes(received) == data[: len(received)]  # what was sent was right
            assert len(received) <= max(cut, STREAM_CHUNK_BYTES)
        finally:
            await store.close()

    asyncio.run(scenario())


def test_read_ahead_shares_one_budget() -> None:
    """Each Read has one chunk read ahead; more only from a budget all reads share: many open
    reads never hold more than it, and every way a read ends gives back what it took."""
    data = os.urandom(6 * STREAM_CHUNK_BYTES + 1)

    async def scenario() -> None:
        full = 3 * STREAM_CHUNK_BYTES
        store = BlobStore(MemoryStorage(), io_threads=4, read_ahead_budget_bytes=full)
        assert store._read_ahead_budget == full
        try:
            blob = await store.put(data, None)
            reads = [store.read(blob.digest, 0, 0) for _ in range(5)]
            for reading in reads:  # all five open, each one chunk in
                assert await anext(reading) == data[:STREAM_CHUNK_BYTES]
                assert 0 <= store._read_ahead_budget <= full
            assert store._read_ahead_budget < full  # taken, and not beyond it
            received = bytearray(data[:STREAM_CHUNK_BYTES])
            async for chunk in reads[0]:  # read to the end
                received += chunk
            assert bytes(received) == data
            await reads[1].aclose()  # abandoned
            with pytest.raises(LinkedBlobError):  # ended by an error (a bad range)
                await anext(store.read(blob.digest, len(data) + 1, 0))
            for reading in reads[2:]:
                await reading.aclose()
            assert store._read_ahead_budget == full
        finally:
            await store.close()

    asyncio.run(scenario())


def test_read_ahead_is_a_parameter() -> None:
    """With ``read_ahead=1`` a Read keeps only its own chunk ahead: it never borrows from the
    shared budget, and still reads every byte."""
    data = os.urandom(4 * STREAM_CHUNK_BYTES + 3)

    async def scenario() -> None:
        budget = 2 * STREAM_CHUNK_BYTES
        store = BlobStore(
            MemoryStorage(), io_threads=4, read_ahead=1, read_ahead_budget_bytes=budget
        )
        try:
            blob = await store.put(data, None)
            received = bytearray()
            async for chunk in store.read(blob.digest, 0, 0):
                received += chunk
                assert store._read_ahead_budget == budget
            assert bytes(received) == data
        finally:
            await store.close()

    asyncio.run(scenario())


class _ShortStagedReads(ForwardingStorage):
    """Staged bytes that read back shorter than the upload's size (damage under the lock)."""

    def open_upload(self, upload_id: str, create_with: str | None = None) -> StagedUpload | None:
        upload = self.base.open_upload(upload_id, create_with)
        if upload is None:
            return None

        class Short(ForwardingStagedUpload):
            def read_at(self, offset: int, length: int) -> bytes:
                return self.base.read_at(offset, length)[:-1]

        return Short(upload)


def test_staged_bytes_read_short_are_data_loss_not_a_digest() -> None:
    """When the staged bytes must be re-read (another store wrote them) and they end early,
    neither the staged digest nor a commit answers a digest of fewer bytes."""

    async def scenario() -> None:
        shared = _ShortStagedReads(MemoryStorage())
        a, b = BlobStore(shared, io_threads=2), BlobStore(shared, io_threads=2)
        try:
            written = await a.write("u", 0, "sha256", chunks(b"first "), staged_digest=True)
            assert written.staged_digest == digest(b"first ")  # a's running hash: no read
            for call in (
                b.write("u", 6, "sha256", chunks(b"second"), staged_digest=True),
                b.commit("u", CommitSpec()),
            ):
                with pytest.raises(LinkedBlobError) as err:
                    await call
                assert err.value.code.name == "DATA_LOSS"
            assert shared.list("", 10) == []
        finally:
            await a.close()
            await b.close()

    asyncio.run(scenario())

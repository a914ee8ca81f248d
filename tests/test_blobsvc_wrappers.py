"""The storage wrappers, each on its own over the memory driver: the empty blob
(blobsvc.storage.empty_blob) and the metrics (blobsvc.storage.metrics), and their order in
the stack blobsvc runs. (The contract suite runs against the stack too:
tests/test_blobsvc_storage.py.)"""

from __future__ import annotations

import os
import uuid

import pytest
from prometheus_client import REGISTRY

from blobsvc.storage import with_wrappers
from blobsvc.storage.empty_blob import EmptyBlobStorage
from blobsvc.storage.memory import MemoryBlobReader, MemoryStorage
from blobsvc.storage.metrics import MetricsStorage
from linkedblob.digests import EMPTY, Digest


def d256(data: bytes) -> Digest:
    return Digest.of(data, "sha256")


class RecordingStorage(MemoryStorage):
    """The memory driver, recording the digests it is asked about."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[Digest] = []

    def stat(self, digest: Digest) -> int | None:
        self.asked.append(digest)
        return super().stat(digest)

    def open_blob(self, digest: Digest) -> MemoryBlobReader | None:
        self.asked.append(digest)
        return super().open_blob(digest)

    def put(self, digest: Digest, data: bytes) -> bool:
        self.asked.append(digest)
        return super().put(digest, data)


@pytest.mark.parametrize("algorithm", ["sha256", "sha512"])
def test_the_empty_blob_is_answered_without_the_driver(algorithm: str) -> None:
    base = RecordingStorage()
    storage = EmptyBlobStorage(base)
    empty = EMPTY[algorithm]
    assert storage.stat(empty) == 0
    reader = storage.open_blob(empty)
    assert reader is not None
    assert (reader.size, reader.read_at(0, 10)) == (0, b"")
    reader.close()
    assert storage.put(empty, b"") is True  # already there
    assert base.asked == [] and base.blobs == {}
    # not stored, so neither listed nor deletable; and still present after a delete
    assert storage.list("", 10) == []
    assert storage.delete(empty) is False
    assert storage.stat(empty) == 0


def test_a_committed_empty_upload_is_dropped_not_stored() -> None:
    base = MemoryStorage()
    storage = EmptyBlobStorage(base)
    upload = storage.open_upload("u", "sha512")
    assert upload is not None
    try:
        assert (upload.upload_id, upload.algorithm, upload.size) == ("u", "sha512", 0)
        assert upload.store_as(EMPTY["sha512"]) is True
    finally:
        upload.close()
    assert storage.upload_size("u") is None and base.uploads == {}
    assert base.blobs == {}


def test_other_blobs_go_to_the_driver() -> None:
    base = RecordingStorage()
    storage = EmptyBlobStorage(base)
    data = b"not empty"
    assert storage.stat(d256(data)) is None
    assert storage.put(d256(data), data) is False
    assert storage.stat(d256(data)) == len(data)
    upload = storage.open_upload("u", "sha256")
    assert upload is not None
    upload.append(b"staged")
    assert upload.store_as(d256(b"staged")) is False
    upload.close()
    assert base.blobs == {str(d256(data)): data, str(d256(b"staged")): b"staged"}
    assert base.asked == [d256(data)] * 3


def sample(name: str, driver: str, action: str) -> float | None:
    return REGISTRY.get_sample_value(name, {"driver": driver, "action": action})


def count(driver: str, action: str) -> float | None:
    return sample("linkedblob_storage_action_seconds_count", driver, action)


def seconds(driver: str, action: str) -> float | None:
    return sample("linkedblob_storage_action_seconds_sum", driver, action)


def moved(driver: str, action: str) -> float | None:
    return sample("linkedblob_storage_bytes_total", driver, action)


@pytest.fixture
def driver() -> str:
    """A driver label of this test's own, so other tests' observations do not count."""
    return f"test-{uuid.uuid4().hex[:8]}"


def test_every_action_is_observed_per_call(driver: str) -> None:
    storage = MetricsStorage(MemoryStorage(), driver)
    # the children exist from the start (looked up once, in the constructor)
    assert count(driver, "put") == 0 and moved(driver, "put") == 0
    data = os.urandom(3000)
    storage.put(d256(data), data)
    storage.put(d256(data), data)
    storage.stat(d256(data))
    storage.list("", 10)
    storage.upload_size("u")
    storage.delete(d256(data))
    for action, calls in [
        ("put", 2),
        ("stat", 1),
        ("list", 1),
        ("upload_size", 1),
        ("delete", 1),
        ("open", 0),
    ]:
        assert count(driver, action) == calls, action
    assert moved(driver, "put") == 2 * len(data)
    assert (seconds(driver, "put") or 0) > 0


def test_a_read_is_observed_once_when_it_closes(driver: str) -> None:
    storage = MetricsStorage(MemoryStorage(), driver)
    data = os.urandom(10_000)
    storage.put(d256(data), data)
    reader = storage.open_blob(d256(data))
    assert reader is not None
    assert storage.open_blob(d256(b"absent")) is None
    assert count(driver, "open") == 2
    assert reader.read_at(0, 4000) + reader.read_at(4000, 4000) + reader.read_at(8000, 4000) == data
    assert count(driver, "read") == 0  # not per chunk
    reader.close()
    assert count(driver, "read") == 1
    assert moved(driver, "read") == len(data)
    assert (seconds(driver, "read") or 0) > 0


def test_an_upload_is_observed_per_stream(driver: str) -> None:
    storage = MetricsStorage(MemoryStorage(), driver)
    upload = storage.open_upload("u", "sha256")
    assert upload is not None
    upload.append(b"x" * 1000)
    upload.append(memoryview(b"y" * 24))
    assert upload.read_at(0, 5000) == b"x" * 1000 + b"y" * 24
    assert upload.store_as(d256(b"x" * 1000 + b"y" * 24)) is False
    assert (count(driver, "append"), count(driver, "store")) == (0, 1)
    upload.close()
    assert (count(driver, "append"), moved(driver, "append")) == (1, 1024)
    assert (count(driver, "read_staged"), moved(driver, "read_staged")) == (1, 1024)
    assert count(driver, "open_upload") == 1
    # an upload held and let go without writing observes no append
    again = storage.open_upload("v", "sha256")
    assert again is not None
    again.discard()
    again.close()
    assert (count(driver, "append"), count(driver, "discard"), count(driver, "open_upload")) == (
        1,
        1,
        2,
    )


def test_the_stack_counts_only_what_reaches_the_driver(driver: str) -> None:
    """The empty blob is answered outside the metrics: it costs the driver nothing."""
    storage = with_wrappers(MemoryStorage(), driver)
    storage.put(EMPTY["sha256"], b"")
    storage.stat(EMPTY["sha256"])
    assert (count(driver, "put"), count(driver, "stat")) == (0, 0)
    storage.put(d256(b"a"), b"a")
    assert (count(driver, "put"), moved(driver, "put")) == (1, 1)

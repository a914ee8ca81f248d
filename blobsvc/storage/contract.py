"""The storage contract: what every driver promises (blobsvc.storage.Storage), as a test suite
that takes a driver factory, as distribution's ``testsuites.Driver(t, constructor)``. A driver
(or a stack of wrappers) is tested by one line in a pytest module::

    TestMemory = storage_contract(lambda root: MemoryStorage())

pytest collects the class by that name. The suite is plain asserts with no pytest import, so it
can live in the package, where a driver outside this repository (S3, ...) can import it; tests/
is not installed. Each test opens the driver on a fresh empty directory, which a driver that
keeps no files may ignore.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial

import grpc

from blobsvc.storage import Storage
from linkedblob.digests import Digest
from linkedblob.errors import LinkedBlobError, Reason

# A driver on an empty directory.
Factory = Callable[[str], Storage]
# Checks a directory after its driver was closed (e.g. that no temporary file was left).
AfterClose = Callable[[str], None]

MALFORMED_UPLOAD_IDS = ["", "..", "../x", "a/b", "x" * 129, "a.b", "é"]


def storage_contract(factory: Factory, after_close: AfterClose | None = None) -> type:
    """The contract's tests run against the drivers ``factory`` makes; ``after_close`` checks
    each directory once its driver is closed."""
    return type(
        "StorageContract",
        (StorageContract,),
        {"factory": staticmethod(factory), "after_close": staticmethod(after_close or _nothing)},
    )


def _nothing(root: str) -> None:
    pass


def d256(data: bytes) -> Digest:
    return Digest("sha256", hashlib.sha256(data).hexdigest())


def d512(data: bytes) -> Digest:
    return Digest("sha512", hashlib.sha512(data).hexdigest())


def _refused(code: grpc.StatusCode, call: Callable[[], object], what: object = "") -> None:
    """Asserts that ``call`` raises a LinkedBlobError with ``code`` and BLOB_UPLOAD_INVALID."""
    try:
        call()
    except LinkedBlobError as exc:
        assert (exc.code, exc.reason) == (code, Reason.BLOB_UPLOAD_INVALID), (what, exc)
    else:
        raise AssertionError(f"{what!r}: no {code.name} raised")


class StorageContract:
    """The tests (subclassed by storage_contract with a factory)."""

    factory: Factory
    after_close: AfterClose

    @contextlib.contextmanager
    def storage(self) -> Iterator[Storage]:
        with tempfile.TemporaryDirectory(prefix="storage-contract-") as root:
            driver = self.factory(root)
            try:
                yield driver
            finally:
                driver.close()
            self.after_close(root)

    def test_absent_blob(self) -> None:
        with self.storage() as storage:
            assert storage.stat(d256(b"nope")) is None
            assert storage.open_blob(d256(b"nope")) is None
            assert storage.delete(d256(b"nope")) is False
            assert storage.list("", 10) == []

    def test_put_stat_read_delete(self) -> None:
        with self.storage() as storage:
            data = os.urandom(5000)
            assert storage.put(d256(data), data) is False
            assert storage.put(d256(data), data) is True
            assert storage.stat(d256(data)) == 5000
            reader = storage.open_blob(d256(data))
            assert reader is not None
            try:
                assert reader.size == 5000
                assert reader.read_at(0, 10) == data[:10]
                assert reader.read_at(4990, 100) == data[4990:]
                assert reader.read_at(5000, 100) == b""
                # a reader stays valid when the blob is deleted meanwhile
                assert storage.delete(d256(data)) is True
                assert reader.read_at(100, 200) == data[100:300]
            finally:
                reader.close()
            assert storage.stat(d256(data)) is None

    def test_list_in_digest_order_from_a_cursor(self) -> None:
        with self.storage() as storage:
            blobs = {d256(bytes([i])): i + 1 for i in range(40)}
            blobs |= {d512(bytes([i])): i + 1 for i in range(5)}
            for digest, size in blobs.items():
                storage.put(digest, b"x" * size)
            everything = storage.list("", 1000)
            assert [str(d) for d, _ in everything] == sorted(str(d) for d in blobs)
            assert {d: size for d, size in everything} == blobs
            # paging by cursor: the last digest of a page
            paged: list[tuple[Digest, int]] = []
            after = ""
            while page := storage.list(after, 7):
                assert len(page) <= 7
                paged.extend(page)
                after = str(page[-1][0])
            assert paged == everything
            middle = str(everything[20][0])
            assert storage.list(middle, 3) == everything[21:24]

    def test_new_upload_append_and_status(self) -> None:
        with self.storage() as storage:
            assert storage.upload_size("up1") is None
            assert storage.open_upload("up1") is None  # unknown and not created
            upload = storage.open_upload("up1", "sha512")
            assert upload is not None
            try:
                assert (upload.upload_id, upload.algorithm, upload.size) == ("up1", "sha512", 0)
                upload.append(b"hello ")
                upload.append(memoryview(b"world"))
                assert upload.size == 11
                assert storage.upload_size("up1") == 11
                assert upload.read_at(0, 5) == b"hello"
                assert upload.read_at(6, 100) == b"world"
            finally:
                upload.close()
            again = storage.open_upload("up1", "sha256")  # exists: keeps its algorithm and bytes
            assert again is not None
            try:
                assert (again.algorithm, again.size) == ("sha512", 11)
            finally:
                again.close()

    def test_an_upload_has_one_holder(self) -> None:
        with self.storage() as storage:
            upload = storage.open_upload("held", "sha256")
            assert upload is not None
            _refused(grpc.StatusCode.ABORTED, lambda: storage.open_upload("held"))
            upload.close()
            reopened = storage.open_upload("held")
            assert reopened is not None
            reopened.close()

    def test_store_as_moves_the_bytes_and_ends_the_upload(self) -> None:
        with self.storage() as storage:
            data = os.urandom(3000)
            upload = storage.open_upload("s1", "sha256")
            assert upload is not None
            try:
                upload.append(data)
                assert upload.store_as(d256(data)) is False
            finally:
                upload.close()
            assert storage.upload_size("s1") is None
            assert storage.stat(d256(data)) == 3000
            reader = storage.open_blob(d256(data))
            assert reader is not None
            assert reader.read_at(0, 5000) == data
            reader.close()
            # a second copy of the same blob is just dropped
            second = storage.open_upload("s2", "sha256")
            assert second is not None
            second.append(data)
            assert second.store_as(d256(data)) is True
            second.close()
            assert storage.upload_size("s2") is None
            assert [d for d, _ in storage.list("", 10)] == [d256(data)]

    def test_discard_and_start_again_is_a_new_generation(self) -> None:
        with self.storage() as storage:
            upload = storage.open_upload("gen", "sha256")
            assert upload is not None
            upload.append(b"abc")
            generation = upload.generation
            upload.discard()
            upload.close()
            assert storage.upload_size("gen") is None
            fresh = storage.open_upload("gen", "sha512")
            assert fresh is not None
            try:
                assert (fresh.size, fresh.algorithm) == (0, "sha512")
                assert fresh.generation != generation
            finally:
                fresh.close()
            kept = storage.open_upload("gen")
            assert kept is not None
            assert kept.generation != generation
            kept.close()

    def test_malformed_upload_ids(self) -> None:
        invalid = grpc.StatusCode.INVALID_ARGUMENT
        with self.storage() as storage:
            for upload_id in MALFORMED_UPLOAD_IDS:
                _refused(invalid, partial(storage.upload_size, upload_id), upload_id)
                _refused(invalid, partial(storage.open_upload, upload_id, "sha256"), upload_id)

    def test_concurrent_store_as_of_one_digest_keeps_one_copy(self) -> None:
        with self.storage() as storage:
            data = os.urandom(200_000)
            n = 8
            uploads = []
            for i in range(n):
                upload = storage.open_upload(f"c{i}", "sha256")
                assert upload is not None
                upload.append(data)
                uploads.append(upload)
            start = threading.Barrier(n)
            results: list[bool] = []

            def commit(i: int) -> None:
                start.wait()
                results.append(uploads[i].store_as(d256(data)))
                uploads[i].close()

            threads = [threading.Thread(target=commit, args=(i,)) for i in range(n)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert sorted(results) == [False] + [True] * (n - 1)
            assert storage.list("", 10) == [(d256(data), len(data))]
            assert all(storage.upload_size(f"c{i}") is None for i in range(n))

    def test_list_uploads_in_upload_id_order_with_sizes(self) -> None:
        with self.storage() as storage:
            assert storage.list_uploads("", 10) == []
            sizes = {f"l{i:02d}": i for i in range(12)} | {"L-x": 3, "l_z": 0}
            held = []
            before = time.time() - 1  # filesystem clocks may be coarser than time.time()
            for upload_id, size in sizes.items():
                upload = storage.open_upload(upload_id, "sha256")
                assert upload is not None
                upload.append(b"x" * size)
                held.append(upload)
            held[0].close()  # listed alike whether held or not
            everything = storage.list_uploads("", 1000)
            assert [u.upload_id for u in everything] == sorted(sizes)
            assert {u.upload_id: u.size for u in everything} == sizes
            assert all(before <= u.updated_at <= time.time() + 1 for u in everything)
            for info in everything:
                assert storage.upload_info(info.upload_id) == info
            paged = []
            after = ""
            while page := storage.list_uploads(after, 5):
                assert len(page) <= 5
                paged.extend(page)
                after = page[-1].upload_id
            assert paged == everything
            assert storage.list_uploads("l05", 2) == everything[7:9]
            for upload in held[1:]:
                upload.close()
            # committed and discarded uploads are no longer listed
            done = storage.open_upload("l03")
            assert done is not None
            done.store_as(d256(b"xxx"))
            done.close()
            dropped = storage.open_upload("l07")
            assert dropped is not None
            dropped.discard()
            dropped.close()
            listed = [u.upload_id for u in storage.list_uploads("", 1000)]
            assert listed == sorted(set(sizes) - {"l03", "l07"})
            assert storage.upload_info("l03") is None and storage.upload_info("l07") is None

    def test_an_uploads_last_write_moves_with_each_append(self) -> None:
        with self.storage() as storage:
            assert storage.upload_info("t1") is None
            upload = storage.open_upload("t1", "sha256")
            assert upload is not None
            try:
                created = storage.upload_info("t1")
                assert created is not None and created.size == 0
                time.sleep(0.05)  # beyond a coarse filesystem clock's tick
                upload.append(b"abc")
                written = storage.upload_info("t1")
                assert written is not None and written.size == 3
                assert written.updated_at > created.updated_at
                time.sleep(0.05)
                assert storage.upload_info("t1") == written  # reading does not move it
                upload.append(os.urandom(10_000))
                again = storage.upload_info("t1")
                assert again is not None and again.size == 10_003
                assert again.updated_at > written.updated_at
            finally:
                upload.close()
            reopened = storage.open_upload("t1")  # taking it back does not move it either
            assert reopened is not None
            reopened.close()
            assert storage.upload_info("t1") == again

    def test_upload_info_refuses_malformed_ids(self) -> None:
        with self.storage() as storage:
            for upload_id in MALFORMED_UPLOAD_IDS:
                _refused(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    partial(storage.upload_info, upload_id),
                    upload_id,
                )

"""The storage drivers' contract (blobsvc.storage), one suite run against every driver, directly
against the driver API; then what only the filesystem driver promises (layout, atomic
placement, exclusivity across processes)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from blobsvc.storage import Storage, open_storage
from blobsvc.storage.filesystem import FilesystemStorage
from linkedblob.digests import Digest
from linkedblob.errors import LinkedBlobError, Reason

# "filesystem-named": Put through named temporary files, as where O_TMPFILE is missing.
# "filesystem-buffered": staged bytes and reads through the page cache (--direct-io off).
DRIVERS = ["filesystem", "filesystem-named", "filesystem-buffered", "memory"]


@pytest.fixture(params=DRIVERS)
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Storage]:
    root = str(tmp_path / "root")
    if request.param == "filesystem-named":
        driver: Storage = FilesystemStorage(root, anonymous_files=False)
    elif request.param == "filesystem-buffered":
        driver = FilesystemStorage(root, direct_io=False)
    else:
        driver = open_storage(request.param, root)
    yield driver
    driver.close()
    if request.param.startswith("filesystem"):
        assert os.listdir(tmp_path / "root" / "tmp") == []  # no temporary file left behind


@pytest.fixture
def filesystems(tmp_path: Path) -> Iterator[Callable[..., FilesystemStorage]]:
    """Opens FilesystemStorage on tmp_path (as many as asked: replicas, restarts); closes them."""
    opened: list[FilesystemStorage] = []

    def open_(**kwargs: bool) -> FilesystemStorage:
        opened.append(FilesystemStorage(str(tmp_path), **kwargs))
        return opened[-1]

    yield open_
    for fs in opened:
        fs.close()


def d256(data: bytes) -> Digest:
    return Digest("sha256", hashlib.sha256(data).hexdigest())


def d512(data: bytes) -> Digest:
    return Digest("sha512", hashlib.sha512(data).hexdigest())


def test_absent_blob(storage: Storage) -> None:
    assert storage.stat(d256(b"nope")) is None
    assert storage.open_blob(d256(b"nope")) is None
    assert storage.delete(d256(b"nope")) is False
    assert storage.list("", 10) == []


def test_put_stat_read_delete(storage: Storage) -> None:
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


def test_list_in_digest_order_from_a_cursor(storage: Storage) -> None:
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


def test_new_upload_append_and_status(storage: Storage) -> None:
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


def test_an_upload_has_one_holder(storage: Storage) -> None:
    upload = storage.open_upload("held", "sha256")
    assert upload is not None
    with pytest.raises(LinkedBlobError) as excinfo:
        storage.open_upload("held")
    assert excinfo.value.code == grpc.StatusCode.ABORTED
    assert excinfo.value.reason == Reason.BLOB_UPLOAD_INVALID
    upload.close()
    reopened = storage.open_upload("held")
    assert reopened is not None
    reopened.close()


def test_store_as_moves_the_bytes_and_ends_the_upload(storage: Storage) -> None:
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


def test_discard_and_start_again_is_a_new_generation(storage: Storage) -> None:
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


@pytest.mark.parametrize("upload_id", ["", "..", "../x", "a/b", "x" * 129, "a.b", "é"])
def test_malformed_upload_ids(storage: Storage, upload_id: str) -> None:
    for call in (
        lambda: storage.upload_size(upload_id),
        lambda: storage.open_upload(upload_id, "sha256"),
    ):
        with pytest.raises(LinkedBlobError) as excinfo:
            call()
        assert excinfo.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert excinfo.value.reason == Reason.BLOB_UPLOAD_INVALID


def test_concurrent_store_as_of_one_digest_keeps_one_copy(storage: Storage) -> None:
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


# --- filesystem only ---------------------------------------------------------------------------


def test_filesystem_layout(tmp_path: Path, filesystems: Callable[..., FilesystemStorage]) -> None:
    fs = filesystems()
    data = b"layout"
    upload = fs.open_upload("lay", "sha256")
    assert upload is not None
    upload.append(data)
    assert (tmp_path / "uploads" / "lay" / "data").read_bytes() == data
    upload.store_as(d256(data))
    upload.close()
    hexpart = d256(data).hex
    blob = tmp_path / "blobs" / "sha256" / hexpart[:2] / hexpart
    assert blob.read_bytes() == data
    assert not (tmp_path / "uploads" / "lay").exists()
    fs.put(d512(data), data)
    assert (
        tmp_path / "blobs" / "sha512" / d512(data).hex[:2] / d512(data).hex
    ).read_bytes() == data
    assert list((tmp_path / "tmp").iterdir()) == []  # Put's temporary file is gone


def test_filesystem_list_ignores_strays(
    tmp_path: Path, filesystems: Callable[..., FilesystemStorage]
) -> None:
    fs = filesystems()
    fs.put(d256(b"a"), b"a")
    shard = tmp_path / "blobs" / "sha256" / d256(b"a").hex[:2]
    (shard / "not-a-digest").write_bytes(b"x")
    (shard / ("0" * 64)).write_bytes(b"x")  # wrong shard for its name
    (tmp_path / "blobs" / "md5").mkdir()
    assert fs.list("", 10) == [(d256(b"a"), 1)]


_HOLD_LOCK = """
import sys, time
from blobsvc.storage.filesystem import FilesystemStorage
upload = FilesystemStorage(sys.argv[1]).open_upload("shared", "sha256")
upload.append(b"from the other process")
print("held", flush=True)
sys.stdin.readline()
upload.close()
"""


def test_filesystem_upload_is_exclusive_across_processes(
    tmp_path: Path, filesystems: Callable[..., FilesystemStorage]
) -> None:
    """Two replicas on one root: the flock on the staging file refuses the second holder."""
    other = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert other.stdout is not None and other.stdin is not None
        assert other.stdout.readline().strip() == "held"
        fs = filesystems()
        with pytest.raises(LinkedBlobError) as excinfo:
            fs.open_upload("shared")
        assert excinfo.value.code == grpc.StatusCode.ABORTED
        assert fs.upload_size("shared") == len(b"from the other process")
        other.stdin.write("\n")
        other.stdin.flush()
        assert other.wait(10) == 0
        upload = fs.open_upload("shared")
        assert upload is not None
        assert upload.size == len(b"from the other process")
        upload.close()
    finally:
        other.kill()
        other.wait()


def test_filesystem_commit_after_the_holder_replaced_the_file(
    filesystems: Callable[..., FilesystemStorage],
) -> None:
    """A holder that commits (unlinking the staging file) must not leave a stale open file to
    the next holder: the next open sees the upload gone (or a new one), never the old inode."""
    a, b = filesystems(), filesystems()
    upload = a.open_upload("race", "sha256")
    assert upload is not None
    upload.append(b"abc")
    upload.store_as(d256(b"abc"))
    upload.close()
    assert b.open_upload("race") is None
    fresh = b.open_upload("race", "sha256")
    assert fresh is not None and fresh.size == 0
    fresh.close()


def test_filesystem_sweeps_old_temporary_files(
    tmp_path: Path, filesystems: Callable[..., FilesystemStorage]
) -> None:
    filesystems()
    old, recent = tmp_path / "tmp" / "put-old", tmp_path / "tmp" / "put-recent"
    old.write_bytes(b"left by a crash")
    recent.write_bytes(b"a replica's Put in progress")
    os.utime(old, (0, 0))
    filesystems()  # a restart
    assert not old.exists() and recent.exists()


def test_filesystem_puts_many_small_blobs_at_once(
    tmp_path: Path, filesystems: Callable[..., FilesystemStorage]
) -> None:
    """More concurrent Puts than files made ahead: each blob lands whole under its name, a
    second Put of it finds it, and no temporary file is left."""
    fs = filesystems()
    blobs = [os.urandom(4096) for _ in range(100)]
    with ThreadPoolExecutor(8) as pool:
        existed = list(pool.map(lambda data: fs.put(d256(data), data), blobs))
        again = list(pool.map(lambda data: fs.put(d256(data), data), blobs))
    assert not any(existed) and all(again)
    for data in blobs:
        hexpart = d256(data).hex
        assert (tmp_path / "blobs" / "sha256" / hexpart[:2] / hexpart).read_bytes() == data
    assert os.listdir(tmp_path / "tmp") == []


_PUT_THEN_HANG = """
import sys, time
from blobsvc.storage.filesystem import FilesystemStorage
from linkedblob.digests import Digest
fs = FilesystemStorage(sys.argv[1])
data = b"stored before the crash"
fs.put(Digest.of(data, "sha256"), data)
time.sleep(0.5)  # the files made ahead are there
print("ready", flush=True)
time.sleep(60)
"""


def test_filesystem_crash_leaves_no_temporary_files(tmp_path: Path) -> None:
    """The files Put makes ahead have no name: a killed process leaves nothing to sweep."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _PUT_THEN_HANG, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    finally:
        proc.kill()
        proc.wait()
    assert os.listdir(tmp_path / "tmp") == []
    stored = [p for p in (tmp_path / "blobs").rglob("*") if p.is_file()]
    assert [p.read_bytes() for p in stored] == [b"stored before the crash"]

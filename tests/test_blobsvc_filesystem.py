"""What only the filesystem driver promises, beyond the storage contract
(tests/test_blobsvc_storage.py): its layout, atomic placement, exclusivity across processes,
and no temporary file left behind."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from blobsvc.storage.filesystem import FilesystemStorage
from linkedblob.digests import Digest
from linkedblob.errors import LinkedBlobError


def d256(data: bytes) -> Digest:
    return Digest.of(data, "sha256")


def d512(data: bytes) -> Digest:
    return Digest.of(data, "sha512")


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
        # listing reads the staging file's metadata: it neither waits for nor needs the lock
        info = fs.upload_info("shared")
        assert info is not None and info.size == len(b"from the other process")
        assert fs.list_uploads("", 10) == [info]
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


def test_filesystem_lists_only_staging_areas(
    tmp_path: Path, filesystems: Callable[..., FilesystemStorage]
) -> None:
    """A directory without a data file (being created or removed), a stray file and a name
    outside the upload id grammar are not staging areas; the last write is the data file's
    mtime."""
    fs = filesystems()
    upload = fs.open_upload("real", "sha256")
    assert upload is not None
    upload.append(b"abc")
    upload.close()
    uploads = tmp_path / "uploads"
    (uploads / "empty-dir").mkdir()
    (uploads / "stray-file").write_bytes(b"x")
    (uploads / "not.an.id").mkdir()
    (uploads / "not.an.id" / "data").write_bytes(b"x")
    os.utime(uploads / "real" / "data", ns=(1_000_000_000_000, 1_234_567_890_123_456_789))
    listed = fs.list_uploads("", 100)
    assert [(u.upload_id, u.size) for u in listed] == [("real", 3)]
    assert listed[0].updated_at == 1_234_567_890.123456789
    assert fs.list_uploads("", 1) == listed  # a page is filled past the entries skipped
    assert fs.list_uploads("real", 1) == []
    assert fs.upload_info("empty-dir") is None
    assert not (uploads / "empty-dir").exists()  # what a crash left empty is tidied away

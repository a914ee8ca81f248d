"""The filesystem driver's direct I/O (blobsvc.storage.filesystem.direct_io): staged bytes go to
the disk with O_DIRECT in whole blocks, the partial last block through the page cache, so the
file always holds every accepted byte; reads come from the page cache only when the range is
all there. Checked against the files themselves (another open, another process), and against
the page cache (cachestat(2) counts the file's cached pages)."""

from __future__ import annotations

import hashlib
import logging
import os
import random
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from blobsvc.options import add_arguments
from blobsvc.storage.filesystem import FileStagedUpload, FilesystemStorage
from blobsvc.storage.filesystem.direct_io import cached_pages
from linkedblob.config import MiB
from linkedblob.digests import Digest

ODD_SIZES = [1, 4095, 4096, 4097, MiB + 3, 4 * MiB]


@pytest.fixture
def filesystems(tmp_path: Path) -> Iterator[Callable[..., FilesystemStorage]]:
    """Opens FilesystemStorage on tmp_path (or ``root``); closes them all afterwards."""
    opened: list[FilesystemStorage] = []

    def open_(root: Path = tmp_path, **kwargs: int) -> FilesystemStorage:
        opened.append(FilesystemStorage(str(root), **kwargs))
        return opened[-1]

    yield open_
    for fs in opened:
        fs.close()


def _filesystem_type(path: Path) -> str:
    """The type of the filesystem ``path`` is on (the longest mount point above it)."""
    best, kind = "", ""
    resolved = str(path.resolve())
    with open("/proc/self/mounts", encoding="utf-8") as mounts:
        for line in mounts:
            fields = line.split()
            point = fields[1]
            if (resolved == point or resolved.startswith(point.rstrip("/") + "/")) and len(
                point
            ) > len(best):
                best, kind = point, fields[2]
    return kind


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    """tmp_path, when it is on a filesystem with a page cache to bypass (not tmpfs)."""
    if _filesystem_type(tmp_path) in ("tmpfs", "ramfs"):
        pytest.skip("tmp_path is in memory: no page cache to bypass")
    return tmp_path


def _cached_pages(path: Path | str) -> int:
    """How many pages of the file are in the page cache (cachestat(2)). Not preadv with
    RWF_NOWAIT: its miss starts readahead, which on a loaded machine can finish before the
    call looks again, so the probe itself reports the page cached."""
    assert cached_pages is not None
    fd = os.open(path, os.O_RDONLY)
    try:
        return cached_pages(fd, 0, 0)  # length 0: to the end of the file
    finally:
        os.close(fd)


def _open(fs: FilesystemStorage, upload_id: str, create: bool = False) -> FileStagedUpload:
    upload = fs.open_upload(upload_id, "sha256" if create else None)
    assert upload is not None
    return upload


def _check_staged(fs: FilesystemStorage, upload: FileStagedUpload, expected: bytes) -> None:
    """The staged bytes, as every reader sees them: the upload's size, the driver's, the
    file's own size and bytes, and the upload's reads."""
    path = fs.upload_data_path(upload.upload_id)
    assert upload.size == fs.upload_size(upload.upload_id) == len(expected)
    assert os.stat(path).st_size == len(expected)
    assert Path(path).read_bytes() == expected
    assert upload.read_at(0, len(expected) + 10) == expected


@pytest.mark.parametrize("order", ["ascending", "descending", "seed1", "seed2", "seed3"])
def test_odd_appends_give_the_same_file(
    order: str, filesystems: Callable[..., FilesystemStorage]
) -> None:
    """Appends of every odd size, in several orders, each size twice: after every append the
    file holds exactly the accepted bytes (the bytes written with O_DIRECT, the tail written
    through the page cache, and the rewritten tail block agree)."""
    sizes = sorted(ODD_SIZES * 2, reverse=order == "descending")
    if order.startswith("seed"):
        random.Random(order).shuffle(sizes)
    fs = filesystems()
    assert fs.direct.writes
    upload = _open(fs, "odd", create=True)
    expected = bytearray()
    try:
        for size in sizes:
            data = os.urandom(size)
            upload.append(data if size % 2 else memoryview(data))
            expected += data
            _check_staged(fs, upload, bytes(expected))
    finally:
        upload.close()


def test_many_small_appends_across_blocks(filesystems: Callable[..., FilesystemStorage]) -> None:
    """Small appends, each ending inside a block, crossing block boundaries one by one."""
    fs = filesystems()
    upload = _open(fs, "small", create=True)
    expected = bytearray()
    rng = random.Random(7)
    try:
        for _ in range(300):
            data = os.urandom(rng.choice([1, 7, 100, 1000, 3000]))
            upload.append(data)
            expected += data
            assert upload.size == len(expected)
        _check_staged(fs, upload, bytes(expected))
    finally:
        upload.close()


def test_resume_at_an_unaligned_size(filesystems: Callable[..., FilesystemStorage]) -> None:
    """The partial last block is read back from the file when the upload is taken again (also
    by a restarted process), and rewritten whole by the next append."""
    fs = filesystems()
    expected = bytearray()
    upload = _open(fs, "resume", create=True)
    for size in (MiB + 3, 4097):
        data = os.urandom(size)
        upload.append(data)
        expected += data
    upload.close()
    for round_ in range(3):
        if round_ == 2:
            fs = filesystems()  # a restart
        upload = _open(fs, "resume")
        try:
            assert upload.size == len(expected)
            data = os.urandom(5000 + round_)
            upload.append(data)
            expected += data
            _check_staged(fs, upload, bytes(expected))
        finally:
            upload.close()
    upload = _open(fs, "resume")
    try:
        digest = Digest.of(bytes(expected), "sha256")
        assert upload.store_as(digest) is False
    finally:
        upload.close()
    reader = fs.open_blob(digest)
    assert reader is not None
    try:
        assert reader.read_at(0, len(expected)) == expected
    finally:
        reader.close()


_OTHER_PROCESS = """
import hashlib, os, sys
from blobsvc.storage.filesystem import FilesystemStorage
fs = FilesystemStorage(sys.argv[1])
for line in sys.stdin:
    command = line.split()
    if command[0] == "read":  # the file's bytes, as a process that only reads sees them
        data = open(fs.upload_data_path("shared"), "rb").read()
        print(fs.upload_size("shared"), len(data), hashlib.sha256(data).hexdigest(), flush=True)
    elif command[0] == "append":  # takes the upload, appends, lets it go
        upload = fs.open_upload("shared")
        upload.append(bytes.fromhex(command[1]))
        size = upload.size
        upload.close()
        print(size, flush=True)
fs.close()
"""


def test_another_process_sees_every_accepted_byte(
    tmp_path: Path, filesystems: Callable[..., FilesystemStorage]
) -> None:
    """After each append another process reads all of it from the file; it can also take the
    upload over at an unaligned size and append, and we see its bytes when we take it back."""
    other = subprocess.Popen(
        [sys.executable, "-c", _OTHER_PROCESS, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert other.stdin is not None and other.stdout is not None

    def ask(command: str) -> list[str]:
        assert other.stdin is not None and other.stdout is not None
        other.stdin.write(command + "\n")
        other.stdin.flush()
        return other.stdout.readline().split()

    try:
        fs = filesystems()
        expected = bytearray()
        for round_, size in enumerate([4095, 4097, MiB + 3, 4096, 1, 4 * MiB, 3]):
            upload = _open(fs, "shared", create=not expected)
            try:
                data = os.urandom(size)
                upload.append(data)
                expected += data
                want = [str(len(expected))] * 2 + [hashlib.sha256(expected).hexdigest()]
                assert ask("read") == want
            finally:
                upload.close()
            if round_ % 2 == 0:  # the other process stages a few bytes at our odd size
                theirs = os.urandom(round_ + 1)
                expected += theirs
                assert ask(f"append {theirs.hex()}") == [str(len(expected))]
        upload = _open(fs, "shared")
        try:
            _check_staged(fs, upload, bytes(expected))
        finally:
            upload.close()
        other.stdin.close()
        assert other.wait(30) == 0
    finally:
        other.kill()
        other.wait()


def _stored_blob(fs: FilesystemStorage, data: bytes) -> Digest:
    """``data`` staged (with 1 MiB appends, as streams send it) and committed."""
    upload = _open(fs, "blob", create=True)
    try:
        for start in range(0, len(data), MiB):
            upload.append(data[start : start + MiB])
        digest = Digest.of(data, "sha256")
        upload.store_as(digest)
    finally:
        upload.close()
    return digest


def test_direct_upload_bypasses_the_page_cache(
    disk: Path, filesystems: Callable[..., FilesystemStorage]
) -> None:
    """8 MiB staged with direct I/O leave the page cache empty; with it off they are cached.
    (Fails if direct I/O silently stops happening.)"""
    data = os.urandom(8 * MiB)
    for direct_io in (True, False):
        fs = filesystems(disk / str(direct_io), direct_io=direct_io)
        upload = _open(fs, "cache", create=True)
        try:
            for start in range(0, len(data), MiB):
                upload.append(data[start : start + MiB])
            cached = _cached_pages(fs.upload_data_path("cache"))
            assert cached == 0 if direct_io else cached == len(data) // 4096
        finally:
            upload.close()


def test_reads_bypass_the_page_cache_unless_cached(
    disk: Path, filesystems: Callable[..., FilesystemStorage]
) -> None:
    """Reads of a blob that is not cached do not cache it; reads at any offset and length,
    across cached and uncached parts, at and beyond the end, return the right bytes."""
    fs = filesystems(disk)
    data = os.urandom(6 * MiB + 1234)
    digest = _stored_blob(fs, data)
    path = fs.blob_path(digest)
    # Cache [1 MiB + 100, 2 MiB + 5000) with a buffered read of our own (no readahead).
    warm = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(warm, 0, 0, os.POSIX_FADV_RANDOM)
        assert len(os.pread(warm, MiB + 4900, MiB + 100)) == MiB + 4900
    finally:
        os.close(warm)
    cached = _cached_pages(path)
    assert 0 < cached < len(data) // 4096 // 2
    reader = fs.open_blob(digest)
    assert reader is not None
    rng = random.Random(3)
    ranges = [
        (0, MiB),  # uncached, aligned
        (1, 4095),  # uncached, unaligned both ends
        (MiB + 4096, 4096),  # cached
        (MiB + 100, MiB + 4900),  # exactly the cached range (with its partial pages)
        (MiB - 5, 10),  # uncached into cached
        (2 * MiB + 4000, 2 * MiB),  # cached into uncached
        (MiB - 4097, MiB + 8195),  # uncached, cached, uncached
        (len(data) - 1000, MiB),  # ends at the end of the blob: shorter
        (len(data) - 1234, 1234),  # the last partial block exactly
        (len(data), 10),  # at the end: nothing
        (len(data) + 5, 10),  # beyond it: nothing
        (3, 5 * MiB),  # longer than a read buffer
    ]
    ranges += [(rng.randrange(len(data)), rng.randrange(1, 2 * MiB)) for _ in range(40)]
    try:
        for offset, length in ranges:
            assert reader.read_at(offset, length) == data[offset : offset + length], (
                offset,
                length,
            )
    finally:
        reader.close()
    assert _cached_pages(path) == cached  # read, yet no more cached


def test_buffer_pool_is_bounded(filesystems: Callable[..., FilesystemStorage]) -> None:
    """Concurrent appends each take an aligned buffer; the pool keeps a few for reuse (as many
    as the driver was told)."""
    from concurrent.futures import ThreadPoolExecutor

    idle = 3
    fs = filesystems(idle_direct_buffers=idle)
    uploads = [_open(fs, f"pool{i}", create=True) for i in range(2 * idle + 2)]
    data = os.urandom(MiB + 5)
    try:
        with ThreadPoolExecutor(len(uploads)) as pool:
            for _ in range(3):
                list(pool.map(lambda upload: upload.append(data), uploads))
        assert 0 < len(fs.direct._idle) <= idle
        for upload in uploads:
            assert upload.read_at(0, 3 * len(data)) == data * 3
    finally:
        for upload in uploads:
            upload.close()


def test_write_refused_falls_back_to_the_page_cache(
    disk: Path, filesystems: Callable[..., FilesystemStorage], caplog: pytest.LogCaptureFixture
) -> None:
    """A filesystem that opens with O_DIRECT but refuses the transfer (EINVAL): the upload
    goes on through the page cache, without losing or repeating a byte, and so does every
    later one; it is said once. Forced here with an alignment the disk cannot take (1 byte):
    the first two pieces of a 3 MiB append are whole sectors and go direct, the third is
    refused."""
    fs = filesystems(disk)
    upload = _open(fs, "refused", create=True)
    expected = bytearray(os.urandom(8192))
    upload.append(bytes(expected))  # direct, at the real alignment
    fs.direct.alignment = 1
    caplog.set_level(logging.INFO, logger="blobsvc.storage.filesystem")
    try:
        for size in (3 * MiB + 100, 4097, 1):
            data = os.urandom(size)
            upload.append(data)
            expected += data
            _check_staged(fs, upload, bytes(expected))
    finally:
        upload.close()
    assert not fs.direct.writes and not fs.direct.reads
    second = _open(fs, "later", create=True)
    try:
        second.append(os.urandom(2 * MiB))
        assert _cached_pages(fs.upload_data_path("later")) == 2 * MiB // 4096  # page cache
    finally:
        second.close()
    said = [r for r in caplog.records if "direct I/O off" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.INFO


_ON_RAMFS = """
import logging, os, sys
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
from blobsvc.storage.filesystem import FilesystemStorage
from linkedblob.digests import Digest
fs = FilesystemStorage(sys.argv[1])
upload = fs.open_upload("u", "sha256")
expected = b""
for size in (4095, 4097, 1048579, 1):
    data = os.urandom(size)
    upload.append(data)
    expected += data
    assert upload.size == len(expected) == os.path.getsize(fs.upload_data_path("u"))
assert open(fs.upload_data_path("u"), "rb").read() == expected
assert upload.read_at(3, 5000) == expected[3:5003]
digest = Digest.of(expected, "sha256")
upload.store_as(digest)
upload.close()
reader = fs.open_blob(digest)
assert reader.read_at(4000, 10**6) == expected[4000:4000 + 10**6]
reader.close()
print("direct", fs.direct.writes, fs.direct.reads)
fs.close()
"""


def test_filesystem_without_o_direct(tmp_path: Path) -> None:
    """ramfs refuses O_DIRECT at open (EINVAL): everything goes through the page cache. Run
    in a mount namespace of its own (needs root and unshare(1))."""
    unshare = shutil.which("unshare")
    if os.geteuid() != 0 or unshare is None:
        pytest.skip("needs root and unshare(1) to mount a ramfs")
    mount = tmp_path / "ramfs"
    mount.mkdir()
    script = 'mount -t ramfs none "$1" && exec "$2" -c "$3" "$1"'
    result = subprocess.run(
        [unshare, "-m", "sh", "-c", script, "sh", str(mount), sys.executable, _ON_RAMFS],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if "mount" in result.stderr and result.returncode != 0:
        pytest.skip(f"cannot mount a ramfs here: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[-1] == "direct False False"
    assert sum("direct I/O off" in line for line in lines) == 1


def test_tmpfs() -> None:
    """tmpfs (/dev/shm): Linux 6.6+ opens and writes with O_DIRECT (through its page cache
    anyway), older kernels refuse the open; either way the bytes are right."""
    if _filesystem_type(Path("/dev/shm")) != "tmpfs" or not os.access("/dev/shm", os.W_OK):
        pytest.skip("no writable tmpfs at /dev/shm")
    with tempfile.TemporaryDirectory(dir="/dev/shm") as root:
        fs = FilesystemStorage(root)
        try:
            upload = _open(fs, "shm", create=True)
            expected = bytearray()
            try:
                for size in ODD_SIZES:
                    data = os.urandom(size)
                    upload.append(data)
                    expected += data
                    _check_staged(fs, upload, bytes(expected))
                digest = Digest.of(bytes(expected), "sha256")
                upload.store_as(digest)
            finally:
                upload.close()
            reader = fs.open_blob(digest)
            assert reader is not None
            try:
                assert reader.read_at(5, 3 * MiB) == expected[5 : 5 + 3 * MiB]
            finally:
                reader.close()
        finally:
            fs.close()


def test_direct_io_option() -> None:
    """--direct-io auto|off, default auto, LINKEDBLOB_DIRECT_IO in the environment."""
    import argparse

    def parse(*argv: str) -> str:
        parser = argparse.ArgumentParser()
        add_arguments(parser)
        return str(parser.parse_args(argv).direct_io)

    assert parse() == "auto"
    assert parse("--direct-io", "off") == "off"
    with pytest.raises(SystemExit):
        parse("--direct-io", "on")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("LINKEDBLOB_DIRECT_IO", "off")
        assert parse() == "off"


def test_a_blob_read_again_is_cached(
    disk: Path, filesystems: Callable[..., FilesystemStorage]
) -> None:
    """The first read of a blob leaves the page cache alone; a second one while the blob is
    remembered reads it into the cache (a popular blob costs one device read, not one per
    pull); a blob forgotten (more than ``recent_reads`` others read since) starts over."""
    fs = filesystems(disk, recent_reads=2)
    blobs = {}
    for n in range(4):
        data = os.urandom(2 * MiB + n * 4096)  # whole blocks: none staged through the cache
        blobs[_stored_blob(fs, data)] = data

    def read_all(digest: Digest) -> None:
        reader = fs.open_blob(digest)
        assert reader is not None
        try:
            assert reader.read_at(0, 3 * MiB) == blobs[digest]
        finally:
            reader.close()

    first, second, third, fourth = blobs
    read_all(first)
    assert _cached_pages(fs.blob_path(first)) == 0
    read_all(first)  # again: through the page cache
    assert _cached_pages(fs.blob_path(first)) == _pages(blobs[first])
    read_all(second)
    read_all(third)
    read_all(fourth)  # only two are remembered: third and fourth
    read_all(second)
    assert _cached_pages(fs.blob_path(second)) == 0  # forgotten: read past the cache again
    for digest in (third, fourth):
        assert _cached_pages(fs.blob_path(digest)) == 0


def _pages(data: bytes) -> int:
    return -(-len(data) // 4096)

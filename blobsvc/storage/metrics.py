"""Storage metrics as a wrapper: how long a driver takes, and how many bytes it moves, by action
(as distribution's ``registry_storage_action_seconds{driver,action}``).

- ``linkedblob_storage_action_seconds{driver,action}`` (histogram)
- ``linkedblob_storage_bytes_total{driver,action}`` (counter)
- ``linkedblob_storage_errors_total{driver,action}`` (counter): calls that raised (a missing blob
  is an answer, not an error)

Actions, one observation per call: ``stat``, ``open`` (a blob for reading), ``put``, ``delete``,
``list``, ``upload_size``, ``upload_info``, ``list_uploads``, ``open_upload``, ``store`` (an
upload's bytes moved in as a blob), ``discard``. Byte streams are observed once per open reader or
held upload, when it closes: ``read`` (a blob), ``append`` and ``read_staged`` (an upload), with the
seconds its calls spent in the driver, added up (read-ahead overlaps them), and the bytes they
moved. Once per stream because a stream makes a call per chunk, and an observation costs a lock and
a bucket search while a chunk from memory costs tens of microseconds. Bytes are also counted for
``put``.
"""

from __future__ import annotations

import builtins
import threading
from collections.abc import Callable
from time import perf_counter
from typing import TypeVar

from prometheus_client import Counter, Histogram

from blobsvc.storage import BlobReader, StagedUpload, Storage, UploadInfo
from blobsvc.storage.forwarding import ForwardingStagedUpload, ForwardingStorage
from linkedblob.digests import Digest

T = TypeVar("T")

STORAGE_SECONDS = Histogram(
    "linkedblob_storage_action_seconds",
    "Seconds a storage driver spent on an action (byte streams: per stream, added up)",
    ["driver", "action"],
    buckets=(0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5, 30, 120),
)
STORAGE_BYTES = Counter(
    "linkedblob_storage_bytes",
    "Bytes a storage driver read or wrote, by action",
    ["driver", "action"],
)

STORAGE_ERRORS = Counter(
    "linkedblob_storage_errors",
    "Storage driver calls that raised, by action (byte streams: per failed call)",
    ["driver", "action"],
)


class _Action:
    """One action's metric children, looked up once per driver."""

    __slots__ = ("errors", "seconds")

    def __init__(self, driver: str, action: str) -> None:
        self.seconds = STORAGE_SECONDS.labels(driver, action)
        self.errors = STORAGE_ERRORS.labels(driver, action)


def _timed(action: _Action, call: Callable[..., T], *args: object) -> T:
    started = perf_counter()
    try:
        return call(*args)
    except BaseException:
        action.errors.inc()
        raise
    finally:
        action.seconds.observe(perf_counter() - started)


class _Tally:
    """One stream's calls of one action: seconds and bytes added up (calls may run at once in
    several threads), observed when the stream closes."""

    def __init__(self, seconds: Histogram, count: Counter, errors: Counter) -> None:
        self._seconds_metric = seconds
        self._bytes_metric = count
        self.errors = errors
        self._lock = threading.Lock()
        self._calls = 0
        self._seconds = 0.0
        self._bytes = 0

    def add(self, started: float, count: int) -> None:
        elapsed = perf_counter() - started
        with self._lock:
            self._calls += 1
            self._seconds += elapsed
            self._bytes += count

    def flush(self) -> None:
        with self._lock:
            calls, seconds, count = self._calls, self._seconds, self._bytes
            self._calls, self._seconds, self._bytes = 0, 0.0, 0
        if calls:
            self._seconds_metric.observe(seconds)
            self._bytes_metric.inc(count)


def _tallied_read(
    reads: _Tally, read_at: Callable[[int, int], bytes], offset: int, length: int
) -> bytes:
    started = perf_counter()
    data = b""
    try:
        data = read_at(offset, length)
        return data
    except BaseException:
        reads.errors.inc()
        raise
    finally:
        reads.add(started, len(data))


class _StreamAction:
    """A byte stream action's metric children, looked up once per driver."""

    def __init__(self, driver: str, action: str) -> None:
        self.seconds = STORAGE_SECONDS.labels(driver, action)
        self.bytes = STORAGE_BYTES.labels(driver, action)
        self.errors = STORAGE_ERRORS.labels(driver, action)

    def tally(self) -> _Tally:
        return _Tally(self.seconds, self.bytes, self.errors)


class MetricsStorage(ForwardingStorage):
    def __init__(self, base: Storage, driver: str) -> None:
        """Observes ``base``'s actions under the label ``driver`` (its ``--storage`` name).
        The metric children are looked up here, once: a labels() lookup costs a lock and a
        dict of label tuples, as much as the observation itself."""
        super().__init__(base)
        self._stat = _Action(driver, "stat")
        self._open = _Action(driver, "open")
        self._put = _Action(driver, "put")
        self._put_bytes = STORAGE_BYTES.labels(driver, "put")
        self._delete = _Action(driver, "delete")
        self._list = _Action(driver, "list")
        self._upload_size = _Action(driver, "upload_size")
        self._upload_info = _Action(driver, "upload_info")
        self._list_uploads = _Action(driver, "list_uploads")
        self._open_upload = _Action(driver, "open_upload")
        self._store = _Action(driver, "store")
        self._discard = _Action(driver, "discard")
        self._read = _StreamAction(driver, "read")
        self._append = _StreamAction(driver, "append")
        self._read_staged = _StreamAction(driver, "read_staged")

    def stat(self, digest: Digest) -> int | None:
        return _timed(self._stat, self.base.stat, digest)

    def open_blob(self, digest: Digest) -> BlobReader | None:
        reader = _timed(self._open, self.base.open_blob, digest)
        return None if reader is None else _MeteredReader(reader, self._read.tally())

    def put(self, digest: Digest, data: bytes) -> bool:
        existed = _timed(self._put, self.base.put, digest, data)
        self._put_bytes.inc(len(data))
        return existed

    def delete(self, digest: Digest) -> bool:
        return _timed(self._delete, self.base.delete, digest)

    def list(self, after: str, limit: int) -> list[tuple[Digest, int]]:
        return _timed(self._list, self.base.list, after, limit)

    def upload_size(self, upload_id: str) -> int | None:
        return _timed(self._upload_size, self.base.upload_size, upload_id)

    def upload_info(self, upload_id: str) -> UploadInfo | None:
        return _timed(self._upload_info, self.base.upload_info, upload_id)

    def list_uploads(self, after: str, limit: int) -> builtins.list[UploadInfo]:
        return _timed(self._list_uploads, self.base.list_uploads, after, limit)

    def open_upload(self, upload_id: str, create_with: str | None = None) -> StagedUpload | None:
        upload = _timed(self._open_upload, self.base.open_upload, upload_id, create_with)
        if upload is None:
            return None
        return _MeteredUpload(
            upload, self._append.tally(), self._read_staged.tally(), self._store, self._discard
        )


class _MeteredReader:
    def __init__(self, base: BlobReader, reads: _Tally) -> None:
        self.base = base
        self._reads = reads

    @property
    def size(self) -> int:
        return self.base.size

    def read_at(self, offset: int, length: int) -> bytes:
        return _tallied_read(self._reads, self.base.read_at, offset, length)

    def close(self) -> None:
        self._reads.flush()
        self.base.close()


class _MeteredUpload(ForwardingStagedUpload):
    def __init__(
        self,
        base: StagedUpload,
        appends: _Tally,
        reads: _Tally,
        store: _Action,
        discard: _Action,
    ) -> None:
        super().__init__(base)
        self._appends = appends
        self._reads = reads
        self._store = store
        self._discard = discard

    def append(self, data: bytes | memoryview) -> None:
        started = perf_counter()
        try:
            self.base.append(data)
        except BaseException:
            self._appends.errors.inc()
            self._appends.add(started, 0)  # the time, not the bytes (some may have landed)
            raise
        self._appends.add(started, len(data))

    def read_at(self, offset: int, length: int) -> bytes:
        return _tallied_read(self._reads, self.base.read_at, offset, length)

    def store_as(self, digest: Digest) -> bool:
        return _timed(self._store, self.base.store_as, digest)

    def discard(self) -> None:
        _timed(self._discard, self.base.discard)

    def close(self) -> None:
        self._appends.flush()
        self._reads.flush()
        self.base.close()

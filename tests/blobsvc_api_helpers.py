"""Helpers and fixtures of the test_blobsvc_api* modules: a `linkedblob serve blob` per driver."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import grpc
import pytest

from linkedblob.blob.v1 import blob_pb2 as pb
from linkedblob.blob.v1 import blob_pb2_grpc
from linkedblob.config import STREAM_CHUNK_BYTES
from linkedblob.errors import Reason, error_info
from tests.services import ServiceProcess, running

Code = grpc.StatusCode
MiB = 1024 * 1024


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def sha512(data: bytes) -> str:
    return "sha512:" + hashlib.sha512(data).hexdigest()


@contextmanager
def refused(code: grpc.StatusCode, reason: Reason | str) -> Iterator[list[grpc.RpcError]]:
    """Expects the block to fail with ``code`` and ErrorInfo ``reason``; yields [error]."""
    caught: list[grpc.RpcError] = []
    with pytest.raises(grpc.RpcError) as excinfo:
        yield caught
    err = excinfo.value
    caught.append(err)
    assert err.code() == code, f"{err.code()}: {err.details()}"  # type: ignore[attr-defined]
    info = error_info(err)
    assert info is not None, f"no ErrorInfo on {err.code()}: {err.details()}"  # type: ignore[attr-defined]
    assert info.reason == str(reason), info


def write_requests(
    upload_id: str,
    data: bytes,
    offset: int = 0,
    chunk: int = STREAM_CHUNK_BYTES,
    **first: object,
) -> Iterator[pb.WriteRequest]:
    """A Write stream: the first message names the upload (and carries the first chunk)."""
    chunks = [data[i : i + chunk] for i in range(0, len(data), chunk)] or [b""]
    yield pb.WriteRequest(upload_id=upload_id, offset=offset, data=chunks[0], **first)  # type: ignore[arg-type]
    for piece in chunks[1:]:
        yield pb.WriteRequest(data=piece)


def read_all(
    stub: blob_pb2_grpc.BlobServiceStub, digest: str, offset: int = 0, limit: int = 0
) -> bytes:
    return b"".join(
        m.data for m in stub.Read(pb.ReadRequest(digest=digest, offset=offset, limit=limit))
    )


def status(stub: blob_pb2_grpc.BlobServiceStub, upload_id: str) -> int | None:
    try:
        return stub.UploadStatus(pb.UploadStatusRequest(upload_id=upload_id)).size
    except grpc.RpcError as err:
        if err.code() == Code.NOT_FOUND:  # type: ignore[attr-defined]
            return None
        raise


def stored(stub: blob_pb2_grpc.BlobServiceStub, digest: str) -> bool:
    return not stub.FindMissing(pb.FindMissingRequest(digests=[digest])).missing


@pytest.fixture(scope="module", params=["filesystem", "memory"])
def blobsvc(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceProcess]:
    data = tmp_path_factory.mktemp("blobs")
    with running(
        "blob", "--data", str(data), "--storage", request.param, "--log-level", "WARNING"
    ) as svc:
        svc.data = data  # type: ignore[attr-defined]
        svc.storage = request.param  # type: ignore[attr-defined]
        yield svc


@pytest.fixture
def stub(blobsvc: ServiceProcess) -> Iterator[blob_pb2_grpc.BlobServiceStub]:
    with blobsvc.channel() as channel:
        yield blob_pb2_grpc.BlobServiceStub(channel)


def unique(n: int = 64) -> bytes:
    return os.urandom(n)


def uid() -> str:
    return "u-" + os.urandom(8).hex()


class HeldStream:
    """A Write stream that sends its first message and then waits until released."""

    def __init__(self, upload_id: str, first: bytes, rest: bytes, offset: int = 0) -> None:
        self.sent_first = threading.Event()
        self.release = threading.Event()
        self.upload_id, self.first, self.rest, self.offset = upload_id, first, rest, offset

    def __iter__(self) -> Iterator[pb.WriteRequest]:
        yield pb.WriteRequest(upload_id=self.upload_id, offset=self.offset, data=self.first)
        self.sent_first.set()
        self.release.wait(30)
        yield pb.WriteRequest(data=self.rest)


def wait_for_size(
    stub: blob_pb2_grpc.BlobServiceStub, upload_id: str, size: int, at_least: bool = False
) -> None:
    for _ in range(1000):
        staged = status(stub, upload_id)
        if staged == size or (at_least and staged is not None and staged >= size):
            return
        time.sleep(0.01)
    raise AssertionError(f"upload {upload_id} never reached {size} bytes")

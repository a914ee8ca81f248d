"""blobsvc protecting itself, against real servers and real faults: uploads open no file before
their first byte (descriptors counted in /proc/PID/fd), idle Write streams are ended
(--idle-stream-timeout), in-flight Writes are bounded (--max-open-uploads), a full disk (a small
tmpfs mounted here) answers RESOURCE_EXHAUSTED / STORAGE_FULL and recovers when space returns,
and running out of descriptors (a low RLIMIT_NOFILE on the server) answers a retryable
UNAVAILABLE and recovers. Everyone else is served throughout."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest

from linkedblob.blob.v1 import blob_pb2 as pb
from linkedblob.blob.v1 import blob_pb2_grpc
from linkedblob.errors import error_info
from linkedblob.v1 import registry_pb2, registry_pb2_grpc
from tests.blobsvc_api_helpers import MiB, sha256
from tests.services import ServiceProcess, running
from tests.stack import running_stack

Code = grpc.StatusCode


def fds(svc: ServiceProcess) -> int:
    return len(os.listdir(f"/proc/{svc.proc.pid}/fd"))


def status(err: grpc.aio.AioRpcError) -> tuple[Code, str, dict[str, str]]:
    info = error_info(err)  # type: ignore[arg-type]
    assert info is not None, err
    return err.code(), info.reason, dict(info.metadata)


@contextlib.asynccontextmanager
async def blob_stub(svc: ServiceProcess) -> AsyncIterator[blob_pb2_grpc.BlobServiceStub]:
    async with grpc.aio.insecure_channel(svc.address) as channel:
        yield blob_pb2_grpc.BlobServiceStub(channel)


async def held_write(
    stub: blob_pb2_grpc.BlobServiceStub, upload_id: str, data: bytes = b"", **first: object
) -> grpc.aio.StreamUnaryCall:
    """A Write stream that sent its first message and is left open. A stream the server
    ended already fails its sends with a status of gRPC's own: the server's comes from
    awaiting the call."""
    call = stub.Write()  # type: ignore[call-arg]
    with contextlib.suppress(grpc.aio.AioRpcError):
        await call.write(pb.WriteRequest(upload_id=upload_id, data=data, **first))  # type: ignore[arg-type]
    return call


async def write(stub: blob_pb2_grpc.BlobServiceStub, upload_id: str, data: bytes, **first: object):  # type: ignore[no-untyped-def]
    call = await held_write(stub, upload_id, data, **first)
    with contextlib.suppress(grpc.aio.AioRpcError):  # ended by the server: see held_write
        await call.done_writing()
    return await call


async def until_aborted(stub: blob_pb2_grpc.BlobServiceStub, upload_id: str) -> None:
    """Until blobsvc holds the upload for a stream (Abort answers ABORTED: busy)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            await stub.Abort(pb.AbortRequest(upload_id=upload_id))
        except grpc.aio.AioRpcError as err:
            if err.code() == Code.ABORTED:
                return
            raise
        assert time.monotonic() < deadline, f"{upload_id} never held"
        await asyncio.sleep(0.05)


# --- lazy descriptors ---------------------------------------------------------------------------


def test_header_only_writes_hold_no_descriptor(tmp_path: Path) -> None:
    streams = 200
    with running("blob", "--data", str(tmp_path), "--direct-io", "off") as svc:

        async def run() -> None:
            async with blob_stub(svc) as stub:
                await write(stub, "warm-up", b"x")  # the server's threads and files are up
                baseline = fds(svc)
                calls = [await held_write(stub, f"idle-{i}") for i in range(streams)]
                await until_aborted(stub, f"idle-{streams - 1}")  # every one has arrived
                header_only = fds(svc)
                # The same streams with one byte each: a file each (the count sees them).
                for i, call in enumerate(calls):
                    await call.write(pb.WriteRequest(data=b"y"))
                    if i == streams - 1:
                        await until_upload_size(stub, f"idle-{i}", 1)
                with_bytes = fds(svc)
                for call in calls:
                    await call.done_writing()
                    assert (await call).size == 1
                after = fds(svc)
            assert header_only <= baseline + 10, (baseline, header_only)
            assert with_bytes >= baseline + streams, (baseline, with_bytes)
            assert after <= baseline + 10, (baseline, after)

        asyncio.run(run())


def test_header_only_pushes_through_the_gateway_hold_no_blobsvc_descriptor(
    tmp_path: Path,
) -> None:
    """The attack of the issue: header-only PushBlob streams, relayed into blobsvc Writes.

    Over four connections into four repositories, 50 streams each: within the gateway's
    streams per connection (100) and uploads per repository (64), so every stream reaches
    blobsvc and it is blobsvc's lazy opening that is measured."""
    connections, streams = 4, 50
    with running_stack("sqlite", tmp_path) as stack:

        def header(i: int) -> registry_pb2.PushBlobRequest:
            return registry_pb2.PushBlobRequest(
                header=registry_pb2.PushBlobRequest.Header(
                    repository=f"protect/push{i}", media_type="a/b"
                )
            )

        async def run() -> None:
            # A local subchannel pool each: channels to one address otherwise share a connection.
            channels = [
                grpc.aio.insecure_channel(stack.address, options=[SEPARATE_CONNECTION])
                for _ in range(connections)
            ]
            try:
                stubs = [registry_pb2_grpc.RegistryStub(channel) for channel in channels]
                await stubs[0].PushBlob(iter([header(0), data_message(b"warm")]))
                baseline = fds(stack.blob)
                calls = []
                for i, rpc in enumerate(stubs):
                    for _ in range(streams):
                        call = rpc.PushBlob()  # type: ignore[call-arg]
                        await call.write(header(i))
                        calls.append(call)
                await asyncio.sleep(2)  # the gateway relays them to blobsvc
                during = fds(stack.blob)
                # Everyone else is served meanwhile.
                async with grpc.aio.insecure_channel(stack.address) as other:
                    pushed = await registry_pb2_grpc.RegistryStub(other).PushBlob(
                        iter([header(9), data_message(b"other")])
                    )
                assert pushed.size == 5
                for call in calls:
                    call.cancel()
            finally:
                for channel in channels:
                    await channel.close()
            assert during <= baseline + 10, (baseline, during)

        asyncio.run(run())


SEPARATE_CONNECTION = ("grpc.use_local_subchannel_pool", 1)


def data_message(data: bytes) -> registry_pb2.PushBlobRequest:
    return registry_pb2.PushBlobRequest(data=data)


async def until_upload_size(stub: blob_pb2_grpc.BlobServiceStub, upload_id: str, size: int) -> None:
    deadline = time.monotonic() + 30
    while True:
        with contextlib.suppress(grpc.aio.AioRpcError):
            got = await stub.UploadStatus(pb.UploadStatusRequest(upload_id=upload_id))
            if got.size == size:
                return
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)


# --- limits -------------------------------------------------------------------------------------


def test_idle_write_streams_are_ended(tmp_path: Path) -> None:
    """A resumable upload keeps what was written; a one-shot write (commit asked) is dropped;
    a header-only stream leaves nothing."""
    with running("blob", "--data", str(tmp_path), "--idle-stream-timeout", "1s") as svc:

        async def run() -> None:
            async with blob_stub(svc) as stub:
                resumable = await held_write(stub, "idle-resumable", b"abc")
                one_shot = await held_write(
                    stub, "idle-one-shot", b"abc", commit=True, commit_digest=sha256(b"abcd")
                )
                header_only = await held_write(stub, "idle-header")
                for call in (resumable, one_shot, header_only):
                    with pytest.raises(grpc.aio.AioRpcError) as excinfo:
                        await call
                    code, reason, _ = status(excinfo.value)
                    assert (code, reason) == (Code.RESOURCE_EXHAUSTED, "STREAM_IDLE")
                # Others were served all along, and are now.
                assert (await write(stub, "busy", b"data")).size == 4
                staged = await stub.UploadStatus(pb.UploadStatusRequest(upload_id="idle-resumable"))
                assert staged.size == 3
                for gone in ("idle-one-shot", "idle-header"):
                    with pytest.raises(grpc.aio.AioRpcError) as excinfo:
                        await stub.UploadStatus(pb.UploadStatusRequest(upload_id=gone))
                    assert excinfo.value.code() == Code.NOT_FOUND
                # The resumable one goes on.
                done = await write(
                    stub,
                    "idle-resumable",
                    b"d",
                    offset=3,
                    commit=True,
                    commit_digest=sha256(b"abcd"),
                )
                assert done.blob.digest == sha256(b"abcd")

        asyncio.run(run())
    assert sorted(os.listdir(tmp_path / "uploads")) == ["busy"]


def test_open_uploads_are_bounded(tmp_path: Path) -> None:
    with running("blob", "--data", str(tmp_path), "--max-open-uploads", "3") as svc:

        async def run() -> None:
            async with blob_stub(svc) as stub:
                held = [await held_write(stub, f"held-{i}", b"x") for i in range(3)]
                for i in range(3):
                    await until_aborted(stub, f"held-{i}")
                with pytest.raises(grpc.aio.AioRpcError) as excinfo:
                    await write(stub, "one-more", b"y")
                code, reason, metadata = status(excinfo.value)
                assert (code, reason) == (Code.RESOURCE_EXHAUSTED, "TOO_MANY_REQUESTS")
                assert metadata["limit"] == "max-open-uploads"
                # Other calls are served; the held streams finish; then Writes are taken again.
                assert (await stub.Put(pb.PutRequest(data=b"small"))).blob.size == 5
                for call in held:
                    await call.done_writing()
                    assert (await call).size == 1
                assert (await write(stub, "one-more", b"y")).size == 1

        asyncio.run(run())


# --- a full disk --------------------------------------------------------------------------------


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        reason = f"cannot mount a tmpfs (needs root): {done.stderr.strip()}"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_is_storage_full_and_recovers(small_tmpfs: Path) -> None:
    filler = os.urandom(MiB)
    big = os.urandom(MiB + MiB // 2)
    with running("blob", "--data", str(small_tmpfs)) as svc:

        async def full(call: object) -> str:
            with pytest.raises(grpc.aio.AioRpcError) as excinfo:
                await call  # type: ignore[misc]
            code, reason, _ = status(excinfo.value)
            assert (code, reason) == (Code.RESOURCE_EXHAUSTED, "STORAGE_FULL")
            message = excinfo.value.details() or ""
            assert str(small_tmpfs) not in message and "upload" not in message
            return message

        async def run() -> None:
            async with blob_stub(svc) as stub:
                stored = await stub.Put(pb.PutRequest(data=filler))
                # One-shot: the failed write's staging area is dropped.
                await full(write(stub, "one-shot", big, commit=True, commit_digest=sha256(big)))
                assert os.listdir(small_tmpfs / "uploads") == []
                await full(stub.Put(pb.PutRequest(data=big)))
                # Resumable: what fitted stays staged.
                await full(write(stub, "resumable", big))
                staged = (
                    await stub.UploadStatus(pb.UploadStatusRequest(upload_id="resumable"))
                ).size
                assert 0 < staged < len(big)
                # Space returns: the upload resumes and commits; the service never stopped.
                await stub.Delete(pb.DeleteRequest(digest=stored.blob.digest))
                done = await write(
                    stub,
                    "resumable",
                    big[staged:],
                    offset=staged,
                    commit=True,
                    commit_digest=sha256(big),
                )
                assert done.blob.size == len(big)
                read = b"".join(
                    [m.data async for m in stub.Read(pb.ReadRequest(digest=sha256(big)))]
                )
                assert read == big

        asyncio.run(run())
    assert not any("Traceback" in line for line in svc.output), "".join(svc.output)


# --- out of descriptors -------------------------------------------------------------------------


def test_running_out_of_descriptors_is_unavailable_and_recovers(tmp_path: Path) -> None:
    with running("blob", "--data", str(tmp_path), "--direct-io", "off") as svc:

        async def run() -> None:
            async with blob_stub(svc) as stub:
                await write(stub, "warm-up", b"x")
                # A few descriptors to spare, then none: each held stream keeps its file open.
                spare = 8
                limit = fds(svc) + spare
                resource.prlimit(svc.proc.pid, resource.RLIMIT_NOFILE, (limit, limit))
                held: list[grpc.aio.StreamUnaryCall] = []
                refusal = None
                for i in range(4 * spare):
                    call = await held_write(stub, f"hold-{i}", b"x")
                    held.append(call)
                    try:
                        await write(stub, f"probe-{i}", b"p")
                    except grpc.aio.AioRpcError as err:
                        refusal = err
                        break
                assert refusal is not None, "descriptors never ran out"
                code, reason, _ = status(refusal)
                assert (code, reason) == (Code.UNAVAILABLE, "UNAVAILABLE")
                assert str(tmp_path) not in (refusal.details() or "")
                # The streams end, the descriptors return, the same call succeeds (retryable).
                for call in held:
                    await call.done_writing()
                    with contextlib.suppress(grpc.aio.AioRpcError):
                        await call
                assert (await write(stub, "after", b"back")).size == 4

        asyncio.run(run())

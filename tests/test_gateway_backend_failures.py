"""Backends that refuse, fail or go away, seen through a real gateway (SQLite: the database
plays no part here).

A write blobsvc refuses answers with blobsvc's own status. blobsvc ends a Write it refuses (a
wrong offset) while the gateway may still be relaying the caller's messages; grpc core then
fails the gateway's next send. The gateway must still answer with blobsvc's status
(OUT_OF_RANGE / BLOB_UPLOAD_INVALID with ``size``), never a made-up UNAVAILABLE "stream broken",
however the race between the send and the status goes (see gateway.grpc_calls).

A backend that is down makes calls UNAVAILABLE; a push that fails or is abandoned leaves no
staged bytes behind.
"""

from __future__ import annotations

import asyncio
import gc
import os
import secrets
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from prometheus_client import REGISTRY

from gateway import grpc_blob, validation
from gateway.fakes import FakeLinkBackend
from gateway.grpc_blob import GrpcBlobBackend
from gateway.grpc_calls import WriteCall
from gateway.model import IncomingData, OutgoingData
from gateway.registry import Registry
from linkedblob import transport, wire
from linkedblob.blob.v1 import blob_pb2, blob_pb2_grpc
from linkedblob.config import MiB
from linkedblob.errors import LinkedBlobError, Reason, error_info
from linkedblob.v1 import registry_pb2 as pb
from tests.stack import Stack, free_port, registry, rpc_error, running_stack, spawn_gateway
from tests.test_gateway_blobs import digest_of, push, split

Code = grpc.StatusCode

THREADS = 4
ATTEMPTS = 250  # per thread
STAGED = b"staged bytes"
# Enough messages behind the refused first one that the gateway is usually still sending when
# blobsvc's status arrives (the race this test is about).
TRAILING_CHUNKS = 4
CHUNK = b"x" * 32_768


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack("sqlite", tmp_path_factory.mktemp("backend-failures")) as s:
        yield s


def _messages(repo: str, upload_id: str, offset: int) -> Iterator[pb.WriteUploadRequest]:
    yield pb.WriteUploadRequest(repository=repo, upload_id=upload_id, offset=offset, data=CHUNK)
    for _ in range(TRAILING_CHUNKS):
        yield pb.WriteUploadRequest(data=CHUNK)


def _answers(address: str, wrong_offset: int) -> Counter[str]:
    """Wrong-offset writes to an upload of its own; each answer counted by what it was."""
    rpc = registry(address)
    repo = f"refused/{secrets.token_hex(4)}"
    upload_id = rpc.StartUpload(pb.StartUploadRequest(repository=repo)).id
    first = pb.WriteUploadRequest(repository=repo, upload_id=upload_id, data=STAGED)
    rpc.WriteUpload(iter([first]))
    answers: Counter[str] = Counter()
    for _ in range(ATTEMPTS):
        try:
            rpc.WriteUpload(_messages(repo, upload_id, wrong_offset))
        except grpc.RpcError as err:
            info = error_info(err)
            code = err.code().name  # type: ignore[attr-defined]
            reason = info.reason if info is not None else "-"
            size = info.metadata.get("size", "none") if info is not None else "none"
            answers[f"{code}/{reason}/size={size}"] += 1
        else:
            answers["OK"] += 1
    return answers


@pytest.mark.parametrize("wrong_offset", [0, len(STAGED) + 1])
def test_concurrent_wrong_offset_writes_all_answer_out_of_range(
    stack: Stack, wrong_offset: int
) -> None:
    with ThreadPoolExecutor(THREADS) as pool:
        results = list(pool.map(lambda _: _answers(stack.address, wrong_offset), range(THREADS)))
    total: Counter[str] = sum(results, Counter())
    want = f"OUT_OF_RANGE/BLOB_UPLOAD_INVALID/size={len(STAGED)}"
    assert total == Counter({want: THREADS * ATTEMPTS}), dict(total)


# --- the same race against a server refusing for another reason (a full disk) ---------------------

FULL = LinkedBlobError(
    grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.SIZE_INVALID, "no space left", {"free": 0}
)


async def _refuse_at_once(
    requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
) -> bytes:
    await anext(aiter(requests))
    await context.abort_with_status(FULL.to_status())
    return b""  # not reached


@pytest.fixture(scope="module")
def refuser() -> Iterator[str]:
    """A server that refuses every Write after its first message, on a loop of its own (as
    blobsvc is a process of its own: on the client's loop the race does not show)."""
    started = threading.Event()
    address: list[str] = []
    stop: list[Callable[[], None]] = []

    async def serve() -> None:
        server = grpc.aio.server()
        handler = grpc.stream_unary_rpc_method_handler(_refuse_at_once)
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("test.Refuser", {"Write": handler}),)
        )
        address.append(f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}")
        await server.start()
        done = asyncio.Event()
        loop = asyncio.get_running_loop()
        stop.append(lambda: loop.call_soon_threadsafe(done.set))
        started.set()
        await done.wait()
        await server.stop(None)

    thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    thread.start()
    started.wait(10)
    yield address[0]
    stop[0]()
    thread.join(10)


async def _refused_writes(address: str, attempts: int) -> Counter[str]:
    answers: Counter[str] = Counter()
    async with grpc.aio.insecure_channel(address) as channel:
        write = channel.stream_unary("/test.Refuser/Write")

        async def attempt() -> None:
            call = WriteCall(write())
            try:
                for _ in range(1 + TRAILING_CHUNKS):
                    await call.send(CHUNK)
                await call.finish()
            except LinkedBlobError as err:
                answers[f"{err.code.name}/{err.reason}/free={err.metadata.get('free')}"] += 1
            else:
                answers["OK"] += 1

        for _ in range(attempts // THREADS):
            await asyncio.gather(*(attempt() for _ in range(THREADS)))
    return answers


def test_a_send_after_the_server_refused_reports_the_servers_status(refuser: str) -> None:
    answers = asyncio.run(_refused_writes(refuser, 1000))
    assert answers == Counter({"RESOURCE_EXHAUSTED/SIZE_INVALID/free=0": 1000}), dict(answers)


# --- backends that are down, and the cleanup of what a failed push staged ----------------------


def test_a_backend_that_is_down_is_unavailable() -> None:
    dead = [f"127.0.0.1:{free_port()}" for _ in range(2)]  # nobody listens there
    gateway = spawn_gateway(dead[0], dead[1])
    try:
        rpc = registry(gateway.address)
        digest = digest_of(b"x")
        with rpc_error(Code.UNAVAILABLE, "UNAVAILABLE"):
            rpc.StatBlob(pb.StatBlobRequest(repository="a", digest=digest))
        with rpc_error(Code.UNAVAILABLE, "UNAVAILABLE"):
            rpc.PutBlob(pb.PutBlobRequest(repository="a", data=b"x"))
        with rpc_error(Code.UNAVAILABLE, "UNAVAILABLE"):
            push(rpc, "a", [b"x"])
    finally:
        gateway.stop()


# A blobsvc bug found through the gateway (fixed in a8ca0cb): a Write stream that its client
# cancelled after sending data sometimes kept its upload locked for good, so a failed
# PushBlob's staged bytes could not be dropped. The first test shows it on blobsvc alone.


def test_blobsvc_releases_an_upload_whose_write_was_cancelled(stack: Stack) -> None:
    """The gateway cancels its blobsvc Write when its own caller goes away or sends bad input,
    then aborts the staging area: blobsvc must let go of the upload soon after the cancel."""

    async def attempts() -> list[str]:
        stuck: list[str] = []
        async with grpc.aio.insecure_channel(stack.blob.address) as channel:
            blob = blob_pb2_grpc.BlobServiceStub(channel)
            for i in range(30):
                upload_id = f"cancelled-{secrets.token_hex(6)}"
                call = blob.Write(metadata=stack.blob_metadata())
                await call.write(blob_pb2.WriteRequest(upload_id=upload_id, commit=True))
                await call.write(blob_pb2.WriteRequest(data=os.urandom(MiB if i % 2 else 3)))
                call.cancel()
                deadline = time.monotonic() + 5
                while True:
                    try:
                        await blob.Abort(
                            blob_pb2.AbortRequest(upload_id=upload_id),
                            metadata=stack.blob_metadata(),
                        )
                        break
                    except grpc.aio.AioRpcError as err:
                        if err.code() != Code.ABORTED or time.monotonic() > deadline:
                            stuck.append(f"{upload_id}: {err.code().name}")
                            break
                        await asyncio.sleep(0.05)
                if stuck:
                    break  # one is enough
        return stuck

    assert asyncio.run(attempts()) == []


def test_a_failed_or_abandoned_push_leaves_no_staged_bytes(stack: Stack) -> None:
    """PushBlob stages under an id of its own that nobody can resume: whatever ends it early
    (bad input, a digest mismatch, the caller going away) must drop what was staged."""
    rpc, repo = registry(stack.address), f"pushes/{secrets.token_hex(5)}"
    with rpc_error(Code.INVALID_ARGUMENT, "BLOB_UPLOAD_INVALID"):
        rpc.PushBlob(
            iter(
                [
                    pb.PushBlobRequest(header=pb.PushBlobRequest.Header(repository=repo)),
                    pb.PushBlobRequest(data=os.urandom(MiB)),
                    pb.PushBlobRequest(header=pb.PushBlobRequest.Header(repository=repo)),
                ]
            )
        )
    with rpc_error(Code.INVALID_ARGUMENT, "DIGEST_INVALID"):
        push(rpc, repo, split(os.urandom(2 * MiB), MiB), digest=digest_of(b"other"))
    # The caller goes away in the middle of the stream.
    sent_some = threading.Event()
    release = threading.Event()

    def messages() -> Iterator[pb.PushBlobRequest]:
        yield pb.PushBlobRequest(header=pb.PushBlobRequest.Header(repository=repo))
        for _ in range(3):
            yield pb.PushBlobRequest(data=os.urandom(MiB))
        sent_some.set()
        release.wait(30)

    future = rpc.PushBlob.future(messages())
    assert sent_some.wait(30)
    time.sleep(0.2)  # let the chunks reach blobsvc
    future.cancel()
    release.set()

    uploads = stack.data / "blobs"

    def staged() -> list[Path]:
        return [p for p in uploads.rglob("push-*") if p.is_dir()]

    deadline = time.monotonic() + 15
    while staged() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert staged() == []
    assert not rpc.ListBlobs(pb.ListBlobsRequest(repository=repo)).blobs


class _StandInCall:
    """A Write call whose sends fail: it ends with ``response`` (OK) once awaited, or, with
    None, never gets a status (a connection that broke without one)."""

    def __init__(self, response: bytes | None) -> None:
        self._end: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        if response is not None:
            self._end.set_result(response)

    def add_done_callback(self, callback: Callable[[object], None]) -> None:
        pass  # no status to report

    async def write(self, raw: bytes) -> None:
        if self._end.done():
            raise asyncio.InvalidStateError("RPC already finished.")
        raise grpc.aio.AioRpcError(
            Code.INTERNAL, grpc.aio.Metadata(), grpc.aio.Metadata(), "Internal error from Core"
        )

    def done(self) -> bool:
        return self._end.done()

    def cancelled(self) -> bool:
        return self._end.cancelled()

    def cancel(self) -> bool:
        return self._end.cancel()

    def __await__(self) -> Iterator[object]:
        return self._end.__await__()


@pytest.mark.parametrize(
    ("response", "code", "message"),
    [
        (None, Code.UNAVAILABLE, "blobsvc stream broken"),
        (b"", Code.INTERNAL, "blobsvc ended the write before it was sent all of it"),
    ],
)
def test_a_failed_send_without_a_status_from_blobsvc(
    response: bytes | None, code: Code, message: str
) -> None:
    async def send() -> None:
        call = WriteCall(_StandInCall(response), final_status_wait=0.05)  # type: ignore[arg-type]
        await call.send(b"data")

    with pytest.raises(LinkedBlobError) as exc_info:
        asyncio.run(send())
    assert exc_info.value.code == code and message in exc_info.value.message


# --- the Read relay's own check ------------------------------------------------------------------


class _StandInRead:
    """A blobsvc Read call that sends ``messages`` (serialized ReadResponses), then ends."""

    def __init__(self, messages: list[bytes]) -> None:
        self._messages = messages
        self.cancelled = False

    async def read(self) -> object:
        return self._messages.pop(0) if self._messages else grpc.aio.EOF  # type: ignore[attr-defined]

    def done(self) -> bool:
        return not self._messages

    def cancel(self) -> bool:
        self.cancelled = True
        return True


def _relayed(messages: list[bytes], length: int) -> tuple[bytes, LinkedBlobError | None]:
    """Runs gateway.grpc_blob's Read relay over a stand-in call: the data relayed, and the
    error it ended with."""
    out = OutgoingData(transport.READ_BLOB_DATA, b"", "relay-test")

    async def relay() -> tuple[bytes, LinkedBlobError | None]:
        call = _StandInRead(messages[1:])
        got = bytearray()
        try:
            async for message in grpc_blob._relay_read(
                call,  # type: ignore[arg-type]
                messages[0],
                length,
                out,
                "sha256:" + "0" * 64,
            ):
                got += wire.data_payload(message, transport.READ_BLOB_DATA) or b""
        except LinkedBlobError as err:
            return bytes(got), err
        return bytes(got), None

    return asyncio.run(relay())


def test_a_read_that_blobsvc_cut_short_is_data_loss() -> None:
    """A store that lost bytes must not pass for a short blob: the relay counts what blobsvc
    sent against what was asked (gateway.grpc_blob._relay_read)."""
    chunks = [blob_pb2.ReadResponse(data=b"x" * 30).SerializeToString() for _ in range(2)]
    data, error = _relayed(list(chunks), 60)
    assert (data, error) == (b"x" * 60, None)
    data, error = _relayed(list(chunks), 100)
    assert data == b"x" * 60 and error is not None
    assert (error.code, error.reason) == (Code.DATA_LOSS, Reason.INTERNAL)
    assert "sent 60 of 100 bytes" in error.message


def test_the_relays_count_the_bytes_they_pass() -> None:
    """BYTES_OUT is counted by the Read relay (the servicer counts nothing)."""

    def sent() -> float:
        value = REGISTRY.get_sample_value("linkedblob_bytes_sent_total", {"method": "relay-test"})
        return value or 0.0

    before = sent()
    _relayed([blob_pb2.ReadResponse(data=b"y" * 40).SerializeToString()], 40)
    assert sent() - before == 40


# --- a closed channel (shutdown): UNAVAILABLE, and cleanups that end quietly ----------------------


async def _data(*chunks: bytes) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield wire.data_message(transport.PUSH_BLOB_DATA, chunk)


def test_calls_on_a_closed_channel_are_unavailable_and_cleanups_end_quietly() -> None:
    """During shutdown the gateway closes its channels; a call made on one then fails with
    grpc.aio.UsageError (no grpc.RpcError). The adapter answers UNAVAILABLE (not INTERNAL from
    a leaked exception), and a failed push's aborts, in tasks of their own, end quietly
    (nothing like "Task exception was never retrieved")."""
    digest = "sha256:" + "0" * 64

    def incoming() -> IncomingData:
        return IncomingData(
            _data(b"abc"), transport.PUSH_BLOB_DATA, bytes, "closed-test", validation.data_size
        )

    async def scenario() -> tuple[list[str], list[dict[str, object]]]:
        unhandled: list[dict[str, object]] = []
        asyncio.get_running_loop().set_exception_handler(lambda _, ctx: unhandled.append(ctx))
        blobs = GrpcBlobBackend(f"127.0.0.1:{free_port()}", lambda: None, final_status_wait=0.05)
        await blobs.close()
        out = OutgoingData(transport.READ_BLOB_DATA, b"", "closed-test")
        answers = []
        for attempt in (
            blobs.stat(digest),
            blobs.abort("closed-upload"),
            blobs.open_read(digest, 0, 1, out),
            blobs.write("closed-upload", 0, b"data", incoming()),
        ):
            try:
                await attempt
            except LinkedBlobError as err:
                answers.append(f"{err.code.name}/{err.reason}")
        registry = Registry(blobs, FakeLinkBackend(), abort_again_after=0.01)
        try:
            await registry.push("closed/repo", "", None, None, incoming())
        except LinkedBlobError as err:
            answers.append(f"push {err.code.name}/{err.reason}")
        await asyncio.sleep(0.1)  # both aborts ran (and failed: the channel is closed)
        # A registry stopped with its second abort pending ends it at once.
        slow = Registry(blobs, FakeLinkBackend(), abort_again_after=60)
        with pytest.raises(LinkedBlobError):
            await slow.push("closed/repo", "", None, None, incoming())
        await asyncio.wait_for(slow.close(), 1)
        gc.collect()  # a task whose exception nobody retrieved reports it when collected
        return answers, unhandled

    answers, unhandled = asyncio.run(scenario())
    assert answers == ["UNAVAILABLE/UNAVAILABLE"] * 4 + ["push UNAVAILABLE/UNAVAILABLE"]
    assert unhandled == []


class _AcceptingWrite:
    """A blobsvc Write call that takes every message (or fails every send, with ``refuse``) and
    answers with the bytes it took."""

    def __init__(self, refuse: bool = False) -> None:
        self.refuse = refuse
        self.taken = 0

    def add_done_callback(self, callback: Callable[[object], None]) -> None:
        pass

    async def write(self, raw: bytes) -> None:
        if self.refuse:
            raise asyncio.InvalidStateError("RPC already finished.")
        self.taken += len(raw)

    async def done_writing(self) -> None:
        pass

    def done(self) -> bool:
        return True

    def cancelled(self) -> bool:
        return False

    def cancel(self) -> bool:
        return False

    def __await__(self) -> Iterator[object]:
        async def response() -> blob_pb2.WriteResponse:
            return blob_pb2.WriteResponse(size=self.taken)

        return response().__await__()


def test_a_commits_last_chunk_is_counted_once_it_was_sent() -> None:
    """BYTES_IN of data the domain hands over (CommitUpload's last chunk) is counted by the blob
    adapter, and only once it was sent to blobsvc."""

    def received() -> float:
        value = REGISTRY.get_sample_value(
            "linkedblob_bytes_received_total", {"method": "commit-test"}
        )
        return value or 0.0

    async def write(refuse: bool) -> None:
        blobs = GrpcBlobBackend(f"127.0.0.1:{free_port()}", lambda: None, final_status_wait=0.01)
        blobs._write_raw = lambda metadata: _AcceptingWrite(refuse)  # type: ignore[assignment,misc]
        try:
            await blobs.write("u", 0, b"last chunk", None, None, counted_as="commit-test")
        finally:
            await blobs.close()

    before = received()
    asyncio.run(write(refuse=False))
    assert received() - before == len(b"last chunk")
    with pytest.raises(LinkedBlobError):
        asyncio.run(write(refuse=True))
    assert received() - before == len(b"last chunk")  # not sent: not counted

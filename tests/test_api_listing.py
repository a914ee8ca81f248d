"""The API through one real stack (SQLite): reflection v1 and v1alpha, page sizes clamped as
AIP-158 has it, and ListUploads (the Registry call, linksvc's ListSessions behind it, the
client's list_uploads and `linkedblob uploads REPO`)."""

from __future__ import annotations

import datetime
import json
import secrets
import subprocess
import sys
from collections.abc import Iterator

import pytest
from google.protobuf import descriptor_pb2
from grpc import StatusCode as Code
from grpc_reflection.v1alpha import reflection_pb2

from linkedblob.client import Client
from linkedblob.digests import Digest
from linkedblob.v1 import registry_pb2 as pb
from linkedblob.v1 import registry_pb2_grpc
from tests.stack import Stack, registry, registry_channel, rpc_error, running_stack

Stub = registry_pb2_grpc.RegistryStub


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack("sqlite", tmp_path_factory.mktemp("api")) as s:
        yield s


@pytest.fixture(scope="module")
def rpc(stack: Stack) -> Stub:
    return registry(stack.address)


def new_repo() -> str:
    return f"api/{secrets.token_hex(4)}"


# --- reflection ---------------------------------------------------------------------------------


def reflect(
    address: str, version: str, request: reflection_pb2.ServerReflectionRequest
) -> reflection_pb2.ServerReflectionResponse:
    """One ServerReflectionInfo exchange at ``grpc.reflection.<version>`` (the two versions'
    messages are the same on the wire)."""
    with registry_channel(address) as channel:
        call = channel.stream_stream(
            f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        (response,) = list(call(iter([request]), timeout=10))
        return response


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
def test_reflection_lists_and_describes_the_services(stack: Stack, version: str) -> None:
    for server, service in (
        (stack.address, "linkedblob.v1.Registry"),
        (stack.link.address, "linkedblob.link.v1.LinkService"),
        (stack.blob.address, "linkedblob.blob.v1.BlobService"),
    ):
        listed = reflect(server, version, reflection_pb2.ServerReflectionRequest(list_services=""))
        names = {s.name for s in listed.list_services_response.service}
        assert {
            service,
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
        } <= names
    for symbol, package in (
        ("linkedblob.v1.Registry", "linkedblob.v1"),
        ("grpc.reflection.v1.ServerReflection", "grpc.reflection.v1"),
    ):
        found = reflect(
            stack.address,
            version,
            reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol),
        )
        files = [
            descriptor_pb2.FileDescriptorProto.FromString(raw)
            for raw in found.file_descriptor_response.file_descriptor_proto
        ]
        assert package in {f.package for f in files}, found
    missing = reflect(
        stack.address,
        version,
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="no.such.Service"),
    )
    assert missing.error_response.error_code == Code.NOT_FOUND.value[0]


# --- page sizes (AIP-158) -----------------------------------------------------------------------


def put(rpc: Stub, repository: str, data: bytes) -> pb.Descriptor:
    return rpc.PutBlob(pb.PutBlobRequest(repository=repository, data=data))


def test_page_sizes_above_the_maximum_are_clamped_negative_refused(rpc: Stub) -> None:
    repo = new_repo()
    stored = sorted(put(rpc, repo, secrets.token_bytes(8)).digest for _ in range(3))
    big = rpc.ListBlobs(pb.ListBlobsRequest(repository=repo, page_size=2**31 - 1))
    assert [b.digest for b in big.blobs] == stored and big.next_page_token == ""
    one = rpc.ListBlobs(pb.ListBlobsRequest(repository=repo, page_size=1))
    assert [b.digest for b in one.blobs] == stored[:1] and one.next_page_token
    # More repositories than a page holds: a huge page_size gets exactly 1000 and a token.
    digest = stored[0]
    for batch in range(0, 1001, 50):  # within the gateway's concurrent streams
        futures = [
            rpc.MountBlob.future(pb.MountBlobRequest(repository=f"{repo}/m{i:04}", digest=digest))
            for i in range(batch, min(batch + 50, 1001))
        ]
        for future in futures:
            future.result(timeout=60)
    page = rpc.ListRepositories(pb.ListRepositoriesRequest(page_size=2**31 - 1))
    assert len(page.repositories) == 1000 and page.next_page_token
    rest = rpc.ListRepositories(
        pb.ListRepositoriesRequest(page_size=5000, page_token=page.next_page_token)
    )
    assert not set(page.repositories) & set(rest.repositories)
    for size in (-1, -(2**31)):
        with rpc_error(Code.INVALID_ARGUMENT, "PAGINATION_INVALID"):
            rpc.ListBlobs(pb.ListBlobsRequest(repository=repo, page_size=size))
        with rpc_error(Code.INVALID_ARGUMENT, "PAGINATION_INVALID"):
            rpc.ListRepositories(pb.ListRepositoriesRequest(page_size=size))
        with rpc_error(Code.INVALID_ARGUMENT, "PAGINATION_INVALID"):
            rpc.ListUploads(pb.ListUploadsRequest(repository=repo, page_size=size))


# --- ListUploads --------------------------------------------------------------------------------


def write(rpc: Stub, repository: str, upload_id: str, offset: int, data: bytes) -> pb.Upload:
    first = pb.WriteUploadRequest(
        repository=repository, upload_id=upload_id, offset=offset, data=data
    )
    return rpc.WriteUpload(iter([first]))


def all_uploads(rpc: Stub, repository: str, page_size: int) -> list[pb.Upload]:
    uploads: list[pb.Upload] = []
    token = ""
    while True:
        page = rpc.ListUploads(
            pb.ListUploadsRequest(repository=repository, page_size=page_size, page_token=token)
        )
        assert len(page.uploads) <= page_size
        uploads += page.uploads
        token = page.next_page_token
        if not token:
            return uploads


def test_list_uploads_shows_the_uploads_in_progress(rpc: Stub) -> None:
    repo, other = new_repo(), new_repo()
    started = [rpc.StartUpload(pb.StartUploadRequest(repository=repo)) for _ in range(4)]
    rpc.StartUpload(pb.StartUploadRequest(repository=other))
    written, cancelled, committed, idle = started
    data = secrets.token_bytes(100)
    write(rpc, repo, written.id, 0, data[:60])
    write(rpc, repo, written.id, 60, data[60:])
    rpc.CancelUpload(pb.CancelUploadRequest(repository=repo, upload_id=cancelled.id))
    rpc.CommitUpload(
        pb.CommitUploadRequest(
            repository=repo,
            upload_id=committed.id,
            digest=str(Digest.of(b"done")),
            data=b"done",
        )
    )
    for page_size in (1, 2, 0):
        listed = all_uploads(rpc, repo, page_size or 100)
        assert [u.id for u in listed] == sorted([written.id, idle.id])
    by_id = {u.id: u for u in all_uploads(rpc, repo, 10)}
    assert by_id[written.id].offset == 100 and by_id[idle.id].offset == 0
    for upload in (written, idle):
        got = by_id[upload.id]
        assert got.repository == repo and not got.HasField("direct")
        assert got.started_at == upload.started_at
        assert got.updated_at.ToNanoseconds() >= got.started_at.ToNanoseconds()
    assert by_id[written.id].updated_at.ToNanoseconds() > written.started_at.ToNanoseconds()
    # Scoped to the repository: a token of one repository is refused for another.
    first = rpc.ListUploads(pb.ListUploadsRequest(repository=repo, page_size=1))
    with rpc_error(Code.INVALID_ARGUMENT, "PAGINATION_INVALID"):
        rpc.ListUploads(pb.ListUploadsRequest(repository=other, page_token=first.next_page_token))
    with rpc_error(Code.INVALID_ARGUMENT, "PAGINATION_INVALID"):
        rpc.ListUploads(pb.ListUploadsRequest(repository=repo, page_token="not a token!"))
    with rpc_error(Code.INVALID_ARGUMENT, "NAME_INVALID"):
        rpc.ListUploads(pb.ListUploadsRequest(repository="Not/Valid"))
    assert not rpc.ListUploads(pb.ListUploadsRequest(repository=new_repo())).uploads


def cli(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "linkedblob.cli", *args, "--addr", stack.address],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_client_and_cli_list_uploads(stack: Stack, rpc: Stub) -> None:
    repo = new_repo()
    ids = sorted(rpc.StartUpload(pb.StartUploadRequest(repository=repo)).id for _ in range(3))
    write(rpc, repo, ids[1], 0, b"12345")
    with Client(stack.address, malloc_tuning=False) as client:
        uploads = list(client.list_uploads(repo, page_size=2))
    assert [(u.id, u.offset) for u in uploads] == [(ids[0], 0), (ids[1], 5), (ids[2], 0)]
    assert all(u.updated_at is not None and u.updated_at >= u.started_at for u in uploads)

    done = cli(stack, "uploads", repo, "--json")
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [(d["id"], d["offset"], d["repository"]) for d in lines] == [
        (u.id, u.offset, repo) for u in uploads
    ]
    assert set(lines[0]) == {"id", "repository", "offset", "started_at", "updated_at"}
    for d, u in zip(lines, uploads, strict=True):
        assert datetime.datetime.fromisoformat(d["started_at"]) == u.started_at
    text = cli(stack, "uploads", repo)
    assert text.returncode == 0, text.stderr
    assert [line.split("\t")[:2] for line in text.stdout.splitlines()] == [
        [u.id, str(u.offset)] for u in uploads
    ]
    refused = cli(stack, "uploads", "Not/Valid")
    assert refused.returncode != 0 and "NAME_INVALID" in refused.stderr
    assert refused.stdout == ""

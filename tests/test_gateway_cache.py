"""The gateway's link cache with two (and three) gateways on one blobsvc + linksvc pair.

A delete through a gateway is seen by that gateway at once; another gateway sees it once its
cached answer expires (--link-cache-ttl), never later; a gateway with the cache off sees it at
once. Answers that a blob is not linked are never cached.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import time
from collections.abc import Callable, Iterator

import grpc
import pytest

from linkedblob.v1 import registry_pb2 as pb
from linkedblob.v1 import registry_pb2_grpc
from tests.services import ServiceProcess
from tests.stack import Stack, registry, rpc_error, running_stack

Code = grpc.StatusCode
Stub = registry_pb2_grpc.RegistryStub

# Long enough never to expire during a test: what this gateway shows is its cache.
FOREVER = ("--link-cache-ttl", "3600")
# Short, so that a test waits for the expiry without taking long.
BRIEF = ("--link-cache-ttl", "0.5")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack("sqlite", tmp_path_factory.mktemp("cache"), gateway_args=FOREVER) as s:
        yield s


@pytest.fixture(scope="module")
def gateways(stack: Stack) -> dict[str, ServiceProcess]:
    return {
        "brief": stack.another_gateway(enable_delete=True, args=BRIEF),
        "uncached": stack.another_gateway(enable_delete=True, args=("--link-cache-ttl", "0")),
    }


@pytest.fixture(scope="module")
def a(stack: Stack) -> Stub:
    """The stack's own gateway, caching for an hour."""
    return registry(stack.address)


@pytest.fixture(scope="module")
def brief(gateways: dict[str, ServiceProcess]) -> Stub:
    return registry(gateways["brief"].address)


@pytest.fixture(scope="module")
def uncached(gateways: dict[str, ServiceProcess]) -> Stub:
    return registry(gateways["uncached"].address)


@pytest.fixture
def repo() -> str:
    return f"cache/{secrets.token_hex(5)}"


def put(rpc: Stub, repo: str, data: bytes, media_type: str = "") -> pb.Descriptor:
    return rpc.PutBlob(pb.PutBlobRequest(repository=repo, data=data, media_type=media_type))


def stat(rpc: Stub, repo: str, digest: str) -> pb.Descriptor:
    return rpc.StatBlob(pb.StatBlobRequest(repository=repo, digest=digest))


def read(rpc: Stub, repo: str, digest: str) -> bytes:
    messages = rpc.ReadBlob(pb.ReadBlobRequest(repository=repo, digest=digest))
    return b"".join(m.data for m in messages)


def locate(rpc: Stub, repo: str, digest: str) -> pb.BlobLocation:
    return rpc.LocateBlob(pb.LocateBlobRequest(repository=repo, digest=digest))


def delete(rpc: Stub, repo: str, digest: str) -> None:
    rpc.DeleteBlob(pb.DeleteBlobRequest(repository=repo, digest=digest))


def assert_unlinked(rpc: Stub, repo: str, digest: str) -> None:
    for call in (stat, read, locate):
        with rpc_error(Code.NOT_FOUND, "BLOB_UNKNOWN"):
            call(rpc, repo, digest)


def eventually(condition: Callable[[], bool], timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def unlinked(rpc: Stub, repo: str, digest: str) -> Callable[[], bool]:
    def check() -> bool:
        try:
            stat(rpc, repo, digest)
        except grpc.RpcError as err:
            return err.code() == Code.NOT_FOUND  # type: ignore[attr-defined,no-any-return]
        return False

    return check


def test_a_delete_is_seen_at_once_through_the_same_gateway(a: Stub, repo: str) -> None:
    data = os.urandom(1000)
    desc = put(a, repo, data)
    assert stat(a, repo, desc.digest) == desc  # cached now
    assert read(a, repo, desc.digest) == data
    delete(a, repo, desc.digest)
    assert_unlinked(a, repo, desc.digest)
    with rpc_error(Code.NOT_FOUND, "BLOB_UNKNOWN"):
        delete(a, repo, desc.digest)


def test_a_delete_through_another_gateway_is_seen_within_the_ttl(
    a: Stub, brief: Stub, uncached: Stub, repo: str
) -> None:
    data = os.urandom(1000)
    desc = put(uncached, repo, data)
    for rpc in (a, brief, uncached):
        assert stat(rpc, repo, desc.digest) == desc  # each gateway caches what it saw
    delete(uncached, repo, desc.digest)
    assert_unlinked(uncached, repo, desc.digest)
    # The brief cache lets go once its entry expires ...
    assert eventually(unlinked(brief, repo, desc.digest))
    assert_unlinked(brief, repo, desc.digest)
    # ... while an hour-long one still answers from memory: the TTL is what bounds staleness.
    assert stat(a, repo, desc.digest) == desc
    assert read(a, repo, desc.digest) == data


def test_not_linked_is_never_cached(a: Stub, uncached: Stub, repo: str) -> None:
    data = os.urandom(1000)
    digest = f"sha256:{hashlib.sha256(data).hexdigest()}"
    with rpc_error(Code.NOT_FOUND, "BLOB_UNKNOWN"):
        stat(a, repo, digest)
    put(uncached, repo, data)  # through another gateway
    assert stat(a, repo, digest).size == len(data)  # seen at once


def test_a_link_through_the_gateway_refreshes_its_entry(a: Stub, repo: str) -> None:
    data = os.urandom(1000)
    first = put(a, repo, data, media_type="text/plain")
    assert stat(a, repo, first.digest).media_type == "text/plain"
    again = put(a, repo, data, media_type="application/json")  # a new media type on the link
    assert again.media_type == "application/json"
    assert stat(a, repo, first.digest).media_type == "application/json"


def test_a_mount_from_a_deleted_source_is_refused(a: Stub, repo: str) -> None:
    source, target = f"{repo}-src", f"{repo}-dst"
    desc = put(a, source, os.urandom(1000))
    mount = pb.MountBlobRequest(repository=target, from_repository=source, digest=desc.digest)
    assert a.MountBlob(mount) == desc
    assert a.MountBlob(mount) == desc  # again: nothing to do, answered from the cache
    delete(a, source, desc.digest)
    with rpc_error(Code.NOT_FOUND, "BLOB_UNKNOWN"):
        a.MountBlob(mount)
    assert stat(a, target, desc.digest) == desc  # the mount made before stays
    # A repeated mount that changes the media type goes to linksvc.
    relabelled = a.MountBlob(
        pb.MountBlobRequest(
            repository=target, from_repository="", digest=desc.digest, media_type="x/y"
        )
    )
    assert relabelled.media_type == "x/y"
    assert stat(a, target, desc.digest).media_type == "x/y"


def test_malformed_requests_are_refused_whatever_is_cached(a: Stub, repo: str) -> None:
    desc = put(a, repo, os.urandom(100))
    stat(a, repo, desc.digest)
    with rpc_error(Code.INVALID_ARGUMENT, "DIGEST_INVALID"):
        stat(a, repo, desc.digest.upper())
    with rpc_error(Code.INVALID_ARGUMENT, "NAME_INVALID"):
        stat(a, repo.upper(), desc.digest)
    with rpc_error(Code.INVALID_ARGUMENT, "RANGE_INVALID"):
        a.ReadBlob(pb.ReadBlobRequest(repository=repo, digest=desc.digest, offset=-1)).next()
    with rpc_error(Code.OUT_OF_RANGE, "RANGE_INVALID"):
        a.ReadBlob(pb.ReadBlobRequest(repository=repo, digest=desc.digest, offset=101)).next()

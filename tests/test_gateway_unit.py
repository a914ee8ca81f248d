"""Unit tests of the gateway's pure pieces: request validation, the raw handling of
data-only messages (linkedblob.wire) checked against real protobuf serialization, the link
cache and the grants it hands out."""

from __future__ import annotations

import grpc
import pytest

from gateway import validation
from gateway.direct import GrantIssuer
from gateway.linkcache import LinkCache
from gateway.server import method_handlers
from gateway.servicer import RegistryServicer
from linkedblob import grants, wire
from linkedblob.blob.v1 import blob_pb2
from linkedblob.config import MAX_CHUNK_BYTES
from linkedblob.errors import LinkedBlobError
from linkedblob.v1 import registry_pb2


def reason_of(fn: object, *args: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(LinkedBlobError) as exc_info:
        fn(*args)  # type: ignore[operator]
    return exc_info.value.code, exc_info.value.reason


# --- wire ----------------------------------------------------------------------------------------

SIZES = [0, 1, 127, 128, 16383, 16384, 1 << 20, (4 << 20) + 7]


@pytest.mark.parametrize("size", SIZES)
def test_data_payload_reads_what_protobuf_writes(size: int) -> None:
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    raw = blob_pb2.ReadResponse(data=data).SerializeToString()
    view = wire.data_payload(raw, 1)
    assert view is not None and bytes(view) == data
    assert wire.data_message(1, data) == raw
    cut = size // 3
    assert wire.data_message(1, data[:cut], memoryview(data)[cut:], b"") == raw  # pieces joined


@pytest.mark.parametrize("size", SIZES[1:])
def test_retag_gives_the_message_protobuf_would(size: int) -> None:
    data = b"\xab" * size
    raw = blob_pb2.ReadResponse(data=data).SerializeToString()
    assert wire.retag(raw, 2) == registry_pb2.ReadBlobResponse(data=data).SerializeToString()
    push = registry_pb2.PushBlobRequest(data=data).SerializeToString()
    assert wire.retag(push, 3) == blob_pb2.WriteRequest(data=data).SerializeToString()


def test_data_payload_refuses_other_shapes() -> None:
    with_blob = registry_pb2.ReadBlobResponse(
        blob=registry_pb2.Descriptor(digest="x"), data=b"abc"
    ).SerializeToString()
    assert wire.data_payload(with_blob, 2) is None
    header = registry_pb2.PushBlobRequest(
        header=registry_pb2.PushBlobRequest.Header(repository="r")
    ).SerializeToString()
    assert wire.data_payload(header, 2) is None
    raw = blob_pb2.ReadResponse(data=b"abc").SerializeToString()
    assert wire.data_payload(raw, 2) is None  # another field number
    assert wire.data_payload(raw + b"\x08\x01", 1) is None  # a trailing field
    assert wire.data_payload(raw[:-1], 1) is None  # truncated
    assert wire.data_payload(b"\x0a\xff\xff", 1) is None  # unterminated length
    first_upload = registry_pb2.WriteUploadRequest(
        repository="r", upload_id="u", offset=3, data=b"x"
    ).SerializeToString()
    assert wire.data_payload(first_upload, 4) is None


def test_only_single_byte_tags() -> None:
    with pytest.raises(ValueError):
        wire.data_message(16, b"x")


def test_the_raw_handlers_cover_every_method() -> None:
    # Every Registry method has a servicer method (no backends needed to build the table).
    handlers = method_handlers(RegistryServicer.__new__(RegistryServicer))
    names = {m.name for m in registry_pb2.DESCRIPTOR.services_by_name["Registry"].methods}
    assert set(handlers) == names
    assert handlers["ReadBlob"].response_serializer is None
    assert handlers["PushBlob"].request_deserializer is None
    assert handlers["WriteUpload"].request_deserializer is None
    assert handlers["StatBlob"].request_deserializer is not None
    assert handlers["ReadBlob"].response_streaming and not handlers["ReadBlob"].request_streaming


# --- validation ----------------------------------------------------------------------------------

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def test_upload_ids() -> None:
    assert validation.upload_id("Ab_-9") == "Ab_-9"
    assert validation.upload_id("x" * 128) == "x" * 128
    assert reason_of(validation.upload_id, "") == (INVALID, "BLOB_UPLOAD_INVALID")
    for bad in ("x" * 129, "a/b", "a b", "é"):
        assert reason_of(validation.upload_id, bad) == (
            grpc.StatusCode.NOT_FOUND,
            "BLOB_UPLOAD_UNKNOWN",
        )


def test_media_types() -> None:
    for good in ("", "text/plain", "application/vnd.oci.image.layer.v1.tar+gzip"):
        assert validation.media_type(good) == good
    for bad in ("text", "/x", "a/b/c", "a/b; charset=utf-8", "a" * 128 + "/b"):
        assert reason_of(validation.media_type, bad) == (INVALID, "NAME_INVALID")


def test_sizes_ranges_and_pages() -> None:
    validation.data_size(MAX_CHUNK_BYTES)
    assert reason_of(validation.data_size, MAX_CHUNK_BYTES + 1) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "SIZE_INVALID",
    )
    validation.read_range(0, 0)
    assert reason_of(validation.read_range, -1, 0) == (INVALID, "RANGE_INVALID")
    assert reason_of(validation.read_range, 0, -1) == (INVALID, "RANGE_INVALID")
    assert reason_of(validation.write_offset, -1) == (INVALID, "BLOB_UPLOAD_INVALID")
    assert validation.expected_size(None) is None
    assert validation.expected_size(-1) is None
    assert validation.expected_size(0) == 0
    assert reason_of(validation.expected_size, -2) == (INVALID, "SIZE_INVALID")
    validation.page(0, "")
    validation.page(1000, "t" * 1024)
    validation.page(1001, "")  # clamped to 1000 where it is used (AIP-158)
    for size, token in ((-1, ""), (-(2**31), ""), (1, "t" * 1025)):
        assert reason_of(validation.page, size, token) == (INVALID, "PAGINATION_INVALID")


# --- link cache ----------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_link_cache_entries_expire_after_the_ttl() -> None:
    clock = Clock()
    cache: LinkCache[str] = LinkCache(5.0, 10, clock)
    cache.put("repo", "d1", "one", cache.generation)
    clock.now += 4.9
    assert cache.get("repo", "d1") == "one"
    clock.now += 0.1
    assert cache.get("repo", "d1") is None
    assert len(cache) == 0  # dropped, not kept around


def test_link_cache_drops_the_least_recently_used() -> None:
    cache: LinkCache[str] = LinkCache(60.0, 2, Clock())
    cache.put("r", "a", "A")
    cache.put("r", "b", "B")
    assert cache.get("r", "a") == "A"  # a is now the most recently used
    cache.put("r", "c", "C")
    assert (cache.get("r", "a"), cache.get("r", "b"), cache.get("r", "c")) == ("A", None, "C")
    assert len(cache) == 2


def test_link_cache_invalidation_beats_an_answer_fetched_before_it() -> None:
    cache: LinkCache[str] = LinkCache(60.0, 10, Clock())
    cache.put("r", "d", "old")
    fetched_at = cache.generation  # a Resolve starts ...
    cache.invalidate("r", "d")  # ... a delete through this gateway lands ...
    cache.put("r", "d", "stale", fetched_at)  # ... and the Resolve's answer arrives
    assert cache.get("r", "d") is None
    cache.put("r", "d", "fresh", cache.generation)
    assert cache.get("r", "d") == "fresh"
    assert cache.get("other", "d") is None  # keys are (repository, digest)


@pytest.mark.parametrize(("ttl", "size"), [(0.0, 10), (5.0, 0)])
def test_link_cache_off(ttl: float, size: int) -> None:
    cache: LinkCache[str] = LinkCache(ttl, size, Clock())
    assert not cache.enabled
    cache.put("r", "d", "x")
    assert cache.get("r", "d") is None


# --- direct access -------------------------------------------------------------------------------


def test_grant_issuer_grants() -> None:
    secret = "s" * 32
    issuer = GrantIssuer(secret, "blobsvc:50052", 60.0)
    assert issuer.offered
    signer = grants.Signer(secret)
    read = issuer.read("sha256:" + "a" * 64)
    assert read.address == "blobsvc:50052"
    assert signer.check(read.grant, grants.READ, "sha256:" + "a" * 64).expires == (
        read.expires_at.seconds
    )
    write = issuer.write("upload-1")
    assert signer.check(write.grant, grants.WRITE, "upload-1")
    with pytest.raises(LinkedBlobError):
        signer.check(write.grant, grants.WRITE, "upload-2")
    internal = issuer.internal_metadata()
    assert internal is not None and internal == issuer.internal_metadata()  # reused
    ((key, token),) = internal
    assert key == grants.METADATA_KEY
    assert signer.verify(token).action == grants.INTERNAL


def test_no_secret_no_direct_access() -> None:
    issuer = GrantIssuer("", "blobsvc:50052", 60.0)
    assert not issuer.offered
    assert issuer.internal_metadata() is None
    assert reason_of(issuer.read, "sha256:" + "a" * 64) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "UNSUPPORTED",
    )
    assert reason_of(issuer.write, "upload-1") == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "UNSUPPORTED",
    )
    with pytest.raises(ValueError):
        GrantIssuer("short", "blobsvc:50052", 60.0)

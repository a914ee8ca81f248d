"""The client's channels: the one to the gateway (its unary calls, with the client's timeout and
errors, and its raw byte streams), the options every client channel shares, and how a response
stream that is not read to its end is ended."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

import grpc

from linkedblob.client.errors import rpc_errors
from linkedblob.client.model import Descriptor, Upload
from linkedblob.tls import channel_credentials
from linkedblob.transport import (
    PUSH_BLOB,
    READ_BLOB,
    WRITE_UPLOAD,
    ChannelOptions,
    channel_options,
    retrying_service_config,
)
from linkedblob.v1 import registry_pb2, registry_pb2_grpc

Request = TypeVar("Request")
Response = TypeVar("Response")
T = TypeVar("T")


# The gateway's calls that read only: gRPC retries them on UNAVAILABLE (a gateway restarting).
_RETRIED_READS = (
    "StatBlob",
    "ReadBlob",
    "LocateBlob",
    "ListBlobs",
    "ListRepositories",
    "GetUpload",
)
_GATEWAY_SERVICE_CONFIG = retrying_service_config("linkedblob.v1.Registry", _RETRIED_READS)


def client_channel_options(*extra: tuple[str, int | str]) -> ChannelOptions:
    """Options of the client's channels (to the gateway and to blobsvc): a restarted server is
    reconnected to within a second at most, and the gateway's reads are retried meanwhile."""
    options = channel_options(
        max_reconnect_backoff_ms=1_000, service_config=_GATEWAY_SERVICE_CONFIG
    )
    return [*options, *extra]


# The client's security settings, from the environment when not given.
TLS_ENV = "LINKEDBLOB_TLS"
CA_ENV = "LINKEDBLOB_CA"
CERT_ENV = "LINKEDBLOB_CERT"
KEY_ENV = "LINKEDBLOB_KEY"
TOKEN_ENV = "LINKEDBLOB_TOKEN"


@dataclass(frozen=True)
class Security:
    """How the client reaches the gateway: TLS (``ca``: the roots its certificate chains to,
    empty for the system's; ``cert`` and ``key``: a client certificate), and a bearer token
    sent as ``authorization: Bearer <token>`` on every call. A ``ca``, ``cert`` or ``key``
    implies TLS. The direct path to blobsvc uses TLS with the same roots when this does."""

    tls: bool = False
    ca: str = ""
    cert: str = ""
    key: str = ""
    token: str = ""

    @classmethod
    def resolve(
        cls,
        tls: bool | None = None,
        ca: str | None = None,
        cert: str | None = None,
        key: str | None = None,
        token: str | None = None,
    ) -> Security:
        """Each setting not given (None) from LINKEDBLOB_TLS, _CA, _CERT, _KEY, _TOKEN."""
        env = os.environ
        if tls is None:
            tls = env.get(TLS_ENV, "").strip().lower() in ("1", "true", "yes", "on")
        ca = env.get(CA_ENV, "") if ca is None else ca
        cert = env.get(CERT_ENV, "") if cert is None else cert
        key = env.get(KEY_ENV, "") if key is None else key
        token = env.get(TOKEN_ENV, "") if token is None else token
        return cls(tls or bool(ca or cert or key), ca, cert, key, token.strip())


class _Metadata(NamedTuple):
    method: str
    timeout: float | None
    metadata: Any
    credentials: Any
    wait_for_ready: Any
    compression: Any


class _TokenMetadata(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds ``authorization`` to every call: the token on a plaintext loopback channel, where
    gRPC refuses call credentials."""

    def __init__(self, token: str) -> None:
        self._entry = ("authorization", f"Bearer {token}")

    def _details(self, details: Any) -> Any:
        metadata = [*(details.metadata or ()), self._entry]
        return _Metadata(
            details.method,
            details.timeout,
            metadata,
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)


def _loopback(addr: str) -> bool:
    """Whether every address the gRPC target ``addr`` names is a loopback one: ``host:port``,
    ``dns:///host:port`` (``dns://resolver/host:port``), ``ipv4:a:port,b:port``, ``ipv6:...``."""
    if addr.startswith("dns:"):
        addr = addr.removeprefix("dns:").removeprefix("//").split("/", 1)[-1]
        return _loopback_host(addr)
    scheme, _, rest = addr.partition(":")
    if scheme in ("ipv4", "ipv6"):
        return all(_loopback_host(part) for part in rest.split(","))
    return _loopback_host(addr)


def _loopback_host(hostport: str) -> bool:
    host = hostport
    if hostport.startswith("["):
        host = hostport[1:].split("]", 1)[0]
    elif hostport.count(":") == 1:
        host = hostport.rsplit(":", 1)[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def gateway_channel(addr: str, security: Security) -> grpc.Channel:
    """The channel to the gateway that ``security`` asks for. A token on a plaintext channel
    only to a loopback address (ValueError otherwise: it would cross the network in clear)."""
    options = client_channel_options()
    if security.tls:
        credentials = channel_credentials(security.ca, security.cert, security.key)
        if security.token:
            credentials = grpc.composite_channel_credentials(
                credentials, grpc.access_token_call_credentials(security.token)
            )
        return grpc.secure_channel(addr, credentials, options=options)
    channel = grpc.insecure_channel(addr, options=options)
    if not security.token:
        return channel
    if not _loopback(addr):
        channel.close()
        raise ValueError(f"a token is sent to {addr} only over TLS (--tls, LINKEDBLOB_TLS)")
    return grpc.intercept_channel(channel, _TokenMetadata(security.token))


class Gateway:
    """One channel to the gateway; safe to share between threads. Each unary call is bounded by
    ``timeout`` and raises ClientError."""

    def __init__(self, addr: str, timeout: float | None, security: Security | None = None) -> None:
        self.addr = addr
        self.timeout = timeout
        self.security = security or Security()
        self.channel = gateway_channel(addr, self.security)
        # The direct path's TLS to blobsvc: the same roots, no token (None: plaintext).
        self.blobsvc_credentials = (
            channel_credentials(self.security.ca, self.security.cert, self.security.key)
            if self.security.tls
            else None
        )
        self.stub = registry_pb2_grpc.RegistryStub(self.channel)
        # The byte streams, with their data messages built and read without protobuf objects.
        self.push_blob = self.channel.stream_unary(
            PUSH_BLOB,
            request_serializer=None,
            response_deserializer=registry_pb2.Descriptor.FromString,
        )
        self.write_upload = self.channel.stream_unary(
            WRITE_UPLOAD,
            request_serializer=None,
            response_deserializer=registry_pb2.Upload.FromString,
        )
        self.read_blob = self.channel.unary_stream(
            READ_BLOB,
            request_serializer=registry_pb2.ReadBlobRequest.SerializeToString,
            response_deserializer=None,
        )

    def close(self) -> None:
        self.channel.close()

    def call(
        self, method: grpc.UnaryUnaryMultiCallable[Request, Response], request: Request
    ) -> Response:
        """A unary call of the Registry (``method``, a multicallable of :attr:`stub`)."""
        with rpc_errors():
            return method(request, timeout=self.timeout)

    def stat(self, repository: str, digest: str) -> Descriptor:
        request = registry_pb2.StatBlobRequest(repository=repository, digest=digest)
        return Descriptor.from_proto(self.call(self.stub.StatBlob, request))

    def put(self, repository: str, data: bytes, media_type: str, digest: str) -> Descriptor:
        request = registry_pb2.PutBlobRequest(
            repository=repository, data=data, media_type=media_type, digest=digest
        )
        return Descriptor.from_proto(self.call(self.stub.PutBlob, request))

    def mount(
        self, repository: str, digest: str, from_repository: str, media_type: str
    ) -> Descriptor:
        request = registry_pb2.MountBlobRequest(
            repository=repository,
            from_repository=from_repository,
            digest=digest,
            media_type=media_type,
        )
        return Descriptor.from_proto(self.call(self.stub.MountBlob, request))

    def delete(self, repository: str, digest: str) -> None:
        request = registry_pb2.DeleteBlobRequest(repository=repository, digest=digest)
        self.call(self.stub.DeleteBlob, request)

    def list_blobs(self, repository: str, page_size: int) -> Iterator[Descriptor]:
        def page(token: str) -> tuple[Iterable[Descriptor], str]:
            request = registry_pb2.ListBlobsRequest(
                repository=repository, page_size=page_size, page_token=token
            )
            msg = self.call(self.stub.ListBlobs, request)
            return (Descriptor.from_proto(b) for b in msg.blobs), msg.next_page_token

        return _paged(page)

    def list_repositories(self, page_size: int) -> Iterator[str]:
        def page(token: str) -> tuple[Iterable[str], str]:
            request = registry_pb2.ListRepositoriesRequest(page_size=page_size, page_token=token)
            msg = self.call(self.stub.ListRepositories, request)
            return msg.repositories, msg.next_page_token

        return _paged(page)

    def start_upload(self, repository: str, direct: bool) -> Upload:
        request = registry_pb2.StartUploadRequest(repository=repository, direct=direct)
        return Upload.from_proto(self.call(self.stub.StartUpload, request))

    def get_upload(self, repository: str, upload_id: str, direct: bool) -> Upload:
        request = registry_pb2.GetUploadRequest(
            repository=repository, upload_id=upload_id, direct=direct
        )
        return Upload.from_proto(self.call(self.stub.GetUpload, request))

    def commit_upload(self, request: registry_pb2.CommitUploadRequest) -> Descriptor:
        return Descriptor.from_proto(self.call(self.stub.CommitUpload, request))

    def cancel_upload(self, repository: str, upload_id: str) -> None:
        request = registry_pb2.CancelUploadRequest(repository=repository, upload_id=upload_id)
        self.call(self.stub.CancelUpload, request)

    def locate(self, repository: str, digest: str) -> registry_pb2.BlobLocation:
        request = registry_pb2.LocateBlobRequest(repository=repository, digest=digest)
        return self.call(self.stub.LocateBlob, request)


def _paged(page: Callable[[str], tuple[Iterable[T], str]]) -> Iterator[T]:
    """The items of every page, fetched as iterated: ``page(token)`` gives a page's items and
    the next page's token ("" after the last)."""
    token = ""
    while True:
        items, token = page(token)
        yield from items
        if not token:
            return


def end_read(stream: Any) -> None:
    """Cancels a response stream that was not read to its end (a no-op when it was), which
    stops the transfer, and lets grpc free the call.

    A stream read in the caller's thread (linkedblob.client.direct.READ_IN_CALLER) is driven
    by its reader alone: grpc keeps an abandoned call, and its memory (measured:
    bench/README.md), until the events of its cancellation are consumed, which takes one wait
    at most. ``_state`` and ``_consume_next_event`` are private to grpc's
    _SingleThreadedRendezvous (as of grpcio 1.85): without them the call is only cancelled.
    """
    if not stream.cancel():
        return
    pending = getattr(getattr(stream, "_state", None), "due", None)
    consume = getattr(stream, "_consume_next_event", None)
    if pending is None or consume is None:
        return
    while pending:  # a cancel completes every pending operation at once
        consume()

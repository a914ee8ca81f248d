"""The gateway's domain values: blobs, links, upload sessions, pages, and byte streams to relay.

Plain values with no gRPC or protobuf types: the domain (gateway.registry, gateway.uploads) and
the backends (gateway.backends) speak in these; the servicer maps them to and from messages.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

Item = TypeVar("Item")


@dataclass(frozen=True, slots=True)
class BlobDescriptor:
    """A blob as the store (or linksvc's blob index) knows it: its digest and size."""

    digest: str
    size: int


@dataclass(frozen=True, slots=True)
class LinkedBlob:
    """A blob as a repository links it: with the media type the link gives it."""

    digest: str
    size: int
    media_type: str


class SessionState(enum.Enum):
    ACTIVE = "active"
    COMMITTED = "committed"
    CANCELLED = "cancelled"


@dataclass(frozen=True, slots=True)
class UploadSession:
    """linksvc's record of a resumable upload; the bytes themselves are staged in blobsvc."""

    id: str
    repository: str
    size: int  # bytes recorded as written (blobsvc's staged size is the truth)
    state: SessionState
    started_at_ns: int  # nanoseconds since the epoch
    updated_at_ns: int = 0  # its last write (or its start); 0: not known


@dataclass(frozen=True, slots=True)
class Lease:
    """linksvc's protection of a digest from garbage collection while its bytes are committed
    in blobsvc and linked (Link consumes it)."""

    id: str
    expires_at_ns: int  # nanoseconds since the epoch (the clock of the link backend)


@dataclass(frozen=True, slots=True)
class Page(Generic[Item]):
    items: list[Item]
    next_page_token: str


@dataclass(frozen=True, slots=True)
class CommitSpec:
    """What a write that commits expects of the staged bytes."""

    digest: str  # "": whatever they hash to (with ``algorithm``)
    size: int | None = None  # None: unchecked
    algorithm: str = ""  # "": the default (or the digest's)


@dataclass(frozen=True, slots=True)
class Written:
    """The outcome of a write: the bytes now staged, and the blob if it committed (else, when
    asked for, the digest of all the staged bytes)."""

    size: int
    blob: BlobDescriptor | None = None
    staged_digest: str = ""


@dataclass(frozen=True, slots=True)
class IncomingData:
    """A caller's data messages, serialized as they arrived, to relay without parsing them.

    A message holding only the data field is re-tagged for the next hop (linkedblob.wire);
    any other shape is read with ``parse`` (the slow path). Whoever takes the data calls
    ``check_size`` with each message's data size (it raises for one over the caller's limit):
    the servicer sets the limit, the backend checks it where it has the size at hand, with no
    extra pass over the messages.
    """

    messages: AsyncIterator[bytes]
    data_field: int  # the number of the data field in the caller's messages
    parse: Callable[[bytes], bytes]
    method: str  # the public method, for the byte counters
    check_size: Callable[[int], None]


@dataclass(frozen=True, slots=True)
class OutgoingData:
    """How a caller takes a blob's bytes: data-only messages with their data in ``data_field``,
    the first one after ``head`` (a serialized message of the caller's, sent with it)."""

    data_field: int
    head: bytes
    method: str  # the public method, for the byte counters

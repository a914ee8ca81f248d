"""What the client's calls take and return: descriptors, uploads, direct grants, and the kinds
of sources, destinations and progress callbacks."""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass
from typing import IO

from linkedblob import grants
from linkedblob.v1 import registry_pb2

Source = str | os.PathLike[str] | bytes | bytearray | memoryview | IO[bytes] | Iterable[bytes]
Destination = str | os.PathLike[str] | IO[bytes]
# Called with the number of bytes just transferred (negative when a resumed push rewinds).
Progress = Callable[[int], None]
# The data of a read: views into the received messages (no copies).
Chunks = Generator[memoryview, None, None]


@dataclass(frozen=True)
class Descriptor:
    digest: str
    size: int
    media_type: str = ""

    @classmethod
    def from_proto(cls, msg: registry_pb2.Descriptor) -> Descriptor:
        return cls(msg.digest, msg.size, msg.media_type)


@dataclass(frozen=True)
class DirectGrant:
    """Where and with what grant to reach blobsvc directly (see linkedblob.grants): the
    client's reading of the gateway's registry_pb2.DirectAccess."""

    address: str
    grant: str
    expires_at: datetime.datetime

    @classmethod
    def from_proto(cls, msg: registry_pb2.DirectAccess) -> DirectGrant | None:
        if not msg.address or not msg.grant:
            return None
        return cls(msg.address, msg.grant, msg.expires_at.ToDatetime(tzinfo=datetime.UTC))

    @property
    def metadata(self) -> tuple[tuple[str, str]]:
        return ((grants.METADATA_KEY, self.grant),)


@dataclass(frozen=True)
class Upload:
    id: str
    repository: str
    offset: int
    started_at: datetime.datetime
    # Set when the upload was started or looked up with direct access.
    direct: DirectGrant | None = None
    # Its last write (or its start); set by Client.list_uploads only.
    updated_at: datetime.datetime | None = None

    @classmethod
    def from_proto(cls, msg: registry_pb2.Upload) -> Upload:
        started = msg.started_at.ToDatetime(tzinfo=datetime.UTC)
        direct = DirectGrant.from_proto(msg.direct) if msg.HasField("direct") else None
        updated = (
            msg.updated_at.ToDatetime(tzinfo=datetime.UTC) if msg.HasField("updated_at") else None
        )
        return cls(msg.id, msg.repository, msg.offset, started, direct, updated)

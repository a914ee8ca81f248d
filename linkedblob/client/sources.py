"""What a push reads from (a path, bytes, a binary file or an iterable of bytes) and how what it
reads is framed into the messages of a client-streaming call."""

from __future__ import annotations

import hashlib
import itertools
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any, TypeVar

from linkedblob import wire
from linkedblob.client.errors import ClientError, rpc_errors
from linkedblob.client.model import Progress, Source
from linkedblob.config import MAX_CHUNK_BYTES, STREAM_CHUNK_BYTES

T = TypeVar("T")
Pieces = Iterable[bytes | memoryview]


@dataclass
class SourceReader:
    """Reads a push's source: a path, bytes, a binary file or an iterable of bytes."""

    obj: Source
    size: int | None = None
    view: memoryview | None = None
    file: IO[bytes] | None = None
    base: int = 0  # where the blob starts in `file`
    pos: int = 0  # where chunks() starts, from the blob's start (seek)
    owned: bool = False
    started: bool = False  # whether chunks() was called (an iterable is then partly spent)
    _iterable: Iterable[bytes] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        obj = self.obj
        if isinstance(obj, (str, os.PathLike)):
            self.file = open(obj, "rb")  # noqa: SIM115 - closed by __exit__
            self.owned = True
        elif isinstance(obj, (bytes, bytearray, memoryview)):
            self.view = memoryview(obj).cast("B")
            self.size = len(self.view)
            return
        elif hasattr(obj, "read"):
            self.file = obj  # type: ignore[assignment]
        else:
            self._iterable = obj
            return
        assert self.file is not None
        if self.file.seekable():
            self.base = self.file.tell()
            end = self.file.seek(0, os.SEEK_END)
            self.file.seek(self.base)
            self.size = end - self.base

    def __enter__(self) -> SourceReader:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.owned and self.file is not None:
            self.file.close()

    @property
    def seekable(self) -> bool:
        return self.view is not None or (self.file is not None and self.file.seekable())

    def seek(self, offset: int) -> None:
        self.pos = offset
        if self.file is not None:
            self.file.seek(self.base + offset)

    def rewind(self) -> bool:
        """Back to the blob's start, to send it again; False when that cannot be done (an
        iterable or an unseekable file that was read from)."""
        if self.seekable:
            self.seek(0)
            return True
        return not self.started

    def small_content(self, limit: int) -> bytes | None:
        """For an iterable source: all of it when it is at most ``limit`` bytes; otherwise
        None, and chunks() still yields everything (what was looked at is kept, at most
        ``limit`` bytes and one item more)."""
        if self._iterable is None:
            return None
        rest = iter(self._iterable)
        taken: list[bytes] = []
        total = 0
        for item in rest:
            taken.append(item)
            total += memoryview(item).nbytes
            if total > limit:
                self._iterable = itertools.chain(taken, rest)
                return None
        self._iterable = ()
        return b"".join(taken)

    def read_all(self) -> bytes:
        """Everything (for a small source of known size)."""
        return b"".join(bytes(chunk) for chunk in self.chunks(MAX_CHUNK_BYTES))

    def chunks(self, size: int) -> Iterator[bytes | memoryview]:
        self.started = True
        if self.view is not None:
            for pos in range(self.pos, len(self.view), size):
                yield self.view[pos : pos + size]
        elif self.file is not None:
            while chunk := self.file.read(size):
                yield chunk
        else:
            assert self._iterable is not None
            for item in self._iterable:
                view = memoryview(item).cast("B")
                for pos in range(0, len(view), size):
                    yield view[pos : pos + size]


def hashed_chunks(
    src: SourceReader, size: int, hasher: Any | None, progress: Progress | None
) -> Iterator[bytes | memoryview]:
    """The source's chunks, each added to ``hasher`` (when given) before it is sent and
    reported to ``progress`` once taken."""
    for chunk in src.chunks(size):
        if hasher is not None:
            hasher.update(chunk)
        yield chunk
        if progress:
            progress(len(chunk))


class RewindableHash:
    """A sha256 of the bytes sent so far that can go back to an earlier offset (after a
    resumed push lost chunks in flight) by re-reading the source up to it."""

    def __init__(self, src: SourceReader) -> None:
        self.src = src
        self.hasher = hashlib.sha256()
        self.position = 0

    def update(self, chunk: bytes | memoryview) -> None:
        self.hasher.update(chunk)
        self.position += len(chunk)

    def rewind(self, offset: int) -> None:
        if offset == self.position:
            return
        self.hasher = hashlib.sha256()
        self.position = 0
        self.src.seek(0)
        for chunk in self.src.chunks(STREAM_CHUNK_BYTES):
            take = min(len(chunk), offset - self.position)
            self.update(memoryview(chunk)[:take])
            if self.position == offset:
                break
        self.src.seek(offset)

    def hexdigest(self) -> str:
        return f"sha256:{self.hasher.hexdigest()}"


def data_messages(field: int, chunks: Pieces, size: int) -> Iterator[bytes]:
    """Data-only messages (see linkedblob.wire) carrying ``chunks`` in payloads of ``size``
    bytes (the last one shorter): smaller pieces are joined and bigger ones cut, in the one
    copy that framing makes anyway. Sending small pieces one a message costs the client and
    blobsvc several times the CPU (measured: bench/README.md)."""
    pending: list[memoryview] = []
    pending_bytes = 0
    for chunk in chunks:
        view = memoryview(chunk).cast("B")
        while view:
            piece = view[: size - pending_bytes]
            view = view[len(piece) :]
            pending.append(piece)
            pending_bytes += len(piece)
            if pending_bytes == size:
                yield wire.data_message(field, *pending)
                pending.clear()
                pending_bytes = 0
    if pending_bytes:
        yield wire.data_message(field, *pending)


class RequestStream:
    """The requests of a client-streaming byte call: ``header`` (serialized), then ``chunks``
    in data messages of ``size`` bytes in field ``field``.

    An exception the source raises while grpc iterates (which grpc itself reports only as
    "exception iterating requests") comes out of :meth:`send` as it was raised.
    """

    def __init__(self, header: bytes, field: int, chunks: Pieces, size: int) -> None:
        self.header = header
        self.field = field
        self.chunks = chunks
        self.size = size
        self.failure: BaseException | None = None

    def _messages(self) -> Iterator[bytes]:
        yield self.header
        try:
            yield from data_messages(self.field, self.chunks, self.size)
        except Exception as exc:
            self.failure = exc
            raise

    def send(self, call: Callable[[Iterator[bytes]], T]) -> T:
        """``call(requests)``; ClientError when the call fails, the source's own exception
        when it is what failed."""
        try:
            with rpc_errors():
                return call(self._messages())
        except ClientError:
            if self.failure is not None:
                raise self.failure from None
            raise

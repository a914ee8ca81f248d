"""The gateway's limits on what one caller can hold: idle upload streams, open uploads (per
repository and in total) and the rate of new upload sessions.

They wrap the Registry's method handlers (:meth:`Limits.wrap`, in gateway.server), so the
servicer and the domain stay as they are:

- **Idle streams** (``--idle-stream-timeout``): a PushBlob or WriteUpload stream whose caller
  sends no message for that long, the first one included, ends with RESOURCE_EXHAUSTED /
  STREAM_IDLE. Only the time spent waiting for the caller counts (not the time the gateway
  waits for blobsvc). The error surfaces in the servicer where it reads the stream, so the
  relay cancels its blobsvc Write and the domain aborts the staging area as on any failure
  (gateway.registry ``_drop_staging``; a resumable upload keeps its staged bytes, as after a
  broken connection).
- **Open uploads** (``--max-open-uploads``, ``--max-uploads-per-repository``): PushBlob and
  WriteUpload streams in progress, counted from their first message (which names the
  repository) to their end. One more is refused with RESOURCE_EXHAUSTED / TOO_MANY_REQUESTS and
  ErrorInfo metadata ``limit`` naming the limit, before anything is staged.
- **Session rate** (``--session-rate``, ``--session-burst``): StartUpload calls per second of
  one caller: a token bucket per caller identity (linkedblob.caller, set when the servicer
  authenticated the call), or for an anonymous caller per peer address without its port. It is
  taken where the domain starts the session (:meth:`Limits.limit_session_starts`), after
  authentication and validation.

A refusal is raised inside the servicer method (from the request stream, or from the domain's
start of a session), so it is mapped, counted and access-logged like every other answer;
everyone else is served as before. (Sessions open per repository are counted by linksvc, in
the transaction that creates one: ``--max-sessions-per-repository`` of `serve link`.)
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import DecodeError

from gateway.model import UploadSession
from gateway.options import (
    DEFAULT_MAX_OPEN_UPLOADS,
    DEFAULT_MAX_UPLOADS_PER_REPOSITORY,
    DEFAULT_SESSION_BURST,
    DEFAULT_SESSION_RATE,
)
from gateway.uploads import Uploads
from linkedblob.caller import caller
from linkedblob.errors import LinkedBlobError, Reason, resource_exhausted
from linkedblob.limits import TokenBucket
from linkedblob.v1 import registry_pb2

# The address (without port) of the peer of the StartUpload call in progress: the session
# rate's key for a caller with no identity.
_PEER_HOST: contextvars.ContextVar[str] = contextvars.ContextVar("gateway_peer_host", default="")

# The repository a byte stream's first message names ("" when it does not parse: the servicer
# refuses it right after).
_UPLOAD_STREAMS: dict[str, Callable[[bytes], str]] = {
    "PushBlob": lambda raw: registry_pb2.PushBlobRequest.FromString(raw).header.repository,
    "WriteUpload": lambda raw: registry_pb2.WriteUploadRequest.FromString(raw).repository,
}


@dataclass(frozen=True)
class LimitSettings:
    idle_stream_timeout: float = 60.0  # seconds; 0: off
    max_open_uploads: int = DEFAULT_MAX_OPEN_UPLOADS  # 0: off
    max_uploads_per_repository: int = DEFAULT_MAX_UPLOADS_PER_REPOSITORY  # 0: off
    session_rate: float = DEFAULT_SESSION_RATE  # per second per caller; 0: off
    session_burst: int = DEFAULT_SESSION_BURST

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> LimitSettings:
        return cls(
            idle_stream_timeout=args.idle_stream_timeout,
            max_open_uploads=args.max_open_uploads,
            max_uploads_per_repository=args.max_uploads_per_repository,
            session_rate=args.session_rate,
            session_burst=args.session_burst,
        )


def too_many(limit: str, message: str) -> LinkedBlobError:
    return resource_exhausted(Reason.TOO_MANY_REQUESTS, message, limit=limit)


def peer_host(peer: str) -> str:
    """``ipv4:10.0.0.1:5555`` -> ``ipv4:10.0.0.1`` (a caller's connections share it)."""
    host, sep, port = peer.rpartition(":")
    return host if sep and port.isdigit() else peer


class Limits:
    """The counters and buckets of one gateway process (on its event loop: no locks)."""

    def __init__(self, settings: LimitSettings) -> None:
        self.settings = settings
        self.open_uploads = 0
        self.open_by_repository: dict[str, int] = {}
        self._sessions = (
            TokenBucket(settings.session_rate, settings.session_burst)
            if settings.session_rate > 0
            else None
        )

    def wrap(self, handlers: dict[str, Any]) -> dict[str, Any]:
        """The Registry's handlers with the limits in front of the methods they apply to."""
        out = dict(handlers)
        for name, repository_of in _UPLOAD_STREAMS.items():
            handler = handlers[name]
            out[name] = handler._replace(
                stream_unary=self._upload_stream(handler.stream_unary, repository_of)
            )
        start = handlers["StartUpload"]
        out["StartUpload"] = start._replace(unary_unary=self._session_start(start.unary_unary))
        return out

    # --- open uploads and idle streams --------------------------------------------------------

    def _upload_stream(
        self, behaviour: Callable[..., Any], repository_of: Callable[[bytes], str]
    ) -> Callable[..., Any]:
        async def limited(request_iterator: AsyncIterator[bytes], context: Any) -> Any:
            held: list[str] = []  # the repository whose upload slot this call holds
            try:
                return await behaviour(
                    self._guarded(request_iterator, repository_of, held), context
                )
            finally:
                if held:
                    self._release(held[0])

        return limited

    async def _guarded(
        self,
        requests: AsyncIterator[bytes],
        repository_of: Callable[[bytes], str],
        held: list[str],
    ) -> AsyncIterator[bytes]:
        """The stream's messages, each awaited for at most the idle timeout; an upload slot
        taken at the first (raises when none is free)."""
        messages = aiter(requests)
        timeout = self.settings.idle_stream_timeout or None
        first = await self._next(messages, timeout)
        if first is None:
            return
        try:
            repository = repository_of(first)
        except DecodeError:
            repository = ""
        self._acquire(repository)
        held.append(repository)
        yield first
        while (message := await self._next(messages, timeout)) is not None:
            yield message

    @staticmethod
    async def _next(messages: AsyncIterator[bytes], idle: float | None) -> bytes | None:
        if idle is None:
            return await anext(messages, None)
        try:
            async with asyncio.timeout(idle):
                return await anext(messages, None)
        except TimeoutError:
            raise resource_exhausted(
                Reason.STREAM_IDLE,
                f"the stream sent nothing for {idle:g}s (--idle-stream-timeout)",
                limit="idle-stream-timeout",
            ) from None

    def _acquire(self, repository: str) -> None:
        settings = self.settings
        if settings.max_open_uploads and self.open_uploads >= settings.max_open_uploads:
            raise too_many(
                "max-open-uploads",
                f"{self.open_uploads} uploads are in progress, the most this gateway takes; "
                "retry later",
            )
        in_repository = self.open_by_repository.get(repository, 0)
        per_repository = settings.max_uploads_per_repository
        if per_repository and in_repository >= per_repository:
            raise too_many(
                "max-uploads-per-repository",
                f"{in_repository} uploads into this repository are in progress, the most "
                "this gateway takes; retry later",
            )
        self.open_uploads += 1
        self.open_by_repository[repository] = in_repository + 1

    def _release(self, repository: str) -> None:
        self.open_uploads -= 1
        left = self.open_by_repository[repository] - 1
        if left:
            self.open_by_repository[repository] = left
        else:
            del self.open_by_repository[repository]

    # --- session rate -------------------------------------------------------------------------

    def _session_start(self, behaviour: Callable[..., Any]) -> Callable[..., Any]:
        """StartUpload, with its peer's address noted for the session rate's key."""
        if self._sessions is None:
            return behaviour

        async def noting_peer(request: Any, context: Any) -> Any:
            _PEER_HOST.set(peer_host(context.peer() or ""))
            return await behaviour(request, context)

        return noting_peer

    def limit_session_starts(self, uploads: Uploads) -> Uploads:
        """``uploads`` whose start() first takes a token of the caller's bucket. There, inside
        the servicer method, the call is authenticated (linkedblob.caller is set), so the key
        is the caller's identity; for an anonymous caller, its address (noted by the
        StartUpload handler)."""
        buckets = self._sessions
        if buckets is None:
            return uploads
        start = uploads.start

        async def limited_start(repository: str) -> UploadSession:
            if not buckets.take(caller() or _PEER_HOST.get()):
                raise too_many(
                    "session-rate", "too many uploads started; retry later (--session-rate)"
                )
            return await start(repository)

        # An instance attribute in front of the method: the domain class stays as it is.
        uploads.start = limited_start  # type: ignore[method-assign]
        return uploads

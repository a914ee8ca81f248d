"""blobsvc's own limits on Write streams, so that no client exhausts it and everyone else is
still served: an idle stream is ended (``--idle-stream-timeout``), and the Write streams in
flight are counted (``--max-open-uploads``). Each refusal is RESOURCE_EXHAUSTED with a reason.
What happens to an ended stream's staging area is blobsvc.store's rule: a resumable upload
keeps what was written, a one-shot Write (commit asked in its first message) is dropped."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

from linkedblob.config import add_duration_option, add_option
from linkedblob.errors import Reason, resource_exhausted

DEFAULT_IDLE_STREAM_TIMEOUT = "60s"
DEFAULT_MAX_OPEN_UPLOADS = 1024


def add_limit_options(parser: argparse.ArgumentParser) -> None:
    add_duration_option(
        parser,
        "--idle-stream-timeout",
        default=DEFAULT_IDLE_STREAM_TIMEOUT,
        help="a Write stream that sends nothing this long is ended (RESOURCE_EXHAUSTED / "
        "STREAM_IDLE): a resumable upload keeps what was written, a one-shot write is "
        "dropped; 0 never",
    )
    add_option(
        parser,
        "--max-open-uploads",
        type=int,
        default=DEFAULT_MAX_OPEN_UPLOADS,
        help="Write streams in flight at once, in total; the next is refused "
        "(RESOURCE_EXHAUSTED / TOO_MANY_REQUESTS, limit=max-open-uploads); 0: no limit",
    )


class StreamLimits:
    """``idle_timeout`` seconds (0: none) and ``max_open_uploads`` (0: none)."""

    def __init__(self, idle_timeout: float = 0.0, max_open_uploads: int = 0) -> None:
        self.idle_timeout = idle_timeout
        self.max_open_uploads = max_open_uploads
        self.open_uploads = 0

    @contextmanager
    def open_upload(self) -> Iterator[None]:
        """Counts a Write stream for as long as it runs; refused beyond the limit."""
        if self.max_open_uploads and self.open_uploads >= self.max_open_uploads:
            raise resource_exhausted(
                Reason.TOO_MANY_REQUESTS,
                f"too many uploads in progress (at most {self.max_open_uploads}); retry later",
                limit="max-open-uploads",
            )
        self.open_uploads += 1
        try:
            yield
        finally:
            self.open_uploads -= 1

    async def idle(self, messages: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """``messages``, ending the stream when the next one takes longer than the timeout."""
        if not self.idle_timeout:
            async for raw in messages:
                yield raw
            return
        while True:
            try:
                async with asyncio.timeout(self.idle_timeout):  # no task per message
                    raw = await anext(messages)
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise resource_exhausted(
                    Reason.STREAM_IDLE,
                    f"nothing received for {self.idle_timeout:g} seconds; stream ended",
                    limit="idle-stream-timeout",
                    idle_seconds=f"{self.idle_timeout:g}",
                ) from None
            yield raw

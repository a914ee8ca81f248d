"""Awaiting jobs that run in worker threads, safely under cancellation.

A thread cannot be stopped: a job that has started may still use what the awaiting task is
about to release (an upload's file and claim), so cancellation waits for it to end.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Future
from typing import TypeVar

T = TypeVar("T")


async def outcome(job: Future[T]) -> T:
    """The worker job's result. When the awaiting task is cancelled, a job that has not
    started is dropped; one that has is waited for before CancelledError goes on, because a
    thread cannot be stopped and the job may use what the caller's finally blocks are about to
    release (an upload's file and claim: closing them under a running append or commit lets
    a second stream in while the first one's bytes still land)."""
    try:
        return await asyncio.wrap_future(job)
    except asyncio.CancelledError:
        await finished(job)
        raise


async def finished(job: Future[T]) -> None:
    """Drops the job if it has not started, else waits for it to end (through cancellation:
    CancelledError is raised after it has)."""
    if not job.cancel():
        await settle(asyncio.wrap_future(job))


async def settle(future: asyncio.Future[T]) -> None:
    """Waits for a worker to finish even if this task is being cancelled: the worker still
    uses the file we are about to close. Its own outcome is not ours to report here."""
    cancelled = False
    while not future.done():
        try:
            await asyncio.wait([future])
        except asyncio.CancelledError:
            cancelled = True
    if not future.cancelled():
        future.exception()  # retrieved, so asyncio does not log it as never retrieved
    if cancelled:
        raise asyncio.CancelledError


async def finish(futures: list[asyncio.Future[None]], keep: int = 0) -> None:
    """Awaits the oldest futures until at most ``keep`` are left, removing each once it
    succeeded (on a failure the caller settles the rest)."""
    while len(futures) > keep:
        await futures[0]
        futures.pop(0)

"""Process-level tuning every server applies at start (and the client, see
linkedblob.client.Client)."""

from __future__ import annotations

import logging
import threading

from linkedblob.libc import libc as _libc

log = logging.getLogger(__name__)

# From glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


# tune_malloc's result once it has run in this process (None: not yet).
_tuned: bool | None = None
_tune_lock = threading.Lock()


def tune_malloc() -> bool:
    """Keeps glibc from mmap-ing and unmapping every large message buffer.

    With the default (dynamic) thresholds each ~1 MiB gRPC message is a fresh mmap and the
    process spends its time in page faults; raising the mmap threshold to 64 MiB and the trim
    threshold to 1 GiB lets the heap reuse those buffers, for much higher streaming throughput
    (bench/README.md, "malloc tuning"). No-op off glibc.

    A lower trim threshold does not bring the memory back: it only governs the top of the main
    heap, while the freed buffers sit in the middle of it and in thread arenas, and a low one
    costs streaming throughput (bench/README.md, "malloc tuning"). What hands them back is
    :func:`release_free_memory`, which the servers call once they go quiet (see
    linkedblob.server).

    Runs once per process: later calls (from any thread) return the first call's result.
    """
    global _tuned
    with _tune_lock:
        if _tuned is None:
            _tuned = _set_streaming_thresholds()
        return _tuned


def _set_streaming_thresholds() -> bool:
    libc = _libc()
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    ok = bool(mallopt(_M_MMAP_THRESHOLD, 64 * 1024 * 1024)) and bool(
        mallopt(_M_TRIM_THRESHOLD, 1024 * 1024 * 1024)
    )
    if not ok:
        log.warning("mallopt refused the streaming thresholds")
    return ok


def release_free_memory() -> bool:
    """malloc_trim(0): returns the free pages of every malloc arena to the OS (most of what a
    burst of concurrent Writes left: bench/README.md, "idle trim"). It walks the whole heap
    under the arenas' locks, so call it when the process is idle, not between messages. No-op
    off glibc."""
    libc = _libc()
    try:
        return bool(libc is not None and libc.malloc_trim(0))
    except AttributeError:
        return False


def limit_malloc_arenas(arenas: int) -> bool:
    """mallopt(M_ARENA_MAX): applies to arenas created from now on. No-op off glibc.

    glibc gives each thread that contends for malloc an arena of its own (up to 8 per core), and
    each arena grows to its own peak: with grpc's threads allocating message buffers that the
    event loop frees, the footprint becomes a sum of peaks."""
    libc = _libc()
    try:
        return bool(libc is not None and libc.mallopt(_M_ARENA_MAX, arenas))
    except AttributeError:
        return False

"""Process-level tuning every server applies at start. The client library applies it only when
asked (``Client(malloc_tuning=True)`` or LINKEDBLOB_MALLOC_TUNING=1); the CLI's client commands
ask. :func:`applied` tells what this process set."""

from __future__ import annotations

import logging
import os
import threading

from linkedblob.libc import libc as _libc

log = logging.getLogger(__name__)

# From glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


# The thresholds tune_malloc sets.
MMAP_THRESHOLD = 64 * 1024 * 1024
TRIM_THRESHOLD = 1024 * 1024 * 1024

# "1" (true, yes, on) asks the client library to tune malloc; "0" (false, no, off) keeps even
# the CLI from tuning it (see wanted).
MALLOC_TUNING_ENV = "LINKEDBLOB_MALLOC_TUNING"

# tune_malloc's result once it has run in this process (None: not yet).
_tuned: bool | None = None
_tune_lock = threading.Lock()


def wanted(default: bool) -> bool:
    """Whether to tune malloc: LINKEDBLOB_MALLOC_TUNING when it is set, else ``default``. A
    ValueError names the variable when its value is not a boolean word."""
    from linkedblob.config import parse_bool

    raw = os.environ.get(MALLOC_TUNING_ENV)
    if raw is None:
        return default
    value = parse_bool(raw)
    if value is None:
        raise ValueError(f"{MALLOC_TUNING_ENV}={raw!r}: not a boolean (true/false, 1/0, ...)")
    return value


def applied() -> dict[str, int] | None:
    """What :func:`tune_malloc` set in this process ({"mmap_threshold": bytes,
    "trim_threshold": bytes}), or None when nothing did (not called, refused, or off glibc)."""
    if not _tuned:
        return None
    return {"mmap_threshold": MMAP_THRESHOLD, "trim_threshold": TRIM_THRESHOLD}


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
    ok = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
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

"""The C library, loaded once per process for the few calls Python's os module lacks
(mallopt and malloc_trim in linkedblob.tuning; sync_file_range and cachestat in blobsvc's
filesystem driver)."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache  # find_library may run ldconfig: once per process is enough
def libc() -> ctypes.CDLL | None:
    """glibc (or what stands for it), with errno kept for ctypes.get_errno(); None where no C
    library can be loaded."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None

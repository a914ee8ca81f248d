"""Storage faults the caller can act on, mapped once at the domain's edge (blobsvc.store runs
every driver call through :func:`mapped`): a full disk or quota is RESOURCE_EXHAUSTED /
STORAGE_FULL, running out of file descriptors is UNAVAILABLE (retryable: they come back as
streams end). Messages name no path or id; anything else stays as it was (INTERNAL, logged)."""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager

from linkedblob.errors import LinkedBlobError, Reason, resource_exhausted, unavailable

_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})
_NO_DESCRIPTORS = frozenset({errno.EMFILE, errno.ENFILE})


def storage_fault(exc: OSError) -> LinkedBlobError | None:
    """The status for an OSError a client can act on (by waiting), or None."""
    if exc.errno in _FULL:
        return resource_exhausted(
            Reason.STORAGE_FULL, "blob storage is full; retry once space has been freed"
        )
    if exc.errno in _NO_DESCRIPTORS:
        return unavailable("blob storage is out of file descriptors; retry later")
    return None


@contextmanager
def mapped() -> Iterator[None]:
    """Raises the storage_fault of an OSError raised inside (the OSError as its cause)."""
    try:
        yield
    except OSError as exc:
        fault = storage_fault(exc)
        if fault is None:
            raise
        raise fault from exc

"""The running hashes of uploads: kept in memory as staged bytes arrive, so a commit (or the
staged digest a Write without commit answers) in the process that staged them only reads the
state instead of re-reading the bytes.

A state is trusted only while it matches the upload exactly (generation, size, algorithm);
otherwise (after a restart, when another replica wrote, or for another algorithm) the caller
re-reads the staged bytes (hash_staged) and may keep the result as the new state.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Protocol

import grpc

from blobsvc.storage import StagedUpload
from linkedblob.config import STREAM_CHUNK_BYTES
from linkedblob.digests import Hasher
from linkedblob.errors import LinkedBlobError, Reason


class RunningHash(Hasher, Protocol):
    def copy(self) -> RunningHash: ...


def new_running_hash(algorithm: str) -> RunningHash:
    return hashlib.new(algorithm)


@dataclass
class HashState:
    """A running hash over an upload's first ``size`` staged bytes."""

    generation: str
    algorithm: str
    hasher: RunningHash
    size: int = 0

    def update(self, data: bytes | memoryview) -> None:
        """Worker thread (hashlib releases the GIL on large buffers). Runs beside the write
        of the same bytes: if that write fails, the file's size no longer matches ``size``
        and the state is not trusted again."""
        self.hasher.update(data)
        self.size += len(data)

    def covers(self, upload: StagedUpload, algorithm: str) -> bool:
        """True when this state is the hash of all of ``upload``'s staged bytes with
        ``algorithm``."""
        return (self.generation, self.size, self.algorithm) == (
            upload.generation,
            upload.size,
            algorithm,
        )


class HashStates:
    """Running hashes by upload id, oldest first, at most ``limit`` (beyond it the oldest are
    dropped: uploads nobody finishes are forgotten, and their commits re-read the bytes)."""

    def __init__(self, limit: int) -> None:
        self._states: dict[str, HashState] = {}
        self._limit = limit

    def trusted(self, upload: StagedUpload, algorithm: str) -> HashState | None:
        """The state covering all of the (held) upload's bytes with ``algorithm``, if any."""
        state = self._states.get(upload.upload_id)
        if state is not None and state.covers(upload, algorithm):
            return state
        return None

    def for_write(self, upload: StagedUpload) -> HashState | None:
        """The running hash to extend while writing this (held) upload, or None when the
        bytes already staged are not covered by one (then whoever needs the digest re-reads
        them)."""
        state = self.trusted(upload, upload.algorithm)
        if state is not None:
            return state
        if upload.size == 0:
            return self.keep(upload, new_running_hash(upload.algorithm))
        self.forget(upload.upload_id)
        return None

    def keep(self, upload: StagedUpload, hasher: RunningHash) -> HashState:
        """Keeps ``hasher`` (over all of the held upload's bytes, with its algorithm) as the
        upload's state."""
        self._states.pop(upload.upload_id, None)
        while self._states and len(self._states) >= self._limit:
            del self._states[next(iter(self._states))]
        state = HashState(upload.generation, upload.algorithm, hasher, upload.size)
        self._states[upload.upload_id] = state
        return state

    def forget(self, upload_id: str) -> None:
        self._states.pop(upload_id, None)


def hash_staged(upload: StagedUpload, algorithm: str) -> RunningHash:
    """Worker thread: the hash of all of the (held) upload's staged bytes, read a chunk at a
    time. DATA_LOSS when they end before its size (nobody else writes a held upload)."""
    hasher = new_running_hash(algorithm)
    position = 0
    while position < upload.size:
        chunk = upload.read_at(position, STREAM_CHUNK_BYTES)
        if not chunk:
            raise LinkedBlobError(
                grpc.StatusCode.DATA_LOSS,
                Reason.INTERNAL,
                f"upload {upload.upload_id} ends at {position}, before its size {upload.size}",
            )
        hasher.update(chunk)
        position += len(chunk)
    return hasher

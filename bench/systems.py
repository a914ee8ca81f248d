"""What the harness needs from each system under test: its processes and a client."""

from __future__ import annotations

from typing import Protocol

from bench.payload import Blob


class BenchError(RuntimeError):
    """A system answered something other than success: the run stops, nothing is reported."""


class Client(Protocol):
    """One client connection's worth of the operations measured. Each checks its answer."""

    def push(self, repository: str, blob: Blob) -> None:
        """Pushes a blob in one stream."""

    def push_chunked(self, repository: str, blob: Blob, chunk_bytes: int) -> None:
        """Pushes a blob as a resumable upload, one request per chunk, then commits."""

    def pull_verified(self, repository: str, digest: str, size: int) -> None:
        """Reads a whole blob, hashing as it arrives; raises unless digest and size match."""

    def stat(self, repository: str, digest: str) -> None:
        """Asks for a blob's size."""

    def mount(self, repository: str, from_repository: str, digest: str) -> None:
        """Links a blob from another repository (a cross-repository mount)."""

    def push_small(self, repository: str, blob: Blob) -> None:
        """Pushes a small blob the cheapest way the system offers."""

    def close(self) -> None: ...


class System(Protocol):
    """A running system: its server processes (for memory) and its clients."""

    name: str

    @property
    def client_note(self) -> str:
        """How its clients are set up, for the report."""

    def services(self) -> dict[str, int]:
        """Server process ids by service name."""

    def client(self) -> Client:
        """A new client with a connection of its own (one per thread)."""

    def stop(self) -> None: ...

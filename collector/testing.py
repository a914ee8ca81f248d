"""A world for tests of the collector: the in-memory linksvc and blobsvc (collector.fakes) on one
clock, with the gateway's moves (push, unlink, uploads) as one-liners."""

from __future__ import annotations

import copy
import hashlib
from typing import Any

from collector.fakes import Clock, FakeBlobStorage, FakeLinkIndex
from collector.model import BlobState
from collector.runner import Options, Runner
from collector.stats import RunStats

HOUR = 3600.0


def digest_of(name: str) -> str:
    return "sha256:" + hashlib.sha256(name.encode()).hexdigest()


class World:
    def __init__(self) -> None:
        self.clock = Clock()
        self.links = FakeLinkIndex(self.clock)
        # One process's faults: a crash kills its calls to both services.
        self.blobs = FakeBlobStorage(self.clock, faults=self.links.faults)

    def push(self, repository: str, name: str, size: int = 10) -> str:
        """What the gateway does: lease, bytes into blobsvc, link (recording the blob)."""
        digest = digest_of(name)
        lease = self.links.lease(digest)
        self.blobs.put(digest, size)
        self.links.link(repository, digest, size=size, lease=lease)
        return digest

    def runner(self, holder: str = "", **options: Any) -> Runner:
        defaults: dict[str, Any] = {"grace": HOUR, "upload_expiry": 24 * HOUR, "page_size": 2}
        return Runner(
            self.links,
            self.blobs,
            Options(**{**defaults, **options}),
            clock=self.clock,
            holder=holder,
        )

    def run(self, **options: Any) -> RunStats:
        return self.runner(**options).run()

    def state(self, digest: str) -> BlobState | None:
        row = self.links.blobs.get(digest)
        return None if row is None else row.state

    def snapshot(self) -> Any:
        return copy.deepcopy(
            (
                self.links.blobs,
                self.links.links,
                self.links.leases,
                self.links.sessions,
                self.links.locks,
                self.blobs.stored,
                self.blobs.staging,
            )
        )

    def restart(self) -> None:
        """A new runner process after a crash: calls go through again."""
        self.links.faults.dead = False

    def assert_consistent(self) -> None:
        """Every link resolves to bytes; nothing indexed lacks bytes unless being deleted."""
        for _repo, digest in self.links.links:
            assert digest in self.blobs.stored, f"dangling link to {digest}"
        for digest, row in self.links.blobs.items():
            if row.state != BlobState.DELETING:
                assert digest in self.blobs.stored, f"{digest} {row.state} without bytes"

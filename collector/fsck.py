"""fsck: reconciles linksvc's index with blobsvc's storage, and repairs what is safe.

1. A merge-join of linksvc's ListBlobs and blobsvc's List (both in digest order): indexed
   blobs whose bytes are missing (``missing_bytes``; a row being deleted is expected to have
   lost them) or of another size (``size_mismatch``), and bytes nothing indexes (``orphan``).
2. Links whose blob is missing (ListRepositories + ListLinks against step 1's findings; a link
   always names an indexed blob, linksvc's foreign key sees to it): ``dangling_link``.
3. Staging areas with no active session (ListUploads against GetSession; the gateway's
   ``push-*`` areas never have one, and are reported only once idle for PUSH_IN_FLIGHT):
   ``stray_staging``.

``repair`` does only what cannot lose data: adopts orphans (AdoptBlob: indexed as marked, so GC
reclaims them after the grace period unless something links them meanwhile), and aborts stray
staging areas idle for longer than the upload expiry. It never deletes a blob's bytes.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import grpc

from collector.model import (
    BlobState,
    BlobStorage,
    LinkedDigest,
    LinkIndex,
    Page,
    SessionState,
    pages,
)
from collector.purge import PUSH_PREFIX
from collector.stats import NoProgress, Progress
from linkedblob.digests import Digest
from linkedblob.errors import LinkedBlobError

MISSING_BYTES = "missing_bytes"
SIZE_MISMATCH = "size_mismatch"
ORPHAN = "orphan"
DANGLING_LINK = "dangling_link"
STRAY_STAGING = "stray_staging"

# A push's staging area younger than this is a push in flight, not a finding.
PUSH_IN_FLIGHT = 600.0

T = TypeVar("T")


@dataclass(frozen=True)
class Finding:
    kind: str
    subject: str  # a digest, or an upload id
    detail: str
    repository: str = ""  # dangling_link: the repository that links it
    repair: str = ""  # what --repair did ("" when it did nothing)


@dataclass
class FsckReport:
    findings: list[Finding] = field(default_factory=list)
    indexed_blobs: int = 0
    stored_blobs: int = 0
    links: int = 0
    staging_areas: int = 0
    repaired: bool = False
    duration: float = 0.0

    @property
    def clean(self) -> bool:
        return not self.findings

    def count(self, kind: str) -> int:
        return sum(1 for f in self.findings if f.kind == kind)

    def to_dict(self) -> dict[str, Any]:
        kinds = (MISSING_BYTES, SIZE_MISMATCH, ORPHAN, DANGLING_LINK, STRAY_STAGING)
        return {
            "clean": self.clean,
            "repaired": self.repaired,
            "checked": {
                "indexed_blobs": self.indexed_blobs,
                "stored_blobs": self.stored_blobs,
                "links": self.links,
                "staging_areas": self.staging_areas,
            },
            "counts": {kind: self.count(kind) for kind in kinds},
            "findings": [asdict(f) for f in self.findings],
            "duration": round(self.duration, 3),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def table(self) -> str:
        checked = (
            f"checked {self.indexed_blobs} indexed blobs, {self.stored_blobs} stored blobs, "
            f"{self.links} links, {self.staging_areas} staging areas in {self.duration:.1f}s"
        )
        if self.clean:
            return f"{checked}: clean"
        rows = [("KIND", "SUBJECT", "REPOSITORY", "DETAIL", "REPAIR")]
        rows += [
            (f.kind, f.subject, f.repository or "-", f.detail, f.repair or "-")
            for f in self.findings
        ]
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        lines = [
            "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:4])) + "  " + row[4]
            for row in rows
        ]
        return "\n".join([*lines, f"{checked}: {len(self.findings)} found"])


def _ordered(items: Iterator[T], key: Callable[[T], str], what: str) -> Iterator[T]:
    """``items``, checked to come in strictly increasing order (a merge-join needs it)."""
    last = ""
    for item in items:
        k = key(item)
        if k <= last:
            raise ValueError(f"{what} is not in digest order ({k} after {last}): cannot merge")
        last = k
        yield item


def _is_empty(digest: str) -> bool:
    try:
        return Digest.parse(digest).is_empty
    except (LinkedBlobError, ValueError):
        return False


class Fsck:
    def __init__(
        self,
        links: LinkIndex,
        blobs: BlobStorage,
        *,
        repair: bool = False,
        upload_expiry: float = 86400.0,
        page_size: int = 1000,
        clock: Callable[[], float] = time.time,
        progress: Progress | None = None,
    ) -> None:
        self.links = links
        self.blobs = blobs
        self.repair = repair
        self.upload_expiry = upload_expiry
        self.page_size = page_size
        self.clock = clock
        self.progress = progress or NoProgress()

    def run(self) -> FsckReport:
        report = FsckReport(repaired=self.repair)
        started = self.clock()
        try:
            absent = self._blobs(report)
            self._links(report, absent)
            self._staging(report)
        finally:
            self.progress.end()
        report.duration = self.clock() - started
        return report

    # --- 1. the index against the bytes -----------------------------------------------------

    def _blobs(self, report: FsckReport) -> set[str]:
        """The merge-join; returns the digests whose bytes are not there as indexed."""
        self.progress.begin("fsck blobs")
        indexed = _ordered(
            pages(self.links.list_blobs, self.page_size), lambda b: b.digest, "linksvc ListBlobs"
        )
        stored = _ordered(
            pages(self.blobs.list_blobs, self.page_size), lambda b: b.digest, "blobsvc List"
        )
        absent: set[str] = set()
        row, blob = next(indexed, None), next(stored, None)
        while row is not None or blob is not None:
            self.progress.advance()
            if blob is None or (row is not None and row.digest < blob.digest):
                assert row is not None
                report.indexed_blobs += 1
                if not _is_empty(row.digest):
                    absent.add(row.digest)
                    if row.state != BlobState.DELETING:  # a deletion under way: expected
                        detail = f"{row.state.value}, {row.size} bytes indexed, none stored"
                        report.findings.append(Finding(MISSING_BYTES, row.digest, detail))
                row = next(indexed, None)
            elif row is None or blob.digest < row.digest:
                report.stored_blobs += 1
                report.findings.append(self._orphan(blob.digest, blob.size))
                blob = next(stored, None)
            else:
                report.indexed_blobs += 1
                report.stored_blobs += 1
                if row.size != blob.size:
                    absent.add(row.digest)
                    detail = f"{row.state.value}, indexed {row.size} bytes, stored {blob.size}"
                    report.findings.append(Finding(SIZE_MISMATCH, row.digest, detail))
                row, blob = next(indexed, None), next(stored, None)
        return absent

    def _orphan(self, digest: str, size: int) -> Finding:
        detail = f"{size} bytes stored, not indexed"
        if not self.repair:
            return Finding(ORPHAN, digest, detail)
        try:
            # The two lists were read at different moments: a collector may have deleted these
            # bytes and forgotten their row in between. Adopting them then would index bytes
            # that are gone (and a later push would link them without sending any): look again.
            if self.blobs.stored_size(digest) != size:
                return Finding(ORPHAN, digest, detail, repair="gone or changed meanwhile: left")
            adopted = self.links.adopt_blob(digest, size)
        except LinkedBlobError as exc:
            return Finding(ORPHAN, digest, detail, repair=f"adopt failed: {exc}")
        action = "adopted (marked: GC reclaims it)" if adopted else "indexed meanwhile"
        return Finding(ORPHAN, digest, detail, repair=action)

    # --- 2. links whose blob is missing -----------------------------------------------------

    def _links(self, report: FsckReport, absent: set[str]) -> None:
        self.progress.begin("fsck links")
        for repository in pages(self.links.list_repositories, self.page_size):
            for link in pages(functools.partial(self._list_links, repository), self.page_size):
                report.links += 1
                self.progress.advance()
                if link.digest in absent:
                    report.findings.append(
                        Finding(
                            DANGLING_LINK,
                            link.digest,
                            "linked, but its bytes are missing or damaged",
                            repository=repository,
                        )
                    )

    def _list_links(self, repository: str, page_size: int, token: str) -> Page[LinkedDigest]:
        return self.links.list_links(repository, page_size, token)

    # --- 3. staging areas with no active session --------------------------------------------

    def _staging(self, report: FsckReport) -> None:
        self.progress.begin("fsck staging")
        for upload in pages(self.blobs.list_uploads, self.page_size):
            report.staging_areas += 1
            self.progress.advance()
            idle = self.clock() - upload.updated_at
            if upload.upload_id.startswith(PUSH_PREFIX):
                if idle < PUSH_IN_FLIGHT:
                    continue
                owner = "a push's own (no session)"
            else:
                owner = self._owner(upload.upload_id)
                if owner == "":
                    continue
            detail = f"{upload.size} bytes, idle {idle:.0f}s, {owner}"
            repair = ""
            if self.repair and idle > self.upload_expiry:
                try:
                    self.blobs.abort(upload.upload_id)
                    repair = "aborted"
                except LinkedBlobError as exc:
                    repair = f"abort failed: {exc}"
            report.findings.append(Finding(STRAY_STAGING, upload.upload_id, detail, repair=repair))

    def _owner(self, upload_id: str) -> str:
        """Why the staging area has no active session ("" when it has one)."""
        try:
            session = self.links.get_session(upload_id)
        except LinkedBlobError as exc:
            if exc.code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
                return "no session"
            raise
        if session.state == SessionState.ACTIVE:
            return ""
        return f"session {session.state.value}"

"""What one run did (or, dry, would do), and how progress is shown."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

# How a run ended (the `outcome` label of linkedblob_gc_runs_total).
OK = "ok"
SKIPPED = "skipped"  # another runner holds the lock
STOPPED = "stopped"  # asked to stop (SIGTERM) between steps
LOCK_LOST = "lock_lost"  # the lock expired and another runner took it: this one stopped
ERROR = "error"  # linksvc failed a call (or blobsvc one that is not per blob)


@dataclass
class RunStats:
    dry_run: bool = False
    outcome: str = OK
    error: str = ""
    lock_holder: str = ""  # who holds the lock (when skipped)
    sessions_purged: int = 0
    sessions_kept: int = 0  # active and idle, but blobsvc saw a write lately (direct writes)
    staging_aborted: int = 0
    marked: int = 0
    revived: int = 0
    candidates: int = 0
    taken_over: int = 0  # deleting rows left by a runner that stopped midway
    fence_lost: int = 0  # linked, leased or changed since listed: not collected
    reclaimed_blobs: int = 0
    reclaimed_bytes: int = 0
    delete_failed: int = 0
    stuck_deleting: int = 0  # left deleting by this run (a later run takes them over)
    failures: int = 0  # other per-item failures (an abort, a purge), retried next run
    duration: float = 0.0
    # Dry run: what a run would act on.
    would_purge: list[str] = field(default_factory=list)
    would_abort: list[str] = field(default_factory=list)
    would_collect: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if not self.dry_run:
            for key in ("would_purge", "would_abort", "would_collect"):
                del out[key]
        return out

    def summary(self) -> str:
        """One human line (the CLI's output, the loop's log)."""
        if self.outcome == SKIPPED:
            return f"skipped: the runner lock is held by {self.lock_holder}"
        head = "dry run: " if self.dry_run else ""
        if self.dry_run:
            body = (
                f"would purge {len(self.would_purge)} sessions, abort "
                f"{len(self.would_abort)} staging areas, collect {self.candidates} blobs"
            )
        else:
            body = (
                f"{self.sessions_purged} sessions purged, {self.staging_aborted} staging areas "
                f"aborted, {self.marked} marked, {self.candidates} candidates, "
                f"{self.reclaimed_blobs} blobs ({self.reclaimed_bytes} bytes) reclaimed, "
                f"{self.stuck_deleting} stuck in deleting"
            )
        tail = f" [{self.outcome}{': ' + self.error if self.error else ''}]"
        return f"{head}{body} in {self.duration:.1f}s" + ("" if self.outcome == OK else tail)


class Progress(Protocol):
    """Where a run reports its progress (the CLI: a tqdm bar on a terminal)."""

    def begin(self, step: str) -> None: ...

    def advance(self, n: int = 1) -> None: ...

    def end(self) -> None: ...


class NoProgress:
    def begin(self, step: str) -> None:
        pass

    def advance(self, n: int = 1) -> None:
        pass

    def end(self) -> None:
        pass

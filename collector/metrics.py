"""The collector's Prometheus metrics (served by `linkedblob serve gc --metrics-port`); its calls
to linksvc and blobsvc are counted as grpc_client_* (linkedblob.interceptors)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from collector.stats import OK, RunStats

RUNS = Counter(
    "linkedblob_gc_runs", "GC runs, by outcome (ok, skipped, stopped, error, ...)", ["outcome"]
)
MARKED = Counter("linkedblob_gc_marked", "Blobs marked (unreferenced, no live lease)")
CANDIDATES = Gauge("linkedblob_gc_candidates", "Blobs the last sweep found collectable")
RECLAIMED_BLOBS = Counter("linkedblob_gc_reclaimed_blobs", "Blobs deleted and forgotten")
RECLAIMED_BYTES = Counter("linkedblob_gc_reclaimed_bytes", "Bytes of the blobs deleted")
SESSIONS_PURGED = Counter("linkedblob_gc_sessions_purged", "Upload sessions purged")
STAGING_ABORTED = Counter("linkedblob_gc_staging_aborted", "Staging areas aborted in blobsvc")
STUCK_DELETING = Gauge(
    "linkedblob_gc_stuck_deleting", "Blobs the last run left deleting (a later run finishes them)"
)
LAST_SUCCESS = Gauge(
    "linkedblob_gc_last_success_timestamp_seconds",
    "When the last GC run that completed (outcome ok, not a dry run) ended, Unix time",
)
RUN_SECONDS = Histogram(
    "linkedblob_gc_run_seconds",
    "Duration of a GC run",
    buckets=(0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, 4 * 3600),
)


def record(stats: RunStats) -> None:
    """Counts one run (a dry run only by its outcome)."""
    RUNS.labels(stats.outcome).inc()
    if stats.dry_run:
        return
    MARKED.inc(stats.marked)
    CANDIDATES.set(stats.candidates)
    RECLAIMED_BLOBS.inc(stats.reclaimed_blobs)
    RECLAIMED_BYTES.inc(stats.reclaimed_bytes)
    SESSIONS_PURGED.inc(stats.sessions_purged)
    STAGING_ABORTED.inc(stats.staging_aborted)
    STUCK_DELETING.set(stats.stuck_deleting)
    RUN_SECONDS.observe(stats.duration)
    if stats.outcome == OK:
        LAST_SUCCESS.set_to_current_time()

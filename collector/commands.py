"""`linkedblob gc` and `linkedblob fsck`: one collector run, or one reconciliation, against
running services (linksvc at --link-addr, blobsvc at --blob-addr).

gc prints a summary line (with --dry-run, also what it would act on), or the run's stats as one
JSON object on one line (--json). Exit status: 0 for a run that finished or was skipped because
another runner holds the lock (it says who; --wait waits for the lock instead), 1 when the run
failed or stopped, 2 for a usage error. fsck prints its findings as a table, or as one JSON
object on one line (--json); exit status 0 when clean, 1 when it found anything, and when it
could not check (a service failed) the status of the call's gRPC code (linkedblob.exitcodes:
8 for an unreachable service).

A tqdm bar on stderr shows progress on a terminal for runs that last more than a moment.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from collector import options as gc_options
from linkedblob import exitcodes, grants, tls
from linkedblob.errors import StatusError

_PROGRESS_DELAY = 0.5
_LOCK_POLL_SECONDS = 5.0


def register(commands: Any) -> None:
    gc = commands.add_parser("gc", help="collect garbage once: purge uploads, mark, sweep")
    gc_options.add_collection(gc)
    gc.add_argument(
        "--dry-run", action="store_true", help="report what a run would do; change nothing"
    )
    gc.add_argument("--json", action="store_true", help="print the run's stats as JSON")
    gc.add_argument(
        "--wait", action="store_true", help="when another runner holds the lock, wait for it"
    )
    gc.set_defaults(handler=_gc)

    fsck = commands.add_parser("fsck", help="reconcile linksvc's index with blobsvc's storage")
    gc_options.add_backends(fsck)
    gc_options.add_upload_expiry(fsck)
    fsck.add_argument(
        "--repair",
        action="store_true",
        help="adopt orphan blobs (GC reclaims them after the grace period) and abort stray "
        "staging areas idle longer than --upload-expiry; never deletes a blob",
    )
    fsck.add_argument("--json", action="store_true", help="print the report as JSON")
    fsck.set_defaults(handler=_fsck)


class TqdmProgress:
    """collector.stats.Progress as a tqdm bar per step on stderr, on a terminal only."""

    def __init__(self) -> None:
        self._bar: Any = None

    def begin(self, step: str) -> None:
        from tqdm import tqdm

        self.end()
        self._bar = tqdm(
            desc=step,
            unit=" items",
            file=sys.stderr,
            disable=not sys.stderr.isatty(),
            delay=_PROGRESS_DELAY,
            leave=False,
        )

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def end(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _gc(args: argparse.Namespace) -> int:
    from collector.grpc_backends import GrpcBlobStorage, GrpcLinkIndex
    from collector.runner import Runner
    from collector.server import options_from
    from collector.stats import OK, SKIPPED

    try:
        options = options_from(args, dry_run=args.dry_run)
        credentials = tls.client_credentials_from_args(args)
        signer = grants.signer_from_args(args)
    except ValueError as exc:
        raise exitcodes.UsageError(str(exc)) from exc
    links = GrpcLinkIndex(args.link_addr, credentials=credentials)
    blobs = GrpcBlobStorage(args.blob_addr, signer, credentials=credentials)
    try:
        runner = Runner(links, blobs, options, progress=TqdmProgress())
        stats = runner.run()
        while stats.outcome == SKIPPED and args.wait:
            print(f"linkedblob gc: waiting for {stats.lock_holder}", file=sys.stderr)
            time.sleep(_LOCK_POLL_SECONDS)
            stats = runner.run()
    finally:
        links.close()
        blobs.close()
    if args.json:
        print(json.dumps(stats.to_dict()))
    else:
        for digest in stats.would_collect:
            print(f"would collect {digest}")
        for session in stats.would_purge:
            print(f"would purge session {session}")
        for upload in stats.would_abort:
            print(f"would abort staging area {upload}")
        print(stats.summary())
    return 0 if stats.outcome in (OK, SKIPPED) else 1


def _fsck(args: argparse.Namespace) -> int:
    from collector.fsck import Fsck
    from collector.grpc_backends import GrpcBlobStorage, GrpcLinkIndex

    try:
        credentials = tls.client_credentials_from_args(args)
        signer = grants.signer_from_args(args)
    except ValueError as exc:
        raise exitcodes.UsageError(str(exc)) from exc
    links = GrpcLinkIndex(args.link_addr, credentials=credentials)
    blobs = GrpcBlobStorage(args.blob_addr, signer, credentials=credentials)
    try:
        check = Fsck(
            links,
            blobs,
            repair=args.repair,
            upload_expiry=args.upload_expiry,
            progress=TqdmProgress(),
        )
        report = check.run()
    except StatusError as exc:
        print(f"linkedblob fsck: cannot check: {exc}", file=sys.stderr)
        return exitcodes.for_status(exc.code)
    except ValueError as exc:
        raise exitcodes.UsageError(f"cannot check: {exc}") from exc
    finally:
        links.close()
        blobs.close()
    if args.json:
        print(json.dumps(report.to_dict()))
    else:
        print(report.table())
    return 0 if report.clean else 1

"""`linkedblob serve gc`: a GC run every --interval, as a long-lived worker.

It serves gRPC health (linkedblob.server's bootstrap, with no service of its own) on --port and
Prometheus metrics (collector.metrics) on --metrics-port, prints the ready line `linkedblob gc
listening on HOST:PORT` that `linkedblob up` waits for, and runs the collector (collector.runner,
in a worker thread; its calls are synchronous) under the cluster-wide runner lock: a second
worker skips its runs while the first holds it. SIGTERM or SIGINT stops it between two steps of
a run (never between a fence and its delete), then it releases the lock and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
import threading

import grpc

from collector import metrics as gc_metrics
from collector.grpc_backends import GrpcBlobStorage, GrpcLinkIndex
from collector.runner import Options, Runner
from collector.stats import ERROR, RunStats
from linkedblob import grants, metrics, server, tls

log = logging.getLogger(__name__)


def options_from(args: argparse.Namespace, dry_run: bool = False) -> Options:
    return Options(
        grace=args.grace,
        upload_expiry=args.upload_expiry,
        takeover=args.takeover,
        delete_timeout=args.delete_timeout,
        dry_run=dry_run,
    )


def _run_once(runner: Runner) -> RunStats:
    try:
        return runner.run()
    except Exception as exc:  # a bug, not a failed call: log it, keep the worker alive
        log.exception("gc run crashed")
        return RunStats(outcome=ERROR, error=f"{type(exc).__name__}: {exc}")


async def _main(
    args: argparse.Namespace,
    options: Options,
    credentials: grpc.ChannelCredentials | None = None,
    signer: grants.Signer | None = None,
) -> None:
    service = server.Service(name="gc", service_names=[], register=lambda _server: None)
    running = await server.start(service, args.host, args.port)
    if args.metrics_port >= 0:
        port = metrics.start_http(args.host, args.metrics_port)
        log.info("metrics on http://%s:%d/metrics", args.host, port)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"linkedblob gc listening on {host}:{running.port}", flush=True)

    stop = asyncio.Event()
    stopping = threading.Event()  # read by the runner's thread between steps

    def on_signal() -> None:
        stopping.set()
        stop.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)

    links = GrpcLinkIndex(args.link_addr, credentials=credentials)
    blobs = GrpcBlobStorage(args.blob_addr, signer, credentials=credentials)
    runner = Runner(links, blobs, options, should_stop=stopping.is_set)
    log.info(
        "gc every %.0fs (grace %.0fs, upload expiry %.0fs) as %s",
        args.interval,
        options.grace,
        options.upload_expiry,
        runner.holder,
    )
    try:
        while not stop.is_set():
            stats = await asyncio.to_thread(_run_once, runner)
            gc_metrics.record(stats)
            log.info("gc run: %s", stats.summary(), extra={"gc": stats.to_dict()})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), args.interval)
    finally:
        log.info("stopping")
        await running.stop(1.0)
        links.close()
        blobs.close()
    log.info("stopped")


def serve(args: argparse.Namespace) -> int:
    try:
        options = options_from(args)
        credentials = tls.client_credentials_from_args(args)
        signer = grants.signer_from_args(args)
    except ValueError as exc:
        print(f"linkedblob serve gc: {exc}", file=sys.stderr)
        return 2
    try:
        with asyncio.Runner(loop_factory=server.event_loop_factory()) as runner:
            runner.run(_main(args, options, credentials, signer))
    except OSError as exc:
        print(f"linkedblob gc: {exc}", file=sys.stderr)
        return 1
    return 0

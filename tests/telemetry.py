"""A stack for the telemetry tests: blobsvc, linksvc (SQLite) and a gateway as real processes,
each with its metrics port and its access log (INFO), and their log lines as JSON."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.services import ServiceProcess, spawn
from tests.stack import free_port, registry

BLOB_SERVICE = "linkedblob.blob.v1.BlobService"
LINK_SERVICE = "linkedblob.link.v1.LinkService"
REGISTRY = "linkedblob.v1.Registry"


@dataclass
class TelemetryStack:
    blob: ServiceProcess
    link: ServiceProcess
    gateway: ServiceProcess
    metrics_ports: dict[str, int]

    def stub(self) -> Any:
        return registry(self.gateway.address)

    def stop(self) -> None:
        for svc in (self.gateway, self.link, self.blob):
            svc.stop()


def log_lines(svc: ServiceProcess, logger: str = "linkedblob.access") -> list[dict[str, Any]]:
    """The JSON log lines of ``logger`` the service wrote so far."""
    found = []
    for line in list(svc.output):
        if f'"logger": "{logger}"' in line:
            found.append(json.loads(line))
    return found


def wait_for(
    find: Callable[[], list[dict[str, Any]]], what: str, timeout: float = 10
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        found = find()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout}s")
        time.sleep(0.05)


@contextmanager
def telemetry_stack(
    directory: Path, env: dict[str, str] | None = None, args: tuple[str, ...] = ()
) -> Iterator[TelemetryStack]:
    ports = {kind: free_port() for kind in ("blob", "link", "gateway")}
    common = ("--log-level", "INFO", *args)

    def start(kind: str, *argv: str) -> ServiceProcess:
        return spawn(kind, *argv, "--metrics-port", str(ports[kind]), *common, env=env)

    with ThreadPoolExecutor(2) as pool:
        blob_f = pool.submit(start, "blob", "--data", str(directory / "blobs"))
        link_f = pool.submit(start, "link", "--db", f"sqlite:///{directory / 'l.db'}", "--migrate")
        blob, link = blob_f.result(), link_f.result()
    gateway = start("gateway", "--blob-addr", blob.address, "--link-addr", link.address)
    stack = TelemetryStack(blob, link, gateway, ports)
    try:
        yield stack
    finally:
        stack.stop()

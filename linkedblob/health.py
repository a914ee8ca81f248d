"""Liveness and readiness on the standard health service (grpc.health.v1).

Every server answers these service names:

- ``"liveness"``: SERVING while the process is not wedged. The health servicer runs on the
  server's event loop, so an answer at all shows the loop turns; a wedged loop answers nothing
  and the probe times out. Kubernetes restarts the pod on it: it must not depend on anything
  outside the process (a database down would otherwise restart every linksvc).
- ``"readiness"``, ``""`` and each service's own name: SERVING only while what the service
  needs works, as its :data:`Check` finds every :data:`CHECK_INTERVAL` seconds: the gateway
  both backends (their own readiness, :class:`PeerHealth`), linksvc its database, blobsvc its
  store writable (:func:`directory_writable`). Kubernetes stops routing to a pod that is not
  ready, and clients balancing over a headless Service's addresses skip it the same way only
  when it refuses connections, so readiness is what the Service's endpoints follow.

A graceful shutdown reports NOT_SERVING on every name (linkedblob.server.RunningServer.stop).
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from linkedblob import tls, transport

log = logging.getLogger(__name__)

LIVENESS = "liveness"
READINESS = "readiness"

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

# How often readiness is checked, and how long one check may take before it counts as failed.
CHECK_INTERVAL = 1.0
CHECK_TIMEOUT = 3.0

# A readiness check: returns when the service can do its work, raises (any Exception, whose
# message says what is wrong) when it cannot.
Check = Callable[[], Awaitable[None]]


class NotReady(Exception):
    """What a check raises for a dependency that answers but is not usable."""


class Readiness:
    """Keeps the health servicer's statuses: ``liveness`` SERVING, and the readiness names
    (``readiness``, ``""``, ``service_names``) following ``check``, run every ``interval``
    seconds. Watchers (Health/Watch) are told of each change."""

    def __init__(
        self,
        servicer: Any,  # grpc_health.v1.health.aio.HealthServicer
        service_names: Sequence[str],
        check: Check | None,
        interval: float = CHECK_INTERVAL,
        timeout: float = CHECK_TIMEOUT,
    ) -> None:
        self.servicer = servicer
        self.names = (READINESS, "", *service_names)
        self.check = check
        self.interval = interval
        self.timeout = timeout
        self.ready: bool | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Sets liveness, checks readiness once (before the server announces itself), and keeps
        checking it in the background."""
        await self.servicer.set(LIVENESS, SERVING)
        await self.refresh()
        if self.check is not None:
            self._task = asyncio.create_task(self._watch(), name="readiness")

    async def refresh(self) -> bool:
        """Runs the check once and publishes its outcome; whether the service is ready."""
        problem = await self._problem()
        ready = problem is None
        if ready != self.ready:
            if ready:
                log.info("ready", extra={"readiness": "SERVING"})
            else:
                log.warning("not ready: %s", problem, extra={"readiness": "NOT_SERVING"})
            status = SERVING if ready else NOT_SERVING
            for name in self.names:
                await self.servicer.set(name, status)
            self.ready = ready
        return ready

    async def _problem(self) -> str | None:
        if self.check is None:
            return None
        try:
            await asyncio.wait_for(self.check(), self.timeout)
        except TimeoutError:
            return f"the readiness check took more than {self.timeout:g}s"
        except Exception as exc:  # any failure of the dependency means not ready
            return str(exc) or type(exc).__name__
        return None

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.refresh()

    async def stop(self) -> None:
        """Stops checking (a shutdown sets NOT_SERVING for good)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None


class PeerHealth:
    """The readiness of the servers this one calls, asked of each over a channel of its own
    (the same balancing and credentials as the calls' channels): ready when every peer's
    ``readiness`` answers SERVING from at least one of its replicas. The channels open on the
    first check, inside the server's event loop."""

    def __init__(
        self, peers: Sequence[tuple[str, str]], credentials: grpc.ChannelCredentials | None
    ) -> None:
        self.peers = list(peers)  # (what, address)
        self.credentials = credentials
        self._channels: list[tuple[str, str, grpc.aio.Channel, Any]] = []

    def _open(self) -> None:
        for what, address in self.peers:
            channel = tls.aio_channel(address, self.credentials, transport.channel_options())
            stub = health_pb2_grpc.HealthStub(channel)  # type: ignore[no-untyped-call]
            self._channels.append((what, address, channel, stub))

    async def check(self) -> None:
        if not self._channels:
            self._open()
        await asyncio.gather(
            *(self._ask(what, addr, stub) for what, addr, _, stub in self._channels)
        )

    @staticmethod
    async def _ask(what: str, address: str, stub: Any) -> None:
        request = health_pb2.HealthCheckRequest(service=READINESS)
        try:
            answer = await stub.Check(request, timeout=CHECK_TIMEOUT)
        except grpc.RpcError as err:
            code = err.code().name if err.code() else "UNKNOWN"  # type: ignore[union-attr]
            raise NotReady(f"{what} at {address}: {code}") from None
        if answer.status != SERVING:
            status = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
            raise NotReady(f"{what} at {address}: {status}")

    async def close(self) -> None:
        for _, _, channel, _ in self._channels:
            await channel.close(None)
        self._channels = []


def directory_writable(path: str) -> Check:
    """A check that a file can be created, written and removed in ``path`` (a store's staging
    directory) and that its filesystem has free blocks and inodes: what a write needs, for any
    user, root included (a directory replaced, unmounted, read-only or full)."""

    def probe() -> None:
        name = os.path.join(path, f".ready-{secrets.token_hex(4)}")
        fd = os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        try:
            os.write(fd, b"ok")
        finally:
            os.close(fd)
            os.unlink(name)
        st = os.statvfs(path)
        if st.f_bavail == 0:
            raise NotReady(f"{path}: no free space")
        if st.f_files and st.f_favail == 0:
            raise NotReady(f"{path}: no free inodes")

    async def check() -> None:
        try:
            await asyncio.to_thread(probe)
        except OSError as exc:
            raise NotReady(f"store not writable: {exc}") from None

    return check

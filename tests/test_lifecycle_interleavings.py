"""Garbage collection against pushes, commits, mounts and unlinks, at every ordering of their
steps, on SQLite and PostgreSQL.

The actors are the real code: the gateway's domain (gateway.registry.Registry and
gateway.uploads.Uploads over its gRPC adapters) and the collector (collector.runner.Runner over
its gRPC adapters), against real blobsvc and linksvc processes. Each call that changes state
(a lease, a commit, a link, a mount, an unlink; a mark, a fence, a delete, a forget) is one step
of a schedule (tests/interleave.py), and every ordering of the actors' steps is played. After
every step, every link of the scenario's repositories must resolve to bytes that blobsvc serves
and that hash to the link's digest (nothing lost, no dangling link); at the end, whatever an
actor answered, the same holds, and an actor that failed failed with a retryable answer.

Each schedule works on a digest of its own, so the services are started once per database; the
collector sees only that digest among the collectable blobs (the others are earlier schedules'
leftovers).
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from collector.grpc_backends import GrpcBlobStorage, GrpcLinkIndex
from collector.model import LockState, Page
from collector.runner import Options, Runner
from gateway import validation
from gateway.grpc_blob import GrpcBlobBackend
from gateway.grpc_link import GrpcLinkBackend
from gateway.model import IncomingData
from gateway.registry import Registry
from gateway.uploads import Uploads
from linkedblob import transport
from linkedblob.blob.v1 import blob_pb2, blob_pb2_grpc
from linkedblob.digests import Digest
from linkedblob.errors import LinkedBlobError, Reason
from linkedblob.link.v1 import link_pb2, link_pb2_grpc
from tests.interleave import Schedule, schedules
from tests.services import ServiceProcess, spawn
from tests.stack import DB_KINDS, database

MEDIA = "application/octet-stream"
Actors = dict[str, Callable[[], Awaitable[object]]]
# Answers an actor may end with when it lost a race: the caller retries (the client library
# does so by itself).
RETRYABLE = {(grpc.StatusCode.ABORTED, Reason.BLOB_DELETING)}

# The calls that are steps. Reads (a session, a staged size, a resolve) run when they come.
GATEWAY_STEPS = frozenset({"lease", "put", "write", "commit", "link", "mount", "unlink"})
COLLECTOR_LINK_STEPS = frozenset(
    {"mark_unreferenced", "list_collectable", "fence_blob", "forget_blob"}
)
COLLECTOR_BLOB_STEPS = frozenset({"delete"})


@dataclass
class Services:
    blob: ServiceProcess
    link: ServiceProcess


@pytest.fixture(scope="module", params=DB_KINDS)
def services(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Services]:
    directory = tmp_path_factory.mktemp(f"interleave-{request.param}")
    with database(request.param, directory) as url:
        blob = spawn("blob", "--data", str(directory / "blobs"), "--log-level", "WARNING")
        try:
            link = spawn("link", "--db", url, "--migrate", "--log-level", "WARNING")
            try:
                yield Services(blob, link)
            finally:
                link.stop()
        finally:
            blob.stop()


# --- gates ------------------------------------------------------------------------------------


class GatedAsync:
    """An async backend whose calls named in ``steps`` are steps of ``actor``."""

    def __init__(self, inner: Any, schedule: Schedule, actor: str, steps: frozenset[str]):
        self._inner, self._schedule, self._actor, self._steps = inner, schedule, actor, steps

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if name not in self._steps:
            return attr

        async def step(*args: Any, **kwargs: Any) -> Any:
            return await self._schedule.step(self._actor, name, lambda: attr(*args, **kwargs))

        return step


class GatedSync:
    """A sync backend (the collector's, called from its thread) whose calls named in ``steps``
    are steps of ``actor``, taken on the schedule's event loop."""

    def __init__(
        self,
        inner: Any,
        schedule: Schedule,
        actor: str,
        steps: frozenset[str],
        loop: asyncio.AbstractEventLoop,
    ):
        self._inner, self._schedule, self._actor = inner, schedule, actor
        self._steps, self._loop = steps, loop

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if name not in self._steps:
            return attr

        def step(*args: Any, **kwargs: Any) -> Any:
            async def call() -> Any:
                return await asyncio.to_thread(attr, *args, **kwargs)

            done = asyncio.run_coroutine_threadsafe(
                self._schedule.step(self._actor, name, call), self._loop
            )
            return done.result()

        return step


class OneDigest:
    """The collector's view of the index: only ``digest`` is ever collectable (the others are
    earlier schedules' leftovers, which would add steps). With ``lockless``, the runner lock
    is always granted: two runners then really run at once (correctness must not need it)."""

    def __init__(self, inner: GrpcLinkIndex, digest: str, *, lockless: bool = False):
        self._inner, self._digest, self._lockless = inner, digest, lockless

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def list_collectable(self, *args: Any, **kwargs: Any) -> Page[Any]:
        page = self._inner.list_collectable(*args, **kwargs)
        return Page([b for b in page.items if b.digest == self._digest], page.next_token)

    def acquire_runner_lock(self, name: str, holder: str, ttl: float) -> LockState:
        if self._lockless:
            return LockState(acquired=True, holder=holder, expires_at=0.0)
        return self._inner.acquire_runner_lock(name, holder, ttl)

    def release_runner_lock(self, name: str, holder: str) -> None:
        if not self._lockless:
            self._inner.release_runner_lock(name, holder)


# --- the world of one schedule ----------------------------------------------------------------


def blob_bytes() -> tuple[bytes, Digest]:
    data = secrets.token_bytes(3000)
    return data, Digest.parse("sha256:" + hashlib.sha256(data).hexdigest())


class World:
    """The services' stubs for the invariant, and the actors' backends for one schedule."""

    def __init__(self, services: Services, schedule: Schedule, repositories: list[str]):
        self.services = services
        self.schedule = schedule
        self.repositories = repositories
        self._link_channel = grpc.aio.insecure_channel(services.link.address)
        self._blob_channel = grpc.aio.insecure_channel(
            services.blob.address, options=transport.channel_options()
        )
        self.links_stub = link_pb2_grpc.LinkServiceStub(self._link_channel)  # type: ignore[no-untyped-call]
        self.blobs_stub = blob_pb2_grpc.BlobServiceStub(self._blob_channel)  # type: ignore[no-untyped-call]
        self._opened: list[Any] = []

    async def close(self) -> None:
        for backend in self._opened:
            await backend.close()
        await self._link_channel.close()
        await self._blob_channel.close()

    def gateway(self, actor: str | None) -> tuple[Registry, Uploads]:
        """The gateway's domain; its state-changing calls are ``actor``'s steps (None: free)."""
        blobs: Any = GrpcBlobBackend(self.services.blob.address, lambda: None)
        links: Any = GrpcLinkBackend(self.services.link.address)
        self._opened += [blobs, links]
        if actor is not None:
            blobs = GatedAsync(blobs, self.schedule, actor, GATEWAY_STEPS)
            links = GatedAsync(links, self.schedule, actor, GATEWAY_STEPS)
        # No backoff on BLOB_DELETING: a schedule is finite; the answer is checked instead.
        registry = Registry(blobs, links, enable_delete=True, deleting_backoff=())
        return registry, Uploads(blobs, links, deleting_backoff=())

    def collector(self, actor: str, digest: str, *, lockless: bool = False) -> Runner:
        loop = asyncio.get_running_loop()
        links = OneDigest(GrpcLinkIndex(self.services.link.address), digest, lockless=lockless)
        blobs = GrpcBlobStorage(self.services.blob.address)
        options = Options(grace=0, upload_expiry=86400, takeover=60, delete_timeout=10)
        return Runner(
            GatedSync(links, self.schedule, actor, COLLECTOR_LINK_STEPS, loop),
            GatedSync(blobs, self.schedule, actor, COLLECTOR_BLOB_STEPS, loop),
            options,
            holder=f"{actor}-{secrets.token_hex(4)}",
        )

    async def check(self, where: str) -> None:
        """Every link of the repositories resolves to bytes that hash to its digest."""
        for repository in self.repositories:
            page = await self.links_stub.ListLinks(
                link_pb2.ListLinksRequest(repository=repository, page_size=1000)
            )
            for blob in page.blobs:
                data = b""
                try:
                    async for chunk in self.blobs_stub.Read(
                        blob_pb2.ReadRequest(digest=blob.digest)
                    ):
                        data += chunk.data
                except grpc.aio.AioRpcError as err:
                    pytest.fail(
                        f"{where}: {repository} links {blob.digest}, unreadable: {err.code()}"
                    )
                actual = "sha256:" + hashlib.sha256(data).hexdigest()
                assert actual == blob.digest, (
                    f"{where}: {repository}'s {blob.digest} has other bytes"
                )


def run_collector(runner: Runner) -> Callable[[], Awaitable[object]]:
    async def body() -> object:
        stats = await asyncio.to_thread(runner.run)
        assert stats.outcome in ("ok", "skipped"), (stats.outcome, stats.error)
        return stats

    return body


def settled(results: dict[str, object]) -> None:
    """Every actor succeeded, or lost a race with an answer its caller retries."""
    for actor, result in results.items():
        if isinstance(result, LinkedBlobError):
            assert (result.code, result.reason) in RETRYABLE, f"{actor}: {result!r}"
        elif isinstance(result, BaseException):
            raise AssertionError(f"{actor} failed") from result


async def play(
    services: Services,
    repositories: list[str],
    order: list[str],
    prepare: Callable[[World], Awaitable[Actors]],
) -> list[str]:
    holder: dict[str, World] = {}

    async def check(where: str) -> None:
        await holder["world"].check(where)

    schedule = Schedule(order, check)
    world = holder["world"] = World(services, schedule, repositories)
    try:
        actors = await prepare(world)
        results = await schedule.run(actors)
        await world.check("at the end")
        settled(results)
        return schedule.trace
    finally:
        await world.close()


def every_schedule(counts: dict[str, int]) -> list[list[str]]:
    return list(schedules(counts))


# --- the scenarios ----------------------------------------------------------------------------


def names() -> tuple[str, str]:
    tag = secrets.token_hex(4)
    return f"inter/a-{tag}", f"inter/b-{tag}"


async def unlinked_blob(world: World, repository: str) -> tuple[bytes, Digest]:
    """A blob stored and linked through ``repository``, then unlinked: garbage now."""
    registry, _ = world.gateway(None)
    data, digest = blob_bytes()
    await registry.put(repository, MEDIA, digest, data)
    await registry.delete(repository, digest)
    return data, digest


def test_a_put_against_the_collector(services: Services) -> None:
    """PutBlob of a digest the collector is collecting (the bytes exist, so blobsvc would skip
    the copy): the lease comes first, so the blob is revived, or the put waits for the
    deletion to finish and stores the bytes anew; never a link to deleted bytes."""
    traces = set()
    for order in every_schedule({"put": 3, "gc": 5}):
        a, b = names()

        async def prepare(world: World, a: str = a, b: str = b) -> Actors:
            data, digest = await unlinked_blob(world, a)
            registry, _ = world.gateway("put")
            runner = world.collector("gc", str(digest))
            return {
                "put": lambda: registry.put(b, MEDIA, digest, data),
                "gc": run_collector(runner),
            }

        traces.add(tuple(asyncio.run(play(services, [a, b], order, prepare))))
    # The dangerous orders were played: the put came while the blob was being deleted (and
    # answered BLOB_DELETING), and after it was collected (and stored the bytes anew).
    assert any(_follows(t, "gc:fence_blob", "put:lease") for t in traces), traces
    assert any("put:put" in t for t in traces), traces


def _collected_in_some(traces: list[list[str]]) -> None:
    """The orders played included ones where the collector deleted the blob's bytes: the
    race was really run, not only the orders where the collector found nothing to do."""
    assert any("gc:delete" in t or "gc1:delete" in t or "gc2:delete" in t for t in traces)


def _follows(trace: tuple[str, ...], first: str, then: str) -> bool:
    return any(a == first and b == then for a, b in itertools.pairwise(trace))


def test_an_upload_committed_against_the_collector(services: Services) -> None:
    """An upload written before the mark and committed while the collector sweeps the same
    digest (the blob exists unlinked): the commit's lease protects it or waits for the
    deletion; the link never points at deleted bytes."""
    traces: list[list[str]] = []
    for order in every_schedule({"commit": 3, "gc": 5}):
        a, b = names()

        async def prepare(world: World, a: str = a, b: str = b) -> Actors:
            data, digest = await unlinked_blob(world, a)
            _, free_uploads = world.gateway(None)
            session = await free_uploads.start(b)
            await free_uploads.write(b, session.id, 0, data, _nothing())
            _, uploads = world.gateway("commit")
            runner = world.collector("gc", str(digest))
            return {
                "commit": lambda: uploads.commit(b, session.id, digest, MEDIA),
                "gc": run_collector(runner),
            }

        traces.append(asyncio.run(play(services, [a, b], order, prepare)))
    _collected_in_some(traces)


@pytest.mark.parametrize("source", ["a", ""], ids=["from-source", "from-any"])
def test_a_mount_and_an_unlink_against_the_collector(services: Services, source: str) -> None:
    """A mount into b (from a, or from any repository) while a's link is deleted and the
    collector runs: the mount links a blob that is kept, or finds no source; never a link to
    deleted bytes."""
    traces: list[list[str]] = []
    for order in every_schedule({"mount": 1, "unlink": 1, "gc": 5}):
        a, b = names()

        async def prepare(world: World, a: str = a, b: str = b) -> Actors:
            free, _ = world.gateway(None)
            data, digest = blob_bytes()
            await free.put(a, MEDIA, digest, data)
            mounter, _ = world.gateway("mount")
            deleter, _ = world.gateway("unlink")
            runner = world.collector("gc", str(digest))

            async def mount() -> object:
                try:
                    return await mounter.mount(b, a if source else "", digest, MEDIA)
                except LinkedBlobError as err:
                    if err.reason == Reason.BLOB_UNKNOWN:  # no source left: upload instead
                        return err.reason
                    raise

            return {
                "mount": mount,
                "unlink": lambda: deleter.delete(a, digest),
                "gc": run_collector(runner),
            }

        traces.append(asyncio.run(play(services, [a, b], order, prepare)))
    _collected_in_some(traces)


def test_an_unlink_against_a_relink_elsewhere(services: Services) -> None:
    """The blob is linked in a; a unlinks it while b puts the same bytes and the collector
    runs: whichever order, b's link ends up on bytes that are there."""
    traces: list[list[str]] = []
    for order in every_schedule({"unlink": 1, "put": 2, "gc": 4}):
        a, b = names()

        async def prepare(world: World, a: str = a, b: str = b) -> Actors:
            free, _ = world.gateway(None)
            data, digest = blob_bytes()
            await free.put(a, MEDIA, digest, data)
            deleter, _ = world.gateway("unlink")
            putter, _ = world.gateway("put")
            runner = world.collector("gc", str(digest))
            return {
                "unlink": lambda: deleter.delete(a, digest),
                "put": lambda: putter.put(b, MEDIA, digest, data),
                "gc": run_collector(runner),
            }

        traces.append(asyncio.run(play(services, [a, b], order, prepare)))
    _collected_in_some(traces)


def test_two_collectors_at_once_without_the_lock(services: Services) -> None:
    """Two runners that both think they hold the lock, against a put of the same digest: the
    fence (a compare-and-set under the row's lock) lets one collect at most, and the put's
    link is never left dangling."""
    steps = frozenset({"fence_blob", "delete", "forget_blob"})
    traces: list[list[str]] = []
    for order in every_schedule({"gc1": 3, "gc2": 3, "put": 1}):
        a, b = names()

        async def prepare(world: World, a: str = a, b: str = b) -> Actors:
            data, digest = await unlinked_blob(world, a)
            putter, _ = world.gateway("put")
            runners = {}
            for name in ("gc1", "gc2"):
                runner = world.collector(name, str(digest), lockless=True)
                for backend in (runner.links, runner.blobs):
                    backend._steps = steps  # type: ignore[attr-defined]
                runners[name] = runner
            return {
                "gc1": run_collector(runners["gc1"]),
                "gc2": run_collector(runners["gc2"]),
                "put": lambda: putter.put(b, MEDIA, digest, data),
            }

        traces.append(asyncio.run(play(services, [a, b], order, prepare)))
    _collected_in_some(traces)


def _nothing() -> IncomingData:
    async def none() -> AsyncIterator[bytes]:
        return
        yield b""

    return IncomingData(none(), transport.WRITE_UPLOAD_DATA, bytes, "test", validation.data_size)

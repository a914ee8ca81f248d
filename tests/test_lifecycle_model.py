"""The data lifecycle as a model (hypothesis RuleBasedStateMachine), on SQLite and PostgreSQL.

The actors are the real code, as in tests/test_lifecycle_interleavings.py: the gateway's domain
(gateway.registry.Registry, gateway.uploads.Uploads over its gRPC adapters) and the collector
(collector.runner.Runner over its gRPC adapters), against real blobsvc and linksvc processes.
Hypothesis picks a sequence of rules:

- push: PutBlob of one of a few small payloads into one of a few repositories;
- mount: with a source (succeeds iff the model says the source links the blob, else
  NOT_FOUND / BLOB_UNKNOWN) or without one (iff any repository links it);
- unlink (succeeds iff the model says it is linked, else NOT_FOUND / BLOB_UNKNOWN);
- an upload: start, write, commit (a written upload commits its staged bytes, an unwritten one
  commits with the data: the data-with-commit path);
- the collector: mark, a sweep (grace 0), both, or a whole run (purge with a day's expiry,
  mark, sweep, under the runner lock); and a sweep of the candidates an earlier rule marked and
  listed (a collector that paused between its ListCollectable and its fences while the others
  went on);
- advance the collector's clock (the only injectable clock: linksvc and blobsvc keep real
  time), and purge with an upload expiry of an hour: the staging areas of active uploads must
  be kept whatever the collector's clock says (their commits must still succeed);
- purge with an upload expiry of 0: every upload in flight is abandoned, and the model expects
  its write or commit to answer NOT_FOUND / BLOB_UPLOAD_UNKNOWN from then on;
- crash and restart (once per example: a restart costs a second): kill -9 blobsvc or linksvc,
  start it again on the same data directory or database (a new port: the clients are rebuilt),
  and check the invariant at once, retrying UNAVAILABLE until the new process serves.

After every rule (the invariant): every link of the example's repositories resolves to bytes
that blobsvc serves and that hash to the link's digest (no dangling link), and the links are
exactly those the model says (nothing lost, nothing extra). Every answer is the one the model
expects, or ABORTED / BLOB_DELETING (retryable: the model then changes nothing); UNAVAILABLE
is retried only right after a restart, and fails the test anywhere else.

The services are started once per database; each example has repositories and payloads of its
own (a random tag), so the collector also sweeps earlier examples' leftovers, and no other
example's link can keep an example's blob alive.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.internal.conjecture import engine
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from collector.grpc_backends import GrpcBlobStorage, GrpcLinkIndex
from collector.model import IndexedBlob, Page
from collector.runner import Options, Runner
from collector.stats import OK, RunStats
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
from tests.services import ServiceProcess, spawn
from tests.stack import DB_KINDS, database

T = TypeVar("T")

MEDIA = "application/octet-stream"
REPOSITORIES = ("a", "b", "c")
PAYLOAD_SIZES = (1, 700, 3000)  # bytes after the example's tag
ABORTED_DELETING = (grpc.StatusCode.ABORTED, Reason.BLOB_DELETING)
NOT_LINKED = (grpc.StatusCode.NOT_FOUND, Reason.BLOB_UNKNOWN)
UPLOAD_UNKNOWN = (grpc.StatusCode.NOT_FOUND, Reason.BLOB_UPLOAD_UNKNOWN)
HOUR = 3600.0
# The collector's deadlines: a delete must end well before another run may take its blob over.
TAKEOVER, DELETE_TIMEOUT = 20.0, 10.0
MAX_RESTARTS = 1  # per example: a restart costs a second or so (the process imports)

# Examples per database: LINKEDBLOB_MODEL_EXAMPLES (30 in `make test`, ~1 min each; run 200+
# after changing the lifecycle).
EXAMPLES = int(os.environ.get("LINKEDBLOB_MODEL_EXAMPLES", "30"))

SETTINGS = settings(
    max_examples=EXAMPLES,
    stateful_step_count=40,
    deadline=None,
    database=None,  # nothing written into the repository
    report_multiple_bugs=False,  # shrink the first failure only (each step is real I/O)
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# --- the services -----------------------------------------------------------------------------


@dataclass
class Services:
    """blobsvc and linksvc, restartable (kill -9, then the same arguments; a new port)."""

    blob_args: tuple[str, ...]
    link_args: tuple[str, ...]
    blob: ServiceProcess = field(init=False)
    link: ServiceProcess = field(init=False)
    restarts: int = 0
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)
    tally: Counter[str] = field(default_factory=Counter)  # what the examples did, for the log

    def __post_init__(self) -> None:
        # One event loop for the gateway's domain, in a thread of its own, for the whole
        # module (grpc.aio does not like a loop per call).
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def start(self, which: str) -> None:
        args = self.blob_args if which == "blob" else self.link_args
        setattr(self, which, spawn(which, *args, "--log-level", "WARNING"))

    def crash_and_restart(self, which: str) -> None:
        proc: ServiceProcess = getattr(self, which)
        proc.proc.kill()  # SIGKILL
        proc.proc.wait()
        self.start(which)
        self.restarts += 1

    def stop(self) -> None:
        for which in ("link", "blob"):
            proc = getattr(self, which, None)
            if proc is not None:
                proc.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


@pytest.fixture(scope="module", params=DB_KINDS)
def services(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Services]:
    directory: Path = tmp_path_factory.mktemp(f"model-{request.param}")
    with database(request.param, directory) as url:
        svc = Services(("--data", str(directory / "blobs")), ("--db", url, "--migrate"))
        try:
            svc.start("blob")
            svc.start("link")
            yield svc
        finally:
            svc.stop()


# --- the model --------------------------------------------------------------------------------


@dataclass
class Upload:
    id: str  # the session's (random: the model keys uploads by a counter, so that hypothesis
    # draws the same upload when it replays the same choices)
    repository: str
    payload: int
    written: bool = False
    purged: bool = False  # the model expects its write or commit to find it unknown


def _nothing() -> IncomingData:
    async def none() -> AsyncIterator[bytes]:
        return
        yield b""

    return IncomingData(none(), transport.WRITE_UPLOAD_DATA, bytes, "test", validation.data_size)


class StaleListing:
    """The collector's index, whose ListCollectable answers (once) the candidates an earlier
    rule listed: a collector that paused between listing and fencing."""

    def __init__(self, inner: GrpcLinkIndex, listed: list[IndexedBlob]):
        self._inner, self._listed = inner, listed

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def list_collectable(self, *args: Any, **kwargs: Any) -> Page[IndexedBlob]:
        return Page(self._listed, "")


def _answer(err: LinkedBlobError) -> tuple[grpc.StatusCode, str]:
    return err.code, err.reason


class Lifecycle(RuleBasedStateMachine):
    services: Services  # set by the test (run_state_machine_as_test makes instances)

    def __init__(self) -> None:
        super().__init__()
        tag = secrets.token_hex(5)
        self.repositories = [f"model/{name}-{tag}" for name in REPOSITORIES]
        self.payloads = [
            f"{tag}:{i}:".encode() + secrets.token_bytes(size)
            for i, size in enumerate(PAYLOAD_SIZES)
        ]
        self.digests = [Digest.of(p, "sha256") for p in self.payloads]
        self.links: dict[str, set[int]] = {r: set() for r in self.repositories}
        self.uploads: dict[int, Upload] = {}  # by a counter, not by the random id
        self.started = 0
        self.clock_offset = 0.0
        self.listed: list[IndexedBlob] | None = None
        self.restarts = 0

    # --- calling the actors -----------------------------------------------------------------

    def gateway(self, body: Callable[[Registry, Uploads], Awaitable[T]]) -> T:
        """Runs ``body`` with the gateway's domain over fresh backends."""

        async def run() -> T:
            blobs = GrpcBlobBackend(self.services.blob.address, lambda: None)
            links = GrpcLinkBackend(self.services.link.address)
            registry = Registry(blobs, links, enable_delete=True, deleting_backoff=())
            try:
                return await body(registry, Uploads(blobs, links, deleting_backoff=()))
            finally:
                await registry.close()
                await blobs.close()
                await links.close()

        return self.services.run(run())

    def collector(
        self,
        body: Callable[[Runner], T],
        *,
        upload_expiry: float = 86400,
        listed: list[IndexedBlob] | None = None,
    ) -> T:
        """Runs ``body`` with a collector over fresh backends; with ``listed``, its
        ListCollectable answers those candidates."""
        self.services.tally[f"rule {sys._getframe(1).f_code.co_name}"] += 1
        links = GrpcLinkIndex(self.services.link.address)
        blobs = GrpcBlobStorage(self.services.blob.address)
        options = Options(
            grace=0, upload_expiry=upload_expiry, takeover=TAKEOVER, delete_timeout=DELETE_TIMEOUT
        )
        link_index: Any = links
        if listed is not None:
            link_index = StaleListing(links, listed)
        runner = Runner(
            link_index,
            blobs,
            options,
            clock=lambda: time.time() + self.clock_offset,
            holder=f"model-{secrets.token_hex(4)}",
        )
        try:
            result = body(runner)
        finally:
            links.close()
            blobs.close()
        if isinstance(result, RunStats):
            for name in ("marked", "revived", "fence_lost", "reclaimed_blobs", "sessions_purged"):
                self.services.tally[f"gc {name}"] += getattr(result, name)
        return result

    def expect(self, outcome: object, *allowed: tuple[grpc.StatusCode, str]) -> bool:
        """True for a success; False for an answer in ``allowed`` or BLOB_DELETING (retryable:
        the model changes nothing); anything else fails the test."""
        if not isinstance(outcome, LinkedBlobError):
            return True
        self.services.tally[f"answer {outcome.code.name} {outcome.reason}"] += 1
        if _answer(outcome) == ABORTED_DELETING:
            return False
        assert _answer(outcome) in allowed, f"unexpected answer: {outcome!r}"
        return False

    def attempt(self, body: Callable[[Registry, Uploads], Awaitable[T]]) -> T | LinkedBlobError:
        self.services.tally[f"rule {sys._getframe(1).f_code.co_name}"] += 1
        try:
            return self.gateway(body)
        except LinkedBlobError as err:
            return err

    # --- rules ------------------------------------------------------------------------------

    @initialize()
    def begin(self) -> None:
        self.check("at the start")

    @rule(repository=st.integers(0, 2), payload=st.integers(0, 2))
    def push(self, repository: int, payload: int) -> None:
        repo, data, digest = self.repositories[repository], self.payloads[payload], payload
        outcome = self.attempt(lambda r, _: r.put(repo, MEDIA, self.digests[digest], data))
        if self.expect(outcome):
            self.links[repo].add(payload)

    @rule(
        repository=st.integers(0, 2),
        source=st.one_of(st.none(), st.integers(0, 2)),
        payload=st.integers(0, 2),
    )
    def mount(self, repository: int, source: int | None, payload: int) -> None:
        repo = self.repositories[repository]
        source_name = "" if source is None else self.repositories[source]
        digest = self.digests[payload]
        if source is None:
            mountable = any(payload in linked for linked in self.links.values())
        else:
            mountable = payload in self.links[source_name]
        outcome = self.attempt(lambda r, _: r.mount(repo, source_name, digest, MEDIA))
        if mountable:
            assert not isinstance(outcome, LinkedBlobError), (
                f"mount of a linked blob failed: {outcome!r}"
            )
            self.links[repo].add(payload)
        else:
            assert isinstance(outcome, LinkedBlobError), "mounted a blob nothing links"
            self.expect(outcome, NOT_LINKED)

    @rule(repository=st.integers(0, 2), payload=st.integers(0, 2))
    def unlink(self, repository: int, payload: int) -> None:
        repo, digest = self.repositories[repository], self.digests[payload]
        outcome = self.attempt(lambda r, _: r.delete(repo, digest))
        if payload in self.links[repo]:
            assert not isinstance(outcome, LinkedBlobError), f"unlink failed: {outcome!r}"
            self.links[repo].discard(payload)
        else:
            assert isinstance(outcome, LinkedBlobError), "unlinked a blob that was not linked"
            self.expect(outcome, NOT_LINKED)

    @precondition(lambda self: any(self.links.values()))
    @rule(data=st.data())
    def unlink_everywhere(self, data: st.DataObject) -> None:
        """Unlinks a linked blob from every repository that links it: garbage now."""
        payload = data.draw(st.sampled_from(sorted(set().union(*self.links.values()))))
        for repository, repo in enumerate(self.repositories):
            if payload in self.links[repo]:
                self.unlink(repository, payload)

    @rule(repository=st.integers(0, 2), payload=st.integers(0, 2))
    def start_upload(self, repository: int, payload: int) -> None:
        repo = self.repositories[repository]
        session = self.gateway(lambda _, u: u.start(repo))
        self.started += 1
        self.uploads[self.started] = Upload(session.id, repo, payload)

    @precondition(lambda self: any(not u.written for u in self.uploads.values()))
    @rule(data=st.data())
    def write_upload(self, data: st.DataObject) -> None:
        key = data.draw(
            st.sampled_from(sorted(k for k, u in self.uploads.items() if not u.written))
        )
        upload = self.uploads[key]
        upload_id = upload.id
        payload = self.payloads[upload.payload]
        outcome = self.attempt(
            lambda _, u: u.write(upload.repository, upload_id, 0, payload, _nothing())
        )
        if upload.purged:
            assert isinstance(outcome, LinkedBlobError), "wrote to a purged upload"
            self.expect(outcome, UPLOAD_UNKNOWN)
            del self.uploads[key]
            return
        assert not isinstance(outcome, LinkedBlobError), f"write failed: {outcome!r}"
        upload.written = True

    @precondition(lambda self: self.uploads)
    @rule(data=st.data())
    def commit_upload(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(self.uploads)))
        upload = self.uploads.pop(key)
        upload_id = upload.id
        digest = self.digests[upload.payload]
        # Unwritten: the data comes with the commit.
        last = b"" if upload.written else self.payloads[upload.payload]
        outcome = self.attempt(
            lambda _, u: u.commit(upload.repository, upload_id, digest, MEDIA, last, 0)
        )
        if upload.purged:
            assert isinstance(outcome, LinkedBlobError), "committed a purged upload"
            self.expect(outcome, UPLOAD_UNKNOWN)
            return
        if self.expect(outcome):
            self.links[upload.repository].add(upload.payload)
        else:  # BLOB_DELETING: the upload is still there; the client commits again later
            self.uploads[key] = upload

    @rule(steps=st.sampled_from(["mark", "sweep", "mark+sweep", "run"]))
    def collect(self, steps: str) -> None:
        stats = self.collector(lambda runner: _steps(runner, steps))
        assert stats.outcome == OK, (stats.outcome, stats.error)

    @rule()
    def mark_and_list(self) -> None:
        """The collector marks and lists its candidates, and pauses (sweep_listed goes on)."""

        def listing(runner: Runner) -> list[IndexedBlob]:
            runner.mark(RunStats())
            found: list[IndexedBlob] = []
            token = ""
            while True:
                page = runner.links.list_collectable(0, TAKEOVER, 1000, token)
                found += page.items
                token = page.next_token
                if not token:
                    return found

        self.listed = self.collector(listing)

    @precondition(lambda self: self.listed is not None)
    @rule()
    def sweep_listed(self) -> None:
        stats = self.collector(_sweep, listed=self.listed)
        self.listed = None
        assert stats.outcome == OK, (stats.outcome, stats.error)

    @rule(seconds=st.sampled_from([HOUR + 1, 86400 + 1]))
    def advance_clock(self, seconds: float) -> None:
        self.clock_offset += seconds

    @rule()
    def purge_after_an_hour(self) -> None:
        """A purge with an expiry of an hour on the collector's clock: the uploads in flight
        were written well within the hour by linksvc's clock, so none is purged (and the
        staging areas of active sessions are kept whatever the collector's clock says)."""
        stats = self.collector(_purge, upload_expiry=HOUR)
        assert (stats.sessions_purged, stats.failures) == (0, 0), stats

    @rule()
    def purge_everything(self) -> None:
        """A purge with an expiry of 0: every upload in flight is abandoned."""
        stats = self.collector(_purge, upload_expiry=0)
        assert stats.failures == 0, stats
        for upload in self.uploads.values():
            upload.purged = True

    @precondition(lambda self: self.restarts < MAX_RESTARTS)
    @rule(which=st.sampled_from(["blob", "link"]))
    def crash_and_restart(self, which: str) -> None:
        self.services.crash_and_restart(which)
        self.restarts += 1
        self.services.tally["rule crash_and_restart"] += 1
        # Right after the restart a call may answer UNAVAILABLE: retried until it serves.
        self.check("right after the restart", retry_unavailable=True)

    # --- the invariant ----------------------------------------------------------------------

    @invariant()
    def nothing_dangles_nothing_lost(self) -> None:
        self.check("after the rule")

    def check(self, where: str, *, retry_unavailable: bool = False) -> None:
        """Every link of the repositories resolves to bytes that hash to its digest, and the
        links are those the model says."""
        with (
            grpc.insecure_channel(self.services.link.address) as link_channel,
            grpc.insecure_channel(
                self.services.blob.address, options=transport.channel_options()
            ) as blob_channel,
        ):
            links_stub = link_pb2_grpc.LinkServiceStub(link_channel)  # type: ignore[no-untyped-call]
            blobs_stub = blob_pb2_grpc.BlobServiceStub(blob_channel)  # type: ignore[no-untyped-call]
            for repository in self.repositories:
                request = link_pb2.ListLinksRequest(repository=repository, page_size=1000)
                page = _rpc(
                    lambda q=request: links_stub.ListLinks(q, timeout=30), retry_unavailable
                )
                linked = {blob.digest for blob in page.blobs}
                for digest in sorted(linked):
                    data: bytes | None
                    try:
                        data = _rpc(lambda d=digest: _read(blobs_stub, d), retry_unavailable)
                    except grpc.RpcError as err:
                        data, code = None, err.code()  # type: ignore[attr-defined]
                    # Failed outside the except block: the same failure whatever gRPC's
                    # traceback (hypothesis tells failures apart by their context too).
                    if data is None:
                        pytest.fail(f"{where}: {repository} links {digest}, unreadable: {code}")
                    actual = "sha256:" + hashlib.sha256(data).hexdigest()
                    assert actual == digest, f"{where}: {repository}'s {digest} has other bytes"
                expected = {str(self.digests[p]) for p in self.links[repository]}
                assert linked == expected, (
                    f"{where}: {repository} links {sorted(linked)}, the model {sorted(expected)}"
                )


def _rpc(call: Callable[[], T], retry_unavailable: bool) -> T:
    deadline = time.monotonic() + 15
    while True:
        try:
            return call()
        except grpc.RpcError as err:
            code = err.code()  # type: ignore[attr-defined]
            if not retry_unavailable or code != grpc.StatusCode.UNAVAILABLE:
                raise
            if time.monotonic() > deadline:
                raise
        time.sleep(0.1)


def _read(stub: blob_pb2_grpc.BlobServiceStub, digest: str) -> bytes:
    return b"".join(
        chunk.data for chunk in stub.Read(blob_pb2.ReadRequest(digest=digest), timeout=30)
    )


def _steps(runner: Runner, steps: str) -> RunStats:
    if steps == "run":
        return runner.run()
    stats = RunStats()
    if "mark" in steps:
        runner.mark(stats)
    if "sweep" in steps:
        runner.sweep(stats)
    return stats


def _sweep(runner: Runner) -> RunStats:
    stats = RunStats()
    runner.sweep(stats)
    return stats


def _purge(runner: Runner) -> RunStats:
    stats = RunStats()
    runner.purge(stats)
    return stats


@pytest.mark.timeout(600)
def test_the_lifecycle_model(services: Services, monkeypatch: pytest.MonkeyPatch) -> None:
    # Each step is real I/O (and a restart a second): shrinking a failure gets 90 s, not
    # hypothesis's 300 (its only knob; the failing example is reported either way).
    monkeypatch.setattr(engine, "MAX_SHRINKING_SECONDS", 90, raising=False)
    started = time.monotonic()
    machine = type("LifecycleOn", (Lifecycle,), {"services": services})
    run_state_machine_as_test(machine, settings=SETTINGS)
    took = time.monotonic() - started
    print(f"lifecycle model: {took:.1f}s, {services.restarts} restarts; {dict(services.tally)}")

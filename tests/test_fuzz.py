"""Fuzzing every RPC of the three services, at the message level and at the byte level.

One stack per module (blobsvc on a temporary directory, linksvc on a SQLite file with
--migrate, a gateway in front, with a grant secret and deletes enabled), seeded with a few
blobs, repositories and uploads so that generated calls reach past validation. Each method of
linkedblob.v1.Registry, linkedblob.blob.v1.BlobService and linkedblob.link.v1.LinkService
(enumerated from the generated descriptors) gets two hypothesis tests: valid messages built from
the descriptors (tests/fuzzing.py `messages`; a client stream gets a sequence), and bytes that
are not a valid message (random, truncated, wrong wire types, invalid UTF-8, overlong varints...).
Calls to blobsvc mostly carry the gateway's internal grant (else none, or a forged one).

After every call (the properties):
- no UNKNOWN; no INTERNAL nor DATA_LOSS (every call here is a client's doing); no
  DEADLINE_EXCEEDED (each call has a deadline far above its work: that is a hang);
- every non-OK status carries a google.rpc.ErrorInfo with a reason;
- a refused call changes nothing: linksvc's tables (every row) and blobsvc's committed blobs and
  staging areas (names and sizes) are as before; see REFUSAL_MAY_CHANGE for the few methods
  that may keep what they received before refusing; a read-only method changes nothing at all;
- all three services still answer their health check.

Counts: LINKEDBLOB_FUZZ_EXAMPLES is the total number of cases of the file, shared equally by
its tests (default 480 in `make test`: about 30 s on a 2-core machine). The full run is
``LINKEDBLOB_FUZZ_EXAMPLES=10000 pytest tests/test_fuzz.py``. Runs are derandomized (the same
cases every time, as CI needs); LINKEDBLOB_FUZZ_RANDOM=1 draws fresh ones.
LINKEDBLOB_FUZZ_LOG=FILE appends one JSON line per call made (shrinking included): the method,
the status and reason, and the property it broke if any, to count cases and tell the distinct
failures of a long run apart.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from linkedblob import grants
from linkedblob.blob.v1 import blob_pb2, blob_pb2_grpc
from linkedblob.errors import error_info
from linkedblob.v1 import registry_pb2, registry_pb2_grpc
from tests import fuzzing
from tests.fuzzing import Method, Pools
from tests.stack import Stack, registry_channel, running_stack

EXAMPLES = int(os.environ.get("LINKEDBLOB_FUZZ_EXAMPLES", "480"))
RANDOM = os.environ.get("LINKEDBLOB_FUZZ_RANDOM") == "1"
LOG = os.environ.get("LINKEDBLOB_FUZZ_LOG", "")
METHODS = fuzzing.methods()
PER_TEST = max(1, math.ceil(EXAMPLES / (2 * len(METHODS))))
# Far above what any generated call needs (the largest sends 4 MiB): exceeding it is a hang.
CALL_TIMEOUT = 30.0

FUZZ_SETTINGS = settings(
    max_examples=PER_TEST,
    deadline=None,
    derandomize=not RANDOM,
    database=None,
    suppress_health_check=list(HealthCheck),
)

# Methods that change nothing, whatever they answer.
READ_ONLY = {
    "Registry.StatBlob",
    "Registry.ReadBlob",
    "Registry.LocateBlob",
    "Registry.GetUpload",
    "Registry.ListBlobs",
    "Registry.ListRepositories",
    "BlobService.Stat",
    "BlobService.FindMissing",
    "BlobService.Read",
    "BlobService.UploadStatus",
    "BlobService.List",
    "BlobService.ListUploads",
    "LinkService.StatBlob",
    "LinkService.Resolve",
    "LinkService.ListLinks",
    "LinkService.ListRepositories",
    "LinkService.GetSession",
    "LinkService.ListStaleSessions",
    "LinkService.ListCollectable",
    "LinkService.ListBlobs",
}
# What a refused call of these methods may have changed: a write stream stages the data
# messages it received before a later message (or the commit at its end) was refused, as the
# protocol says (the staged bytes are kept for a retry), and the gateway advances the
# upload's session with them. (A commit through the gateway, CommitUpload and PushBlob, takes
# a blob lease before it writes or verifies anything, and gives it back, ReleaseLease, before
# it answers a refusal: blob_leases is as before.)
REFUSAL_MAY_CHANGE = {
    "BlobService.Write": {"blob:uploads"},
    "Registry.WriteUpload": {"blob:uploads", "link:upload_sessions"},
    "Registry.CommitUpload": {"blob:uploads", "link:upload_sessions"},
}

PAYLOADS = [b"", b"fuzz", b"0123456789" * 10, bytes(range(256))]


@dataclass
class Fuzzed:
    stack: Stack
    channels: dict[str, grpc.Channel]
    pools: Pools
    db_path: Path
    internal: tuple[tuple[str, str], ...]  # blobsvc call metadata with the internal grant

    def __repr__(self) -> str:  # hypothesis prints the arguments of a failing example
        return f"Fuzzed(gateway={self.stack.address})"


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzed]:
    directory = tmp_path_factory.mktemp("fuzz")
    with running_stack("sqlite", directory) as stack:
        channels = {
            "gateway": registry_channel(stack.gateway.address),
            "blob": registry_channel(stack.blob.address),
            "link": registry_channel(stack.link.address),
        }
        internal = stack.blob_metadata()
        assert internal is not None  # the stack runs with a grant secret
        pools = seed(channels, internal)
        try:
            yield Fuzzed(stack, channels, pools, directory / "link.db", internal)
        finally:
            for channel in channels.values():
                channel.close()


def seed(channels: dict[str, grpc.Channel], internal: tuple[tuple[str, str], ...]) -> Pools:
    """Blobs linked in two repositories, two upload sessions (one written), and a staging area
    at blobsvc: the values the strategies bias to."""
    registry = registry_pb2_grpc.RegistryStub(channels["gateway"])
    for data in PAYLOADS:
        registry.PutBlob(registry_pb2.PutBlobRequest(repository="fuzz/a", data=data))
    for data in PAYLOADS[1:3]:
        registry.PutBlob(
            registry_pb2.PutBlobRequest(repository="fuzz/b", data=data, media_type="text/plain")
        )
    ids = [registry.StartUpload(registry_pb2.StartUploadRequest(repository="fuzz/a")).id]
    ids.append(registry.StartUpload(registry_pb2.StartUploadRequest(repository="fuzz/b")).id)
    registry.WriteUpload(
        iter([registry_pb2.WriteUploadRequest(repository="fuzz/b", upload_id=ids[1], data=b"ab")])
    )
    blobs = blob_pb2_grpc.BlobServiceStub(channels["blob"])
    blobs.Write(
        iter([blob_pb2.WriteRequest(upload_id="fuzz-staged", data=b"staged")]),
        metadata=internal,
    )
    return Pools(list(PAYLOADS), ["fuzz/a", "fuzz/b", "fuzz/none"], [*ids, "fuzz-staged"])


# --- one call, and what is checked after it ------------------------------------------------


@dataclass
class Outcome:
    code: grpc.StatusCode
    details: str = ""
    reason: str = ""
    status_error: str = ""  # the status details could not be read back


def invoke(
    channel: grpc.Channel,
    method: Method,
    requests: Sequence[bytes],
    metadata: tuple[tuple[str, str], ...] | None,
) -> Outcome:
    """Calls ``method`` with raw request bytes (no serializer: bytes go on the wire as they
    are), reading every response of a server stream."""
    kwargs = {"timeout": CALL_TIMEOUT, "metadata": metadata}
    try:
        if method.client_streaming and method.server_streaming:
            for _ in channel.stream_stream(method.path)(iter(requests), **kwargs):
                pass
        elif method.client_streaming:
            channel.stream_unary(method.path)(iter(requests), **kwargs)
        elif method.server_streaming:
            for _ in channel.unary_stream(method.path)(requests[0], **kwargs):
                pass
        else:
            channel.unary_unary(method.path)(requests[0], **kwargs)
    except grpc.RpcError as err:
        outcome = Outcome(err.code(), err.details() or "")  # type: ignore[attr-defined]
        try:
            info = error_info(err)
        except ValueError as exc:  # the status detail's code disagrees with the call's
            outcome.status_error = str(exc)
        else:
            outcome.reason = info.reason if info is not None else ""
        return outcome
    return Outcome(grpc.StatusCode.OK)


Snapshot = dict[str, frozenset[str]]


def snapshot(fuzzed: Fuzzed) -> Snapshot:
    """Every row of linksvc's tables, and blobsvc's committed blobs and staging areas (names
    and sizes). The gateway's private push-* staging areas are left out: a failed PushBlob
    aborts its own in the background, after the call has answered."""
    state: Snapshot = {}
    con = sqlite3.connect(f"file:{fuzzed.db_path}?mode=ro", uri=True, timeout=30)
    try:
        tables = con.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
        ).fetchall()
        for (table,) in tables:
            rows = con.execute(f'SELECT * FROM "{table}"').fetchall()
            state[f"link:{table}"] = frozenset(repr(row) for row in rows)
    finally:
        con.close()
    root = fuzzed.stack.data / "blobs"
    for part in ("blobs", "uploads"):
        entries = set()
        for dirpath, _, files in os.walk(root / part):
            rel = os.path.relpath(dirpath, root / part)
            if part == "uploads" and rel.startswith("push-"):
                continue
            entries.add(rel + "/")
            for name in files:
                size = os.stat(os.path.join(dirpath, name)).st_size
                entries.add(f"{rel}/{name} {size}")
        state[f"blob:{part}"] = frozenset(entries)
    return state


def changes(before: Snapshot, after: Snapshot) -> dict[str, str]:
    out = {}
    for key in sorted(before.keys() | after.keys()):
        old, new = before.get(key, frozenset()), after.get(key, frozenset())
        if old != new:
            added, removed = sorted(new - old)[:3], sorted(old - new)[:3]
            out[key] = f"added {added} removed {removed}"
    return out


def not_serving(fuzzed: Fuzzed) -> list[str]:
    down = []
    for target, channel in fuzzed.channels.items():
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT
            )
        except grpc.RpcError as err:
            down.append(f"{target}: {err.code()} {err.details()}")  # type: ignore[attr-defined]
        else:
            if answer.status != health_pb2.HealthCheckResponse.SERVING:
                down.append(f"{target}: {answer.status}")
    return down


class FuzzViolation(AssertionError):
    """A property broken. Each kind is a class of its own, so hypothesis tells them apart and
    shrinks and reports each (a method may break more than one)."""


_KINDS: dict[str, type[FuzzViolation]] = {}


def violation(kind: str, message: str) -> FuzzViolation:
    cls = _KINDS.setdefault(kind, type(f"Fuzz_{kind}", (FuzzViolation,), {}))
    return cls(message)


def fuzz_call(
    fuzzed: Fuzzed, method: Method, requests: Sequence[bytes | Message], grant: str
) -> None:
    broken = ""
    try:
        _fuzz_call(fuzzed, method, requests, grant)
    except FuzzViolation as exc:
        broken = f"{type(exc).__name__}: {exc}"[:2000]
        raise
    finally:
        if LOG:
            level = "bytes" if any(isinstance(r, bytes) for r in requests) else "messages"
            line = {"t": round(time.time(), 3), "method": method.name, "level": level}
            with open(LOG, "a") as f:
                f.write(json.dumps({**line, **_last, "broken": broken}) + "\n")


_last: dict[str, str] = {}


def _fuzz_call(
    fuzzed: Fuzzed, method: Method, requests: Sequence[bytes | Message], grant: str
) -> None:
    wire = [r if isinstance(r, bytes) else r.SerializeToString() for r in requests]
    metadata = None
    if method.target == "blob" and grant != "none":
        forged = ((grants.METADATA_KEY, "v1.Zm9yZ2Vk.bWFj"),)
        metadata = fuzzed.internal if grant == "internal" else forged
    _last.clear()
    before = snapshot(fuzzed)
    outcome = invoke(fuzzed.channels[method.target], method, wire, metadata)
    after = snapshot(fuzzed)
    down = not_serving(fuzzed)
    code = outcome.code
    _last.update(code=code.name, reason=outcome.reason, grant=grant)
    what = (
        f"{method.name} ({grant} grant) answered {code.name} reason={outcome.reason or '-'} "
        f"{outcome.details!r} to {fuzzing.describe(requests)}"
    )
    if code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.DATA_LOSS):
        raise violation(code.name, what)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        raise violation("HANG", what)
    if code != grpc.StatusCode.OK and not outcome.reason:
        raise violation(f"NO_REASON_{code.name}", f"{what} {outcome.status_error}")
    changed = changes(before, after)
    if method.name in READ_ONLY:
        allowed: set[str] = set()
    elif code != grpc.StatusCode.OK:
        allowed = REFUSAL_MAY_CHANGE.get(method.name, set())
    else:
        allowed = set(changed)
    unexpected = {k: v for k, v in changed.items() if k not in allowed}
    if unexpected:
        raise violation("STATE_CHANGED", f"{what}; changed: {unexpected}")
    if down:
        raise violation("NOT_SERVING", f"{what}; then not serving: {down}")


GRANTS = st.sampled_from(["internal", "internal", "internal", "none", "forged"])


def _id(method: Method) -> str:
    return method.name


@pytest.mark.parametrize("method", METHODS, ids=_id)
@FUZZ_SETTINGS
@given(data=st.data())
def test_fuzz_messages(fuzzed: Fuzzed, method: Method, data: st.DataObject) -> None:
    requests = data.draw(fuzzing.request_messages(method, fuzzed.pools), label="requests")
    fuzz_call(fuzzed, method, requests, data.draw(GRANTS, label="grant"))


@pytest.mark.parametrize("method", METHODS, ids=_id)
@FUZZ_SETTINGS
@given(data=st.data())
def test_fuzz_bytes(fuzzed: Fuzzed, method: Method, data: st.DataObject) -> None:
    requests = data.draw(fuzzing.raw_requests(method, fuzzed.pools), label="requests")
    fuzz_call(fuzzed, method, requests, data.draw(GRANTS, label="grant"))


def test_fuzz_covers_every_rpc() -> None:
    """Every method of the three services is fuzzed, read from the descriptors (a new RPC
    needs no change here), and the count is as asked."""
    names = {m.name for m in METHODS}
    assert "Registry.PushBlob" in names and "LinkService.Link" in names
    assert len(names) == sum(len(s.methods) for s in fuzzing.SERVICES.values())
    assert PER_TEST * 2 * len(METHODS) >= EXAMPLES
    assert names >= READ_ONLY | set(REFUSAL_MAY_CHANGE)

"""gateway.limits and linkedblob.limits without a server: the session rate is keyed by the
caller's identity (set by authentication), else by the peer's address; the token bucket."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from gateway.fakes import FakeBlobBackend, FakeLinkBackend
from gateway.limits import _PEER_HOST, Limits, LimitSettings, peer_host
from gateway.uploads import Uploads
from linkedblob.caller import set_caller
from linkedblob.errors import LinkedBlobError, Reason
from linkedblob.limits import ServerLimits, TokenBucket


def test_session_starts_are_limited_per_caller_identity() -> None:
    limits = Limits(LimitSettings(session_rate=0.001, session_burst=2))
    uploads = limits.limit_session_starts(Uploads(FakeBlobBackend(), FakeLinkBackend()))

    async def starts(identity: str, peer: str, count: int) -> list[str]:
        set_caller(identity)
        _PEER_HOST.set(peer)
        outcomes = []
        for _ in range(count):
            try:
                await uploads.start("rate/a")
                outcomes.append("ok")
            except LinkedBlobError as err:
                assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert (err.reason, err.metadata) == (
                    Reason.TOO_MANY_REQUESTS,
                    {"limit": "session-rate"},
                )
                outcomes.append("refused")
        return outcomes

    async def scenario() -> None:
        # Each in its own task, as each call is: the caller belongs to the call.
        assert await asyncio.create_task(starts("alice", "ipv4:10.0.0.1", 3)) == [
            "ok",
            "ok",
            "refused",
        ]
        # Another identity from the same address has its own bucket...
        assert await asyncio.create_task(starts("bob", "ipv4:10.0.0.1", 1)) == ["ok"]
        # ...and anonymous callers are told apart by address.
        assert await asyncio.create_task(starts("", "ipv4:10.0.0.2", 3)) == [
            "ok",
            "ok",
            "refused",
        ]
        assert await asyncio.create_task(starts("", "ipv4:10.0.0.3", 1)) == ["ok"]

    asyncio.run(scenario())


def test_no_session_rate_leaves_uploads_as_they_are() -> None:
    uploads = Uploads(FakeBlobBackend(), FakeLinkBackend())
    assert "start" not in vars(Limits(LimitSettings(session_rate=0)).limit_session_starts(uploads))


@pytest.mark.parametrize(
    ("peer", "host"),
    [
        ("ipv4:127.0.0.1:5555", "ipv4:127.0.0.1"),
        ("ipv6:[::1]:5555", "ipv6:[::1]"),
        ("unix:/tmp/sock", "unix:/tmp/sock"),
        ("", ""),
    ],
)
def test_peer_host_drops_the_port(peer: str, host: str) -> None:
    assert peer_host(peer) == host


def test_token_bucket_refills_and_forgets_the_oldest_keys() -> None:
    bucket = TokenBucket(rate=2.0, burst=3, max_keys=2)
    assert [bucket.take("a", now=0.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.take("a", now=0.5)  # one token back after half a second at 2/s
    assert not bucket.take("a", now=0.5)
    bucket.take("b", now=0.5)
    bucket.take("c", now=0.5)  # a third key: "a" (least recently used) is forgotten
    assert bucket.take("a", now=0.5)  # starts full again


def test_server_limits_options() -> None:
    options = dict(ServerLimits().options())
    assert options["grpc.max_concurrent_streams"] == 100
    assert options["grpc.max_connection_idle_ms"] == 300_000
    assert options["grpc.max_connection_age_ms"] == 300_000  # 5m: clients rebalance over gateways
    assert options["grpc.max_connection_age_grace_ms"] == 86_400_000
    off = ServerLimits(
        max_streams_per_connection=0, max_connection_idle=0, max_connection_age=0
    ).options()
    assert off == []

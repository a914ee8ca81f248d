"""Limits every server shares: streams per connection, idle and old connections (gRPC channel
options, set by linkedblob.server from the flags of :func:`add_limit_options`), and the token
bucket the gateway's rate limits use.

What gRPC does at ``grpc.max_concurrent_streams`` (seen in tests/test_limits.py): the server
advertises it in its HTTP/2 SETTINGS, and a gRPC client that reaches it queues its further calls
on that connection until a stream ends (no error: they start later, or meet their deadline).
A stream the client opens over the limit anyway (before it has the SETTINGS, or as another
ends, before the server has counted that one out; or a peer that ignores SETTINGS) is reset by
the server's transport with REFUSED_STREAM before any handler runs: the caller sees UNAVAILABLE
(retryable, nothing was processed; Python's aio client says INTERNAL "Internal error from Core"
when the reset races its own write). Either way the server never holds more than that many
streams of one connection, which is what bounds it. A per-connection counter of our own would
never see more streams than that, so there is none; the refusals with RESOURCE_EXHAUSTED /
TOO_MANY_REQUESTS come from the limits that count what the streams do (open uploads, session
rate: gateway.limits; sessions per repository: linksvc).

``grpc.max_connection_idle_ms``: a connection with no call in flight for that long is sent a
GOAWAY (a gRPC client reconnects on its next call). ``grpc.max_connection_age_ms``: a
connection older than that (gRPC adds ±10 % jitter) is sent a GOAWAY, so clients reconnect and
spread over replicas and pick up reloaded certificates; the calls in flight on it then have
``grpc.max_connection_age_grace_ms`` to finish before the connection is closed. The grace is
long by default (24 h) so that a long upload is never cut by the age limit: its stream simply
finishes on the old connection.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

from linkedblob.config import add_duration_option, add_option

DEFAULT_MAX_STREAMS_PER_CONNECTION = 100
# blobsvc and linksvc: a gateway multiplexes every relayed upload and read onto its one
# connection to each, so their limit must sit well above a gateway's --max-open-uploads plus
# its concurrent reads.
DEFAULT_MAX_STREAMS_PER_INTERNAL_CONNECTION = 1000
DEFAULT_MAX_CONNECTION_IDLE = "5m"
DEFAULT_MAX_CONNECTION_AGE = "5m"
DEFAULT_MAX_CONNECTION_AGE_GRACE = "24h"


@dataclass(frozen=True)
class ServerLimits:
    """Connection limits of a server (0 turns one off)."""

    max_streams_per_connection: int = DEFAULT_MAX_STREAMS_PER_CONNECTION
    max_connection_idle: float = 300.0  # seconds
    max_connection_age: float = 300.0
    max_connection_age_grace: float = 86_400.0

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ServerLimits:
        return cls(
            max_streams_per_connection=args.max_streams_per_connection,
            max_connection_idle=args.max_connection_idle,
            max_connection_age=args.max_connection_age,
            max_connection_age_grace=args.max_connection_age_grace,
        )

    def options(self) -> list[tuple[str, int]]:
        """The gRPC server options that enforce these limits."""
        out: list[tuple[str, int]] = []
        if self.max_streams_per_connection > 0:
            out.append(("grpc.max_concurrent_streams", self.max_streams_per_connection))
        if self.max_connection_idle > 0:
            out.append(("grpc.max_connection_idle_ms", _ms(self.max_connection_idle)))
        if self.max_connection_age > 0:
            out.append(("grpc.max_connection_age_ms", _ms(self.max_connection_age)))
            out.append(("grpc.max_connection_age_grace_ms", _ms(self.max_connection_age_grace)))
        return out


def _ms(seconds: float) -> int:
    # gRPC takes a C int: cap at ~24 days.
    return min(int(seconds * 1000), 2**31 - 1)


def add_limit_options(parser: argparse.ArgumentParser, *, internal: bool = False) -> None:
    """The connection-limit flags every server takes (linkedblob.config.add_server_options);
    ``internal``: a backend (blobsvc, linksvc), called by gateways."""
    add_option(
        parser,
        "--max-streams-per-connection",
        type=int,
        default=DEFAULT_MAX_STREAMS_PER_INTERNAL_CONNECTION
        if internal
        else DEFAULT_MAX_STREAMS_PER_CONNECTION,
        help="most concurrent calls (HTTP/2 streams) one connection may have open; a gRPC "
        "client queues further calls until one ends; 0: gRPC's default (no limit)",
    )
    add_duration_option(
        parser,
        "--max-connection-idle",
        default=DEFAULT_MAX_CONNECTION_IDLE,
        help="close (GOAWAY) a connection with no call in flight for this long; 0: never",
    )
    add_duration_option(
        parser,
        "--max-connection-age",
        default=DEFAULT_MAX_CONNECTION_AGE,
        help="ask clients to reconnect (GOAWAY) after a connection is this old, so they spread "
        "over replicas and pick up new certificates; calls in flight go on for "
        "--max-connection-age-grace; 0: never",
    )
    add_duration_option(
        parser,
        "--max-connection-age-grace",
        default=DEFAULT_MAX_CONNECTION_AGE_GRACE,
        help="how long calls in flight on a connection past --max-connection-age may go on "
        "before it is closed (long, so a long upload is not cut)",
    )


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up, per key; at most ``max_keys`` keys
    remembered (the fullest, i.e. least recently limited, are forgotten first: a forgotten key
    starts full, which is what it would be anyway after a while)."""

    def __init__(self, rate: float, burst: float, max_keys: int = 10_000) -> None:
        self.rate = rate
        self.burst = max(burst, 1.0)
        self.max_keys = max_keys
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)

    def take(self, key: str, now: float | None = None) -> bool:
        """Takes one token of ``key``'s bucket; False when it is empty."""
        now = time.monotonic() if now is None else now
        tokens, at = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        self._buckets[key] = (tokens, now)  # re-inserted: the dict keeps recent keys last
        if len(self._buckets) > self.max_keys:
            # The least recently used key goes (dicts iterate in insertion order).
            del self._buckets[next(iter(self._buckets))]
        return allowed

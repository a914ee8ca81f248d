"""Who is calling: the identity a service authenticated for the call in progress.

The service that authenticates a call (the gateway from a bearer token, a policy or a client
certificate; blobsvc and linksvc from the peer's certificate) sets it; the access log line of
the call names it. A ContextVar, so it belongs to the call's task and nothing else.
"""

from __future__ import annotations

import contextvars

import grpc

# "" until a service has authenticated the call (an open service never does).
CALLER: contextvars.ContextVar[str] = contextvars.ContextVar("linkedblob_caller", default="")


def set_caller(identity: str) -> None:
    CALLER.set(identity)


def caller() -> str:
    return CALLER.get()


def peer_identities(context: grpc.aio.ServicerContext) -> tuple[str, ...]:
    """The identities of the client certificate the peer presented on this call's connection:
    its subject alternative names (DNS, URI), else its common name, as gRPC's TLS reports them;
    () without a client certificate (plaintext, or TLS without mTLS)."""
    found = context.peer_identities()
    return tuple(i.decode() if isinstance(i, bytes) else str(i) for i in found or ())

"""Who is calling: the identity a service authenticated for the call in progress.

The service that authenticates a call (the gateway from a bearer token, a policy or a client
certificate; blobsvc and linksvc from the peer's certificate) sets it; the access log line of
the call names it. A ContextVar, so it belongs to the call's task and nothing else.
"""

from __future__ import annotations

import contextvars

# "" until a service has authenticated the call (an open service never does).
CALLER: contextvars.ContextVar[str] = contextvars.ContextVar("linkedblob_caller", default="")


def set_caller(identity: str) -> None:
    CALLER.set(identity)


def caller() -> str:
    return CALLER.get()

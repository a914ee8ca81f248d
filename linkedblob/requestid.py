"""The request id of the call in progress (metadata ``x-request-id``).

The gateway is the edge: it takes the id its caller sent (when it is printable ASCII of at most
:data:`MAX_LENGTH` characters) or makes one, returns it in the call's trailing metadata, and the
backend calls it makes carry it (linkedblob.interceptors), so blobsvc's and linksvc's access log
lines name the same id as the gateway's. A ContextVar, like linkedblob.caller: it belongs to the
call's task.
"""

from __future__ import annotations

import contextvars
import os
import re
from typing import Any

KEY = "x-request-id"
MAX_LENGTH = 128
_VALID = re.compile(r"[\x21-\x7e]{1,128}")  # MAX_LENGTH printable ASCII, no space

REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar(
    "linkedblob_request_id", default=""
)


class _Role:
    """Whether this process is the edge (the gateway) that makes and returns request ids."""

    __slots__ = ("edge",)

    def __init__(self) -> None:
        self.edge = False


ROLE = _Role()


def serve_as_edge() -> None:
    """Called by the gateway: a call without a valid id gets a new one, returned to the caller."""
    ROLE.edge = True


def new() -> str:
    return os.urandom(8).hex()


def valid(value: Any) -> bool:
    return isinstance(value, str) and _VALID.fullmatch(value) is not None


def incoming(metadata: Any) -> str:
    """The valid ``x-request-id`` of a call's invocation metadata, else ""."""
    for key, value in metadata or ():
        if key == KEY:
            return value if valid(value) else ""
    return ""


def current() -> str:
    return REQUEST_ID.get()

"""Short-lived signed grants that let a client move bytes to or from blobsvc directly.

The gateway decides access (through links) and then, instead of relaying every byte, hands the
client a grant: an HMAC-SHA256-signed token naming what it may do at blobsvc — read one digest,
or write one upload — and until when. The client sends it to blobsvc in the ``linkedblob-grant``
call metadata; blobsvc, which shares the secret, checks it before touching storage. So bytes cross
one hop instead of two, as distribution redirects blob reads to S3.

A blobsvc that has a secret configured requires a grant on every call: clients get narrow ones
from the gateway, and the gateway signs itself an ``internal`` grant for its own calls. Without a
secret (the default for `linkedblob serve blob`), blobsvc trusts its network and needs none.

Token: ``v1.<base64url payload>.<base64url mac>``, payload ``action|subject|expires``, with
action ``read`` (subject: a digest), ``write`` (subject: an upload id) or ``internal`` (no
subject). Upload ids and digests contain no ``|``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from dataclasses import dataclass

import grpc

from linkedblob.errors import LinkedBlobError, Reason

METADATA_KEY = "linkedblob-grant"
READ = "read"
WRITE = "write"
INTERNAL = "internal"
_ACTIONS = (READ, WRITE, INTERNAL)
_VERSION = "v1"

# Long enough to open a stream after asking the gateway; a stream in progress is not cut when
# its grant expires (grants are checked when a call starts).
DEFAULT_TTL_SECONDS = 300


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _denied(message: str) -> LinkedBlobError:
    return LinkedBlobError(grpc.StatusCode.PERMISSION_DENIED, Reason.DENIED, message)


def _unauthenticated(message: str) -> LinkedBlobError:
    return LinkedBlobError(grpc.StatusCode.UNAUTHENTICATED, Reason.UNAUTHORIZED, message)


@dataclass(frozen=True, slots=True)
class Grant:
    action: str
    subject: str  # digest for read, upload id for write, "" for internal
    expires: int  # unix seconds

    def allows(self, action: str, subject: str) -> bool:
        return self.action == INTERNAL or (self.action == action and self.subject == subject)


class Signer:
    """Signs and verifies grants with one shared secret."""

    def __init__(self, secret: str | bytes) -> None:
        key = secret.encode() if isinstance(secret, str) else secret
        if len(key) < 16:
            raise ValueError("a grant secret needs at least 16 bytes")
        self._key = key

    def _mac(self, payload: bytes) -> bytes:
        return hmac.new(self._key, payload, hashlib.sha256).digest()

    def sign(self, action: str, subject: str = "", ttl: float = DEFAULT_TTL_SECONDS) -> str:
        if action not in _ACTIONS:
            raise ValueError(f"unknown grant action {action!r}")
        payload = f"{action}|{subject}|{int(time.time() + ttl)}".encode()
        return f"{_VERSION}.{_b64(payload)}.{_b64(self._mac(payload))}"

    def verify(self, token: str, *, now: float | None = None) -> Grant:
        """The grant a token carries; UNAUTHENTICATED / UNAUTHORIZED when it is forged,
        malformed or expired."""
        if not token:
            raise _unauthenticated(f"this call needs a grant in the {METADATA_KEY!r} metadata")
        try:
            version, payload_b64, mac_b64 = token.split(".")
            payload, mac = _unb64(payload_b64), _unb64(mac_b64)
        except ValueError as exc:
            raise _unauthenticated("malformed grant") from exc
        if version != _VERSION or not hmac.compare_digest(mac, self._mac(payload)):
            raise _unauthenticated("invalid grant signature")
        try:
            action, subject, expires_text = payload.decode().split("|")
            expires = int(expires_text)
        except ValueError as exc:
            raise _unauthenticated("malformed grant") from exc
        if expires < (time.time() if now is None else now):
            raise _unauthenticated("grant expired; ask the gateway for a new one")
        return Grant(action, subject, expires)

    def check(self, token: str, action: str, subject: str) -> Grant:
        """Verifies a token and that it allows ``action`` on ``subject``; PERMISSION_DENIED /
        DENIED when it is valid but for something else."""
        grant = self.verify(token)
        if not grant.allows(action, subject):
            raise _denied(f"grant does not allow {action} of {subject!r}")
        return grant


def token_from(context: grpc.aio.ServicerContext) -> str:
    """The grant token of an incoming call ("" when it has none)."""
    for key, value in context.invocation_metadata() or ():
        if key == METADATA_KEY:
            return value if isinstance(value, str) else value.decode()
    return ""


Metadata = tuple[tuple[str, str], ...]


class InternalGrant:
    """The call metadata of a trusted caller's own blobsvc calls (the gateway's, the
    collector's): an ``internal`` grant, long-lived because it never leaves the link between the
    two, re-signed when half of it is gone so that no call starts with one about to expire.
    None without a secret (a blobsvc without one requires no grant)."""

    TTL = 3600.0

    def __init__(self, secret: str) -> None:
        self._signer = Signer(secret) if secret else None
        self._metadata: Metadata | None = None
        self._renew_at = 0.0

    def metadata(self) -> Metadata | None:
        if self._signer is None:
            return None
        now = time.monotonic()
        if self._metadata is None or now >= self._renew_at:
            token = self._signer.sign(INTERNAL, "", self.TTL)
            self._metadata = ((METADATA_KEY, token),)
            self._renew_at = now + self.TTL / 2
        return self._metadata

"""Short-lived signed grants that let a client move bytes to or from blobsvc directly.

The gateway decides access (through links) and then, instead of relaying every byte, hands the
client a grant: an HMAC-SHA256-signed token naming what it may do at blobsvc — read one digest,
or write one upload — and until when. The client sends it to blobsvc in the ``linkedblob-grant``
call metadata; blobsvc, which shares the secret, checks it before touching storage. So bytes cross
one hop instead of two, as distribution redirects blob reads to S3.

A blobsvc that has a secret configured requires a grant on every call: clients get narrow ones
from the gateway, and the gateway signs itself an ``internal`` grant for its own calls. Without a
secret (the default for `linkedblob serve blob`), blobsvc trusts its network and needs none.

Secrets: ``--grant-secret`` (one), or ``--grant-secret-file`` (a Kubernetes Secret: one secret
per line; the first signs, every line verifies, so a rotation adds the new secret as a second
line, moves it first once every holder has re-read the file, then drops the old one). The file
is re-read when it changes (checked at most once a second).

Grants are bound to state: a write grant only appends to a staging area the gateway created
when it issued the grant (blobsvc creates none for it), so once the upload is committed or
cancelled the grant writes nothing; and its expiry is checked on every message of a Write stream.
Read grants are checked when a Read starts (the gateway issues them for ``--read-grant-ttl``).

Token: ``v1.<base64url payload>.<base64url mac>``, payload ``action|subject|expires``, with
action ``read`` (subject: a digest), ``write`` (subject: an upload id) or ``internal`` (no
subject). Upload ids and digests contain no ``|``.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import logging
import os
import threading
import time
from dataclasses import dataclass

import grpc

from linkedblob.config import add_option
from linkedblob.errors import LinkedBlobError, Reason

log = logging.getLogger(__name__)

METADATA_KEY = "linkedblob-grant"
READ = "read"
WRITE = "write"
INTERNAL = "internal"
_ACTIONS = (READ, WRITE, INTERNAL)
_VERSION = "v1"

# Long enough to open a stream after asking the gateway. A Write stream is cut when its grant
# expires (checked per message; the client asks for a new one and resumes); a Read in progress
# is not.
DEFAULT_TTL_SECONDS = 300
# How often a secret file is looked at for changes.
_RELOAD_CHECK_SECONDS = 1.0
MIN_SECRET_BYTES = 16


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def unverified_action(token: str) -> str:
    """The action a grant token names, read WITHOUT checking its signature ("" when the token is
    missing or not a grant): for a gate that only sorts calls (linkedblob.peers refuses internal
    grants on blobsvc's direct port); whoever acts on the grant verifies it (Signer.verify)."""
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != _VERSION:
        return ""
    try:
        payload = _unb64(parts[1]).decode()
    except ValueError:
        return ""
    return payload.split("|", 1)[0]


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

    def expired(self, now: float | None = None) -> bool:
        return self.expires < (time.time() if now is None else now)


# ErrorInfo metadata of an expired grant's refusal: a client asks the gateway for a new one.
EXPIRED = ("grant", "expired")


def expired_error() -> LinkedBlobError:
    return LinkedBlobError(
        grpc.StatusCode.UNAUTHENTICATED,
        Reason.UNAUTHORIZED,
        "grant expired; ask the gateway for a new one",
        dict([EXPIRED]),
    )


def _keys(secrets: list[str | bytes]) -> list[bytes]:
    keys = [s.encode() if isinstance(s, str) else s for s in secrets]
    if not keys:
        raise ValueError("no grant secret")
    for key in keys:
        if len(key) < MIN_SECRET_BYTES:
            raise ValueError(f"a grant secret needs at least {MIN_SECRET_BYTES} bytes")
    return keys


def _read_secret_file(path: str) -> list[str | bytes]:
    """The secrets of a file: one per non-empty line (surrounding whitespace dropped)."""
    with open(path, "rb") as f:
        return [line.strip() for line in f.read().splitlines() if line.strip()]


class Signer:
    """Signs grants with the first secret and verifies them with any (rotation). ``path``: the
    secrets come from that file, re-read when it changes (a file that became unreadable or
    invalid keeps the secrets read before, with a warning)."""

    def __init__(self, secret: str | bytes | list[str | bytes], *, path: str = "") -> None:
        self._keys = _keys(secret if isinstance(secret, list) else [secret])
        self._path = path
        self._lock = threading.Lock()
        self._stamp = self._file_stamp() if path else None
        self._next_check = time.monotonic() + _RELOAD_CHECK_SECONDS

    @classmethod
    def from_file(cls, path: str) -> Signer:
        """ValueError (with the reason) when the file cannot be read or holds no valid secret."""
        try:
            secrets = _read_secret_file(path)
        except OSError as exc:
            raise ValueError(f"cannot read {path}: {exc.strerror}") from None
        return cls(secrets, path=path)

    def _file_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self._path)  # follows a Kubernetes Secret's ..data symlink swap
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def _current(self) -> list[bytes]:
        """The secrets, re-read first when the file changed."""
        if not self._path or time.monotonic() < self._next_check:
            return self._keys
        with self._lock:
            self._next_check = time.monotonic() + _RELOAD_CHECK_SECONDS
            stamp = self._file_stamp()
            if stamp is None or stamp == self._stamp:
                return self._keys
            try:
                self._keys = _keys(_read_secret_file(self._path))
                log.info("grant secrets re-read", extra={"secrets": len(self._keys)})
            except (OSError, ValueError) as exc:
                log.warning("grant secret file not re-read, keeping the secrets: %s", exc)
            self._stamp = stamp
            return self._keys

    @staticmethod
    def _mac(key: bytes, payload: bytes) -> bytes:
        return hmac.new(key, payload, hashlib.sha256).digest()

    def sign(self, action: str, subject: str = "", ttl: float = DEFAULT_TTL_SECONDS) -> str:
        if action not in _ACTIONS:
            raise ValueError(f"unknown grant action {action!r}")
        payload = f"{action}|{subject}|{int(time.time() + ttl)}".encode()
        mac = self._mac(self._current()[0], payload)
        return f"{_VERSION}.{_b64(payload)}.{_b64(mac)}"

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
        valid = any(hmac.compare_digest(mac, self._mac(key, payload)) for key in self._current())
        if version != _VERSION or not valid:
            raise _unauthenticated("invalid grant signature")
        try:
            action, subject, expires_text = payload.decode().split("|")
            expires = int(expires_text)
        except ValueError as exc:
            raise _unauthenticated("malformed grant") from exc
        grant = Grant(action, subject, expires)
        if grant.expired(now):
            raise expired_error()
        return grant

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

    def __init__(self, secret: str | Signer | None) -> None:
        self._signer = Signer(secret) if isinstance(secret, str) and secret else None
        if isinstance(secret, Signer):
            self._signer = secret
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


# --- flags ------------------------------------------------------------------------------------


def add_secret_file_option(parser: argparse.ArgumentParser) -> None:
    """``--grant-secret-file`` (with ``--grant-secret`` beside it, on the gateway, blobsvc and the
    collector)."""
    add_option(
        parser,
        "--grant-secret-file",
        default="",
        help="file of grant secrets, one per line (a Kubernetes Secret): the first signs, every "
        "line verifies, so two are accepted at once while rotating; re-read when it changes. "
        "Takes the place of --grant-secret",
    )


def signer_from_args(args: argparse.Namespace) -> Signer | None:
    """The Signer of ``--grant-secret-file`` or ``--grant-secret`` (None: neither);
    ValueError naming the flag and the reason when the secret is not usable."""
    path = getattr(args, "grant_secret_file", "")
    secret = getattr(args, "grant_secret", "")
    flag = "--grant-secret-file" if path else "--grant-secret"
    try:
        if path:
            return Signer.from_file(path)
        return Signer(secret) if secret else None
    except ValueError as exc:
        raise ValueError(f"{flag}: {exc}") from None

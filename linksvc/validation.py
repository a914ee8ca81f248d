"""Validation of linksvc's arguments, before any SQL runs.

Digests and repository names use the shared grammar (``linkedblob.digests``,
``linkedblob.names``); what is particular to linksvc is here: page sizes and page tokens,
upload-session ids, sizes and media types.
"""

from __future__ import annotations

from datetime import timedelta

from linkedblob import paging
from linkedblob.digests import Digest
from linkedblob.errors import Reason, invalid_argument
from linkedblob.names import is_upload_id, validate_media_type, validate_repository


def digest(text: str) -> str:
    """The digest in canonical form, or DIGEST_INVALID."""
    return str(Digest.parse(text))


def repository(name: str, field: str = "repository") -> str:
    return validate_repository(name, field)


def size(value: int, field: str = "size") -> int:
    if value < 0:
        raise invalid_argument(Reason.SIZE_INVALID, f"{field} must be >= 0, got {value}")
    return value


def blob_size(digest_text: str, value: int) -> int:
    """A blob's size; the empty blob's digest can only have size 0."""
    size(value)
    if value != 0 and Digest.parse(digest_text).is_empty:
        raise invalid_argument(Reason.SIZE_INVALID, f"{digest_text} is the empty blob: size 0")
    return value


def media_type(text: str) -> str:
    """A media type, or empty (no media type)."""
    return validate_media_type(text)


def session_id(text: str) -> str:
    if not text:
        raise invalid_argument(Reason.BLOB_UPLOAD_INVALID, "upload session id is required")
    if not is_upload_id(text):
        raise invalid_argument(
            Reason.BLOB_UPLOAD_INVALID, f"malformed upload session id {text[:140]!r}"
        )
    return text


def page_size(value: int, field: str = "page_size") -> int:
    return paging.page_size(value, field)


# Page tokens (linkedblob.paging): the scope ties a ListLinks token to its repository, the kind
# keeps the two lists' tokens apart.
LINKS_TOKEN = "links"
REPOSITORIES_TOKEN = "repositories"
BLOBS_TOKEN = "blobs"
COLLECTABLE_TOKEN = "collectable"
# ListLinkingRepositories: scoped by the digest, its key a repository name.
LINKING_TOKEN = "linking"
# ListSessions: scoped by the repository, its key a session id.
SESSIONS_TOKEN = "sessions"


def encode_page_token(kind: str, scope: str, after: str) -> str:
    return paging.encode_page_token(kind, scope, after)


def decode_page_token(token: str, kind: str, scope: str) -> str:
    """The key to list after ("" for the first page), or PAGINATION_INVALID."""
    by_name = kind in (REPOSITORIES_TOKEN, LINKING_TOKEN)
    parse_key = (
        session_id if kind == SESSIONS_TOKEN else validate_repository if by_name else Digest.parse
    )
    return paging.decode_page_token(token, kind, scope, parse_key)


# --- leases and garbage collection ------------------------------------------------------------
# (No ErrorInfo reason names a bad number in general: the lease's ttl is BLOB_UPLOAD_INVALID, as
# the upload is what it protects; the collector's arguments are UNSUPPORTED values.)

DEFAULT_LEASE_TTL_SECONDS = 600
MAX_LEASE_TTL_SECONDS = 86400
MAX_RUNNER_LOCK_TTL_SECONDS = 3600
MAX_LOCK_NAME_LENGTH = 255
# Clamps ages so that a cutoff stays a representable date; nothing is that old anyway.
MAX_AGE_SECONDS = 1000 * 365 * 24 * 3600


def lease_id(text: str) -> str:
    if not is_upload_id(text):  # the same alphabet and length as a session id
        raise invalid_argument(Reason.BLOB_UPLOAD_INVALID, f"malformed lease id {text[:140]!r}")
    return text


def lease_ttl(seconds: int) -> timedelta:
    """0: the default (600 s); else 1-86400 seconds."""
    if seconds == 0:
        return timedelta(seconds=DEFAULT_LEASE_TTL_SECONDS)
    if not 0 < seconds <= MAX_LEASE_TTL_SECONDS:
        raise invalid_argument(
            Reason.BLOB_UPLOAD_INVALID,
            f"ttl_seconds must be 1-{MAX_LEASE_TTL_SECONDS} (0: default), got {seconds}",
        )
    return timedelta(seconds=seconds)


def age(seconds: int, field: str) -> timedelta:
    if seconds < 0:
        raise invalid_argument(Reason.UNSUPPORTED, f"{field} must be >= 0, got {seconds}")
    return timedelta(seconds=min(seconds, MAX_AGE_SECONDS))


def version(value: int) -> int:
    if value < 0:
        raise invalid_argument(Reason.UNSUPPORTED, f"version must be >= 0, got {value}")
    return value


def lock_name(text: str, field: str) -> str:
    if not text or len(text) > MAX_LOCK_NAME_LENGTH or not text.isprintable():
        raise invalid_argument(
            Reason.NAME_INVALID,
            f"{field} must be 1-{MAX_LOCK_NAME_LENGTH} printable characters, got {text[:140]!r}",
        )
    return text


def runner_lock_ttl(seconds: int) -> timedelta:
    if not 0 < seconds <= MAX_RUNNER_LOCK_TTL_SECONDS:
        raise invalid_argument(
            Reason.UNSUPPORTED,
            f"ttl_seconds must be 1-{MAX_RUNNER_LOCK_TTL_SECONDS}, got {seconds}",
        )
    return timedelta(seconds=seconds)

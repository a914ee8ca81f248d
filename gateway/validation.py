"""Validation of the gateway's requests, before anything reaches a backend.

Each function returns the validated value (parsed where that helps) or raises a
LinkedBlobError with the reason of DESIGN.md's error table.
"""

from __future__ import annotations

import re

from linkedblob.config import MAX_CHUNK_BYTES
from linkedblob.digests import Digest
from linkedblob.errors import Reason, invalid_argument, not_found, resource_exhausted
from linkedblob.names import validate_repository

# Upload ids are linksvc session ids (URL-safe random text); blobsvc takes 1-128 characters of
# [A-Za-z0-9_-] as its staging key, so nothing else can name an upload.
_UPLOAD_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,128}")

# RFC 6838 type/subtype, as the OCI image spec restricts media types; parameters are not allowed.
_MEDIA_TYPE_RE = re.compile(
    r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}"
)

MAX_PAGE_SIZE = 1000
MAX_PAGE_TOKEN_LENGTH = 1024


def repository(name: str, field: str = "repository") -> str:
    return validate_repository(name, field)


def digest(text: str) -> Digest:
    return Digest.parse(text)


def optional_digest(text: str) -> Digest | None:
    """An optional digest: empty means none was given."""
    return Digest.parse(text) if text else None


def upload_id(text: str) -> str:
    if not text:
        raise invalid_argument(Reason.BLOB_UPLOAD_INVALID, "upload_id is required")
    if _UPLOAD_ID_RE.fullmatch(text) is None:
        # No upload can have such an id: it is simply unknown.
        raise not_found(Reason.BLOB_UPLOAD_UNKNOWN, f"unknown upload {text[:64]!r}")
    return text


def media_type(text: str) -> str:
    """An optional media type (empty: none), ``type/subtype`` as the OCI image spec has it."""
    if text and _MEDIA_TYPE_RE.fullmatch(text) is None:
        raise invalid_argument(
            Reason.NAME_INVALID, f"malformed media type {text[:100]!r} (want type/subtype)"
        )
    return text


def data_size(size: int, what: str = "data") -> None:
    """A data message must fit the application limit (the transport allows a little more, so
    that the caller gets this reason instead of a bare transport error)."""
    if size > MAX_CHUNK_BYTES:
        raise resource_exhausted(
            Reason.SIZE_INVALID,
            f"{what} message of {size} bytes exceeds the limit of {MAX_CHUNK_BYTES} bytes",
            limit=MAX_CHUNK_BYTES,
        )


def read_range(offset: int, length: int) -> None:
    if offset < 0:
        raise invalid_argument(Reason.RANGE_INVALID, f"offset must be >= 0, got {offset}")
    if length < 0:
        raise invalid_argument(Reason.RANGE_INVALID, f"length must be >= 0, got {length}")


def write_offset(offset: int) -> None:
    if offset < 0:
        raise invalid_argument(Reason.BLOB_UPLOAD_INVALID, f"offset must be >= 0, got {offset}")


def expected_size(size: int | None) -> int | None:
    """An optional expected blob size: unset or -1 means unchecked."""
    if size is None or size == -1:
        return None
    if size < 0:
        raise invalid_argument(Reason.SIZE_INVALID, f"size must be >= 0 or -1, got {size}")
    return size


def page(page_size: int, page_token: str) -> None:
    if not 0 <= page_size <= MAX_PAGE_SIZE:
        raise invalid_argument(
            Reason.PAGINATION_INVALID, f"page_size must be 0-{MAX_PAGE_SIZE}, got {page_size}"
        )
    if len(page_token) > MAX_PAGE_TOKEN_LENGTH:
        raise invalid_argument(Reason.PAGINATION_INVALID, "page_token is too long")

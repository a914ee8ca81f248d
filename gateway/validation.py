"""Validation of the gateway's requests, before anything reaches a backend.

Each function returns the validated value (parsed where that helps) or raises a
LinkedBlobError with the reason of the error table in docs/design.md.
"""

from __future__ import annotations

from linkedblob import paging
from linkedblob.config import MAX_CHUNK_BYTES
from linkedblob.digests import Digest
from linkedblob.errors import Reason, invalid_argument, not_found, resource_exhausted
from linkedblob.names import is_upload_id, validate_media_type, validate_repository


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
    if not is_upload_id(text):
        # No upload can have such an id: it is simply unknown.
        raise not_found(Reason.BLOB_UPLOAD_UNKNOWN, f"unknown upload {text[:64]!r}")
    return text


def media_type(text: str) -> str:
    """An optional media type (empty: none), ``type/subtype`` as the OCI image spec has it."""
    return validate_media_type(text)


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
    """Checks a page request before it is relayed (linksvc decodes the token)."""
    paging.page_size(page_size)
    paging.check_page_token(page_token)

"""Validation of linksvc's arguments, before any SQL runs.

Digests and repository names use the shared grammar (``linkedblob.digests``,
``linkedblob.names``); what is particular to linksvc is here: page sizes and page tokens,
upload-session ids, sizes and media types.
"""

from __future__ import annotations

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


def encode_page_token(kind: str, scope: str, after: str) -> str:
    return paging.encode_page_token(kind, scope, after)


def decode_page_token(token: str, kind: str, scope: str) -> str:
    """The key to list after ("" for the first page), or PAGINATION_INVALID."""
    parse_key = Digest.parse if kind == LINKS_TOKEN else validate_repository
    return paging.decode_page_token(token, kind, scope, parse_key)

"""Validation of linksvc's arguments, before any SQL runs.

Digests and repository names use the shared grammar (``linkedblob.digests``,
``linkedblob.names``); what is particular to linksvc is here: page sizes and page tokens,
upload-session ids, sizes and media types.
"""

from __future__ import annotations

import base64
import binascii
import re

from linkedblob.digests import Digest
from linkedblob.errors import LinkedBlobError, Reason, invalid_argument
from linkedblob.names import validate_repository
from linksvc.models import MEDIA_TYPE_LENGTH

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000

# blobsvc names its staging area after the session id, so the grammar is the same there.
_SESSION_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,128}")

# RFC 6838 type/subtype (application/vnd.oci.image.layer.v1.tar+gzip), as the OCI image spec
# restricts media types; no parameters. The gateway checks the same grammar.
_MEDIA_TYPE_RE = re.compile(
    r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}"
)

_MAX_TOKEN_CHARS = 1024
_TOKEN_RE = re.compile(r"[A-Za-z0-9_-]+")


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
    if not text:
        return ""
    # There is no OCI error code for a media type; NAME_INVALID, as the gateway answers too.
    if len(text) > MEDIA_TYPE_LENGTH or _MEDIA_TYPE_RE.fullmatch(text) is None:
        raise invalid_argument(
            Reason.NAME_INVALID, f"malformed media type {text[:100]!r} (want type/subtype)"
        )
    return text


def session_id(text: str) -> str:
    if not text:
        raise invalid_argument(Reason.BLOB_UPLOAD_INVALID, "upload session id is required")
    if _SESSION_ID_RE.fullmatch(text) is None:
        raise invalid_argument(
            Reason.BLOB_UPLOAD_INVALID, f"malformed upload session id {text[:140]!r}"
        )
    return text


def page_size(value: int, field: str = "page_size") -> int:
    if value == 0:
        return DEFAULT_PAGE_SIZE
    if value < 0 or value > MAX_PAGE_SIZE:
        raise invalid_argument(
            Reason.PAGINATION_INVALID,
            f"{field} must be 1-{MAX_PAGE_SIZE} (0: default), got {value}",
        )
    return value


# --- page tokens --------------------------------------------------------------------------
#
# A token is opaque to callers: base64url("<kind>\n<scope>\n<last key>"). The scope ties a
# ListLinks token to its repository, the kind keeps the two lists' tokens apart, and the key is
# re-validated on the way in, so a forged token can only ever be a well-formed cursor.


def encode_page_token(kind: str, scope: str, after: str) -> str:
    raw = f"{kind}\n{scope}\n{after}".encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def decode_page_token(token: str, kind: str, scope: str) -> str:
    """The key to list after ("" for the first page), or PAGINATION_INVALID."""
    if not token:
        return ""
    bad = invalid_argument(Reason.PAGINATION_INVALID, "malformed or foreign page_token")
    if len(token) > _MAX_TOKEN_CHARS or _TOKEN_RE.fullmatch(token) is None:
        raise bad
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    except (binascii.Error, ValueError):
        raise bad from None
    parts = raw.split("\n")
    if len(parts) != 3 or parts[0] != kind or parts[1] != scope:
        raise bad
    after = parts[2]
    try:
        if kind == LINKS_TOKEN:
            Digest.parse(after)
        else:
            validate_repository(after)
    except LinkedBlobError:
        raise bad from None
    return after


LINKS_TOKEN = "links"
REPOSITORIES_TOKEN = "repositories"

"""The grammars of the names callers pass in: repository names, upload ids and media types.

Each service validates at its edge with these, before anything touches storage or SQL; the
error a malformed value gets is the caller's to choose where it differs (an upload id that
cannot exist is NOT_FOUND at the gateway, INVALID_ARGUMENT at the internal services).
"""

from __future__ import annotations

import re

from linkedblob.errors import Reason, invalid_argument

MAX_NAME_LENGTH = 255

_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_NAME_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")

# Upload ids are linksvc session ids (URL-safe random text) or the gateway's own ``push-*``
# ids; blobsvc names staging areas after them, so this grammar also keeps them inside its root.
MAX_UPLOAD_ID_LENGTH = 128
_UPLOAD_ID_RE = re.compile(rf"[A-Za-z0-9_-]{{1,{MAX_UPLOAD_ID_LENGTH}}}")

# RFC 6838 type/subtype (application/vnd.oci.image.layer.v1.tar+gzip), as the OCI image spec
# restricts media types; no parameters. The length is linksvc's column width.
MAX_MEDIA_TYPE_LENGTH = 255
_MEDIA_TYPE_RE = re.compile(
    r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}"
)


def validate_repository(name: str, field: str = "repository") -> str:
    """Returns the name unchanged, or raises NAME_INVALID."""
    if not name:
        raise invalid_argument(Reason.NAME_INVALID, f"{field} is required")
    if len(name) > MAX_NAME_LENGTH:
        raise invalid_argument(
            Reason.NAME_INVALID,
            f"{field} is {len(name)} characters long; the limit is {MAX_NAME_LENGTH}",
        )
    if _NAME_RE.fullmatch(name) is None:
        raise invalid_argument(Reason.NAME_INVALID, f"malformed {field} {name[:100]!r}")
    return name


def is_upload_id(text: str) -> bool:
    """True when ``text`` can name an upload: 1-128 characters of [A-Za-z0-9_-]."""
    return _UPLOAD_ID_RE.fullmatch(text) is not None


def validate_media_type(text: str) -> str:
    """An optional media type (empty: none), ``type/subtype``; NAME_INVALID otherwise (there is
    no OCI error code for a media type)."""
    if text and (len(text) > MAX_MEDIA_TYPE_LENGTH or _MEDIA_TYPE_RE.fullmatch(text) is None):
        raise invalid_argument(
            Reason.NAME_INVALID, f"malformed media type {text[:100]!r} (want type/subtype)"
        )
    return text

"""Paged lists: the page-size limits and the page-token codec every service shares.

A page token is opaque to callers: base64url("<kind>\\n<scope>\\n<last key>"). The kind keeps
the tokens of different lists apart, the scope ties a token to what it lists (a repository's
links), and the key is re-parsed on the way in, so a forged token can only ever be a
well-formed cursor.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable

from linkedblob.errors import LinkedBlobError, Reason, invalid_argument

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
MAX_PAGE_TOKEN_LENGTH = 1024

_TOKEN_RE = re.compile(r"[A-Za-z0-9_-]+")


def page_size(value: int, field: str = "page_size") -> int:
    """The page size to use, as Google's AIP-158 has it: 0 means the default; 1-MAX_PAGE_SIZE
    as given; above MAX_PAGE_SIZE, MAX_PAGE_SIZE (clamped, not refused: a caller asking for
    more gets full pages and a token for the rest); negative is PAGINATION_INVALID."""
    if value == 0:
        return DEFAULT_PAGE_SIZE
    if value < 0:
        raise invalid_argument(
            Reason.PAGINATION_INVALID,
            f"{field} must not be negative (0: default {DEFAULT_PAGE_SIZE}), got {value}",
        )
    return min(value, MAX_PAGE_SIZE)


def check_page_token(token: str) -> str:
    """A cheap shape check for a relay that passes the token on: PAGINATION_INVALID when it
    cannot be a token of ours."""
    if token and (len(token) > MAX_PAGE_TOKEN_LENGTH or _TOKEN_RE.fullmatch(token) is None):
        raise invalid_argument(Reason.PAGINATION_INVALID, "malformed page_token")
    return token


def encode_page_token(kind: str, scope: str, after: str) -> str:
    raw = f"{kind}\n{scope}\n{after}".encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def decode_page_token(token: str, kind: str, scope: str, parse_key: Callable[[str], object]) -> str:
    """The key to list after ("" for the first page), or PAGINATION_INVALID.

    ``parse_key`` validates the key (raising LinkedBlobError or ValueError when malformed).
    """
    if not token:
        return ""
    bad = invalid_argument(Reason.PAGINATION_INVALID, "malformed or foreign page_token")
    if len(token) > MAX_PAGE_TOKEN_LENGTH or _TOKEN_RE.fullmatch(token) is None:
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
        parse_key(after)
    except (LinkedBlobError, ValueError):
        raise bad from None
    return after

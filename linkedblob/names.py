"""Repository names in the OCI distribution grammar, at most 255 characters."""

from __future__ import annotations

import re

from linkedblob.errors import Reason, invalid_argument

MAX_NAME_LENGTH = 255

_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_NAME_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")


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

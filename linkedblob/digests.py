"""Content digests in the OCI grammar: ``<algorithm>:<lowercase hex>``, sha256 and sha512 only.

Everything that takes a digest from outside parses it here first, so a malformed one is refused
at the edge (INVALID_ARGUMENT / DIGEST_INVALID) before it reaches storage or SQL.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Protocol

from linkedblob.errors import Reason, invalid_argument

# hex length of each supported algorithm's digest
ALGORITHMS: dict[str, int] = {"sha256": 64, "sha512": 128}
DEFAULT_ALGORITHM = "sha256"

_DIGEST_RE = re.compile(r"([a-z0-9]+(?:[.+_-][a-z0-9]+)*):([a-f0-9]+)")


class Hasher(Protocol):
    def update(self, data: bytes | memoryview, /) -> None: ...
    def hexdigest(self) -> str: ...


@dataclass(frozen=True, slots=True)
class Digest:
    algorithm: str
    hex: str

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"

    @classmethod
    def parse(cls, text: str) -> Digest:
        """Parses and validates a digest; raises DIGEST_INVALID for anything else."""
        if not text:
            raise invalid_argument(Reason.DIGEST_INVALID, "digest is required")
        m = _DIGEST_RE.fullmatch(text)
        if m is None:
            raise invalid_argument(Reason.DIGEST_INVALID, f"malformed digest {text[:200]!r}")
        algorithm, hexpart = m.group(1), m.group(2)
        want = ALGORITHMS.get(algorithm)
        if want is None:
            raise invalid_argument(
                Reason.DIGEST_INVALID,
                f"unsupported digest algorithm {algorithm[:100]!r} (supported: sha256, sha512)",
            )
        if len(hexpart) != want:
            raise invalid_argument(
                Reason.DIGEST_INVALID,
                f"{algorithm} digest must have {want} hex characters, got {len(hexpart)}",
            )
        return cls(algorithm, hexpart)

    @classmethod
    def of(cls, data: bytes | memoryview, algorithm: str = DEFAULT_ALGORITHM) -> Digest:
        h = new_hasher(algorithm)
        h.update(data)
        return cls(algorithm, h.hexdigest())

    @property
    def is_empty(self) -> bool:
        """Whether this is the digest of zero bytes."""
        return self == EMPTY[self.algorithm]


def parse_algorithm(name: str) -> str:
    """Validates an algorithm name; empty means the default."""
    if not name:
        return DEFAULT_ALGORITHM
    if name not in ALGORITHMS:
        raise invalid_argument(
            Reason.DIGEST_INVALID,
            f"unsupported digest algorithm {name[:100]!r} (supported: sha256, sha512)",
        )
    return name


def new_hasher(algorithm: str) -> Hasher:
    return hashlib.new(algorithm)


EMPTY: dict[str, Digest] = {a: Digest(a, hashlib.new(a).hexdigest()) for a in ALGORITHMS}

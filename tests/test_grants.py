"""Unit tests: signed grants (pure logic)."""

from __future__ import annotations

import time

import grpc
import pytest

from linkedblob.errors import LinkedBlobError
from linkedblob.grants import INTERNAL, READ, WRITE, Signer

DIGEST = "sha256:" + "a" * 64


def test_grant_round_trip_and_scope() -> None:
    signer = Signer("s" * 32)
    token = signer.sign(READ, DIGEST)
    grant = signer.check(token, READ, DIGEST)
    assert (grant.action, grant.subject) == (READ, DIGEST)
    with pytest.raises(LinkedBlobError) as exc:
        signer.check(token, READ, "sha256:" + "b" * 64)
    assert exc.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert exc.value.reason == "DENIED"
    with pytest.raises(LinkedBlobError):
        signer.check(token, WRITE, DIGEST)
    internal = signer.sign(INTERNAL)
    assert signer.check(internal, WRITE, "any-upload").action == INTERNAL


@pytest.mark.parametrize(
    "mangle",
    [
        lambda t: "",
        lambda t: "garbage",
        lambda t: t[:-2] + ("AA" if t[-2:] != "AA" else "BB"),  # bad mac
        lambda t: t.replace("v1.", "v2.", 1),
        lambda t: Signer("other-secret-000000").sign(READ, DIGEST),  # another key
    ],
)
def test_forged_or_malformed_grants_are_unauthenticated(mangle) -> None:  # type: ignore[no-untyped-def]
    signer = Signer("s" * 32)
    with pytest.raises(LinkedBlobError) as exc:
        signer.check(mangle(signer.sign(READ, DIGEST)), READ, DIGEST)
    assert exc.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert exc.value.reason == "UNAUTHORIZED"


def test_expired_grant_is_refused() -> None:
    signer = Signer("s" * 32)
    token = signer.sign(WRITE, "up-1", ttl=10)
    assert signer.verify(token, now=time.time())
    with pytest.raises(LinkedBlobError) as exc:
        signer.verify(token, now=time.time() + 11)
    assert exc.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_short_secret_is_refused() -> None:
    with pytest.raises(ValueError):
        Signer("short")

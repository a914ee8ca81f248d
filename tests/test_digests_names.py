"""Unit tests: the digest and repository-name grammars (pure logic)."""

from __future__ import annotations

import hashlib

import grpc
import pytest

from linkedblob.digests import EMPTY, Digest, parse_algorithm
from linkedblob.errors import LinkedBlobError, Reason
from linkedblob.names import validate_repository

SHA256_ABC = "sha256:" + hashlib.sha256(b"abc").hexdigest()
SHA512_ABC = "sha512:" + hashlib.sha512(b"abc").hexdigest()


@pytest.mark.parametrize("text", [SHA256_ABC, SHA512_ABC])
def test_valid_digests_round_trip(text: str) -> None:
    assert str(Digest.parse(text)) == text


@pytest.mark.parametrize(
    "text",
    [
        "",
        "sha256",
        "sha256:",
        ":" + "a" * 64,
        "sha256:" + "a" * 63,
        "sha256:" + "a" * 65,
        "sha256:" + "A" * 64,  # uppercase hex is not canonical
        "sha256:" + "g" * 64,
        "sha512:" + "a" * 64,  # sha512 needs 128
        "SHA256:" + "a" * 64,
        "md5:" + "a" * 32,  # unsupported algorithm
        "sha384:" + "a" * 96,  # well-formed in OCI, not supported here
        "sha256:" + "a" * 64 + "\n",
        " sha256:" + "a" * 64,
        "sha256:../../" + "a" * 58,
    ],
)
def test_malformed_digests_are_digest_invalid(text: str) -> None:
    with pytest.raises(LinkedBlobError) as exc:
        Digest.parse(text)
    assert exc.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert exc.value.reason == Reason.DIGEST_INVALID


def test_digest_of_and_empty() -> None:
    assert str(Digest.of(b"abc")) == SHA256_ABC
    assert str(Digest.of(b"abc", "sha512")) == SHA512_ABC
    assert EMPTY["sha256"].hex == hashlib.sha256(b"").hexdigest()
    assert Digest.of(b"", "sha512").is_empty
    assert not Digest.parse(SHA256_ABC).is_empty


def test_parse_algorithm() -> None:
    assert parse_algorithm("") == "sha256"
    assert parse_algorithm("sha512") == "sha512"
    with pytest.raises(LinkedBlobError):
        parse_algorithm("md5")


@pytest.mark.parametrize(
    "name",
    [
        "a",
        "library/ubuntu",
        "a0/b-c/d.e/f_g/h__i/j---k",
        "x" * 255,
        "/".join(["ab"] * 85),  # 254 characters
    ],
)
def test_valid_repository_names(name: str) -> None:
    assert validate_repository(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "A",
        "Library/ubuntu",
        "a/",
        "/a",
        "a//b",
        "a_-b",
        "a___b",
        "-a",
        "a-",
        "a..b",
        "a b",
        "../etc",
        "a/../b",
        "x" * 256,
        "ü",
    ],
)
def test_malformed_repository_names_are_name_invalid(name: str) -> None:
    with pytest.raises(LinkedBlobError) as exc:
        validate_repository(name)
    assert exc.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert exc.value.reason == Reason.NAME_INVALID

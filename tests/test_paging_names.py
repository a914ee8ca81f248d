"""The shared grammars and the page-token codec (linkedblob.names, linkedblob.paging)."""

from __future__ import annotations

import pytest

from linkedblob import paging
from linkedblob.digests import Digest
from linkedblob.errors import LinkedBlobError, Reason
from linkedblob.names import (
    MAX_MEDIA_TYPE_LENGTH,
    is_upload_id,
    validate_media_type,
    validate_repository,
)


def test_page_tokens_round_trip_and_refuse_garbage() -> None:
    d = str(Digest.of(b"x"))
    token = paging.encode_page_token("blobs", "", d)
    assert paging.decode_page_token(token, "blobs", "", Digest.parse) == d
    assert paging.decode_page_token("", "blobs", "", Digest.parse) == ""
    bad_tokens = [
        "!!!",
        "a" * (paging.MAX_PAGE_TOKEN_LENGTH + 1),
        paging.encode_page_token("blobs", "", "sha256:short"),
        paging.encode_page_token("blobs", "", "hello"),
        paging.encode_page_token("links", "", d),  # another list's token
        paging.encode_page_token("blobs", "other", d),  # another scope's token
    ]
    for bad in bad_tokens:
        with pytest.raises(LinkedBlobError) as excinfo:
            paging.decode_page_token(bad, "blobs", "", Digest.parse)
        assert excinfo.value.reason == Reason.PAGINATION_INVALID


def test_page_size_defaults_and_limits() -> None:
    assert paging.page_size(0) == paging.DEFAULT_PAGE_SIZE
    assert paging.page_size(paging.MAX_PAGE_SIZE) == paging.MAX_PAGE_SIZE
    # AIP-158: above the maximum is clamped to it, negative is refused.
    assert paging.page_size(paging.MAX_PAGE_SIZE + 1) == paging.MAX_PAGE_SIZE
    assert paging.page_size(2**31 - 1) == paging.MAX_PAGE_SIZE
    for bad in (-1, -(2**31)):
        with pytest.raises(LinkedBlobError) as excinfo:
            paging.page_size(bad)
        assert excinfo.value.reason == Reason.PAGINATION_INVALID
    assert paging.check_page_token("") == ""
    with pytest.raises(LinkedBlobError):
        paging.check_page_token("not a token")


def test_upload_ids() -> None:
    assert is_upload_id("push-AbC_09")
    assert is_upload_id("a" * 128)
    for bad in ("", "a" * 129, "../x", "a/b", "a.b", "ä"):
        assert not is_upload_id(bad)


def test_media_types() -> None:
    assert validate_media_type("") == ""
    assert validate_media_type("application/vnd.oci.image.layer.v1.tar+gzip")
    too_long = "a/" + "b" * (MAX_MEDIA_TYPE_LENGTH - 1)
    for bad in ("text", "text/plain; charset=utf-8", "/x", too_long):
        with pytest.raises(LinkedBlobError) as excinfo:
            validate_media_type(bad)
        assert excinfo.value.reason == Reason.NAME_INVALID


def test_repository_names() -> None:
    assert validate_repository("a/b-c") == "a/b-c"
    with pytest.raises(LinkedBlobError):
        validate_repository("A")

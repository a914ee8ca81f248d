"""The real grpcurl binary against a running gateway: reflection lists the Registry, and calls
answer in JSON (with the ErrorInfo of a failure)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.stack import Stack, running_stack

GRPCURL = Path(sys.executable).parent / "grpcurl"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack("sqlite", tmp_path_factory.mktemp("grpcurl")) as s:
        yield s


def grpcurl(stack: Stack, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Runs ``grpcurl -plaintext [OPTIONS...] GATEWAY VERB``; ``args`` ends with the verb."""
    *options, verb = args
    return subprocess.run(
        [str(GRPCURL), "-plaintext", *options, stack.address, verb],
        capture_output=True,
        text=True,
        timeout=30,
        check=check,
    )


def test_list_shows_the_registry(stack: Stack) -> None:
    services = grpcurl(stack, "list").stdout.split()
    assert "linkedblob.v1.Registry" in services
    assert "grpc.health.v1.Health" in services


def test_put_and_stat_blob_in_json(stack: Stack) -> None:
    # "aGVsbG8=" is "hello" (bytes are base64 in JSON).
    digest = "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
    put = grpcurl(
        stack,
        "-d",
        '{"repository": "grpcurl/demo", "data": "aGVsbG8=", "media_type": "text/plain"}',
        "linkedblob.v1.Registry/PutBlob",
    )
    assert json.loads(put.stdout)["digest"] == digest
    stat = grpcurl(
        stack,
        "-d",
        json.dumps({"repository": "grpcurl/demo", "digest": digest}),
        "linkedblob.v1.Registry/StatBlob",
    )
    assert json.loads(stat.stdout) == {"digest": digest, "size": "5", "media_type": "text/plain"}


def test_errors_show_their_reason(stack: Stack) -> None:
    digest = "sha256:" + "0" * 64
    out = grpcurl(
        stack,
        "-d",
        json.dumps({"repository": "grpcurl/demo", "digest": digest}),
        "linkedblob.v1.Registry/StatBlob",
        check=False,
    )
    assert out.returncode != 0
    assert "NotFound" in out.stderr
    assert '"reason":"BLOB_UNKNOWN"' in out.stderr


def test_locate_then_read_from_blobsvc_with_the_grant(stack: Stack) -> None:
    """The README's direct read: LocateBlob through the gateway, then blobsvc Read with the
    grant in the linkedblob-grant header."""
    digest = "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
    grpcurl(
        stack,
        "-d",
        '{"repository": "grpcurl/direct", "data": "aGVsbG8="}',
        "linkedblob.v1.Registry/PutBlob",
    )
    located = json.loads(
        grpcurl(
            stack,
            "-d",
            json.dumps({"repository": "grpcurl/direct", "digest": digest}),
            "linkedblob.v1.Registry/LocateBlob",
        ).stdout
    )
    assert located["blob"] == {"digest": digest, "size": "5"}
    direct = located["direct"]
    assert direct["address"] == stack.blob.address and direct["expires_at"]
    read = subprocess.run(
        [
            str(GRPCURL),
            "-plaintext",
            "-H",
            f"linkedblob-grant: {direct['grant']}",
            "-d",
            json.dumps({"digest": digest}),
            direct["address"],
            "linkedblob.blob.v1.BlobService/Read",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert json.loads(read.stdout) == {"data": "aGVsbG8="}
    # Without the grant blobsvc refuses.
    refused = subprocess.run(
        [
            str(GRPCURL),
            "-plaintext",
            "-d",
            json.dumps({"digest": digest}),
            direct["address"],
            "linkedblob.blob.v1.BlobService/Read",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert refused.returncode != 0
    assert '"reason":"UNAUTHORIZED"' in refused.stderr


def test_a_direct_upload_with_grpcurl(stack: Stack) -> None:
    """The README's direct upload: StartUpload with direct, blobsvc Write with the grant,
    CommitUpload through the gateway."""
    digest = "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
    upload = json.loads(
        grpcurl(
            stack,
            "-d",
            '{"repository": "grpcurl/direct-up", "direct": true}',
            "linkedblob.v1.Registry/StartUpload",
        ).stdout
    )
    direct = upload["direct"]
    written = subprocess.run(
        [
            str(GRPCURL),
            "-plaintext",
            "-H",
            f"linkedblob-grant: {direct['grant']}",
            "-d",
            json.dumps({"upload_id": upload["id"], "data": "aGVs"}) + ' {"data": "bG8="}',
            direct["address"],
            "linkedblob.blob.v1.BlobService/Write",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert json.loads(written.stdout) == {"size": "5"}
    committed = grpcurl(
        stack,
        "-d",
        json.dumps(
            {"repository": "grpcurl/direct-up", "upload_id": upload["id"], "digest": digest}
        ),
        "linkedblob.v1.Registry/CommitUpload",
    )
    assert json.loads(committed.stdout) == {"digest": digest, "size": "5"}

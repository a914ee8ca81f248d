"""The real grpcurl binary against a running gateway: reflection lists the Registry, and calls
answer in JSON (with the ErrorInfo of a failure)."""

from __future__ import annotations

import json
import os
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


ROOT = Path(__file__).resolve().parent.parent
README_BLOCK_TITLE = "The gateway (`linkedblob.v1.Registry`), every RPC:"


def readme_gateway_block() -> str:
    """README's grpcurl block of every Registry RPC, as written."""
    text = (ROOT / "README.md").read_text()
    after = text[text.index(README_BLOCK_TITLE) :]
    start = after.index("```sh\n") + len("```sh\n")
    return after[start : after.index("```", start)]


def test_the_readme_grpcurl_block_runs_as_written(stack: Stack) -> None:
    """Every command of README's gateway block, in one bash with -e: each must succeed (the
    gateway address is this stack's; the stack allows deletes, as the block's last line
    says it needs). Every Registry RPC has its grpcurl line in README."""
    block = readme_gateway_block()
    assert "G=127.0.0.1:50051\n" in block
    readme = (ROOT / "README.md").read_text()  # LocateBlob is in "Direct access" (tested above)
    for method in registry_methods():
        assert f"linkedblob.v1.Registry/{method}" in readme, method
    script = block.replace("G=127.0.0.1:50051\n", f"G={stack.address}\n", 1)
    env = {**os.environ, "PATH": f"{GRPCURL.parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert '"repositories"' in done.stdout and '"uploads"' in done.stdout


def registry_methods() -> list[str]:
    from linkedblob.v1 import registry_pb2

    return [m.name for m in registry_pb2.DESCRIPTOR.services_by_name["Registry"].methods]

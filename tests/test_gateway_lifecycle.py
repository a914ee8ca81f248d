"""CancelUpload while blobsvc is down (issue 10), through a real gateway: the session is
cancelled in linksvc first, the staged bytes are left to the collector's purge (a staging area
with no active session), the cancel answers OK, and a retried cancel answers OK too.

Before, such a cancel answered UNAVAILABLE, then NOT_FOUND on retry, and the staged bytes stayed
on disk for good. The database plays no part here (SQLite)."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from linkedblob.v1 import registry_pb2 as pb
from tests.stack import Stack, registry, rpc_error, running_stack

Code = grpc.StatusCode


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    with running_stack("sqlite", tmp_path, direct=False) as s:
        yield s


def test_a_cancel_while_blobsvc_is_down_answers_ok_and_again_ok(stack: Stack) -> None:
    rpc, repo = registry(stack.address), f"cancel/{secrets.token_hex(4)}"
    upload_id = rpc.StartUpload(pb.StartUploadRequest(repository=repo)).id
    data = os.urandom(10_000)
    rpc.WriteUpload(iter([pb.WriteUploadRequest(repository=repo, upload_id=upload_id, data=data)]))
    stack.blob.stop()
    cancel = pb.CancelUploadRequest(repository=repo, upload_id=upload_id)
    rpc.CancelUpload(cancel)
    rpc.CancelUpload(cancel)  # retried: still OK
    # The session is cancelled: the upload is gone for every other use.
    with rpc_error(Code.NOT_FOUND, "BLOB_UPLOAD_UNKNOWN"):
        rpc.GetUpload(pb.GetUploadRequest(repository=repo, upload_id=upload_id))
    with rpc_error(Code.NOT_FOUND, "BLOB_UPLOAD_UNKNOWN"):
        rpc.CancelUpload(pb.CancelUploadRequest(repository="other/repo", upload_id=upload_id))
    # The staged bytes are still on disk, for the purge (no active session knows them).
    assert [p for p in (stack.data / "blobs").rglob(f"*{upload_id}*")]

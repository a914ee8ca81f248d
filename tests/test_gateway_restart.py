"""A resumable upload survives a restart of the whole system: stop blobsvc, linksvc and the
gateway in the middle of an upload, start them again on the same data directory and database,
resume from GetUpload's offset, commit; the content is intact."""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from linkedblob.config import MiB
from linkedblob.v1 import registry_pb2 as pb
from tests.stack import DB_KINDS, Stack, database, registry


@pytest.mark.parametrize("db_kind", DB_KINDS)
def test_an_upload_resumes_after_all_services_restart(db_kind: str, tmp_path: Path) -> None:
    data = os.urandom(3 * MiB + 11)
    digest = f"sha256:{hashlib.sha256(data).hexdigest()}"
    repo = f"restart/{secrets.token_hex(4)}"

    def messages(upload_id: str, offset: int, end: int) -> Iterator[pb.WriteUploadRequest]:
        yield pb.WriteUploadRequest(repository=repo, upload_id=upload_id, offset=offset)
        for pos in range(offset, end, MiB):
            yield pb.WriteUploadRequest(data=data[pos : min(pos + MiB, end)])

    with database(db_kind, tmp_path) as db_url:
        stack = Stack.start(tmp_path, db_url)
        try:
            rpc = registry(stack.address)
            upload = rpc.StartUpload(pb.StartUploadRequest(repository=repo))
            written = rpc.WriteUpload(messages(upload.id, 0, 2 * MiB))
            assert written.offset == 2 * MiB
        finally:
            stack.stop()

        stack = Stack.start(tmp_path, db_url)  # same data directory, same database
        try:
            rpc = registry(stack.address)
            resumed = rpc.GetUpload(pb.GetUploadRequest(repository=repo, upload_id=upload.id))
            assert resumed.offset == 2 * MiB
            assert resumed.started_at == upload.started_at
            rpc.WriteUpload(messages(upload.id, resumed.offset, len(data)))
            desc = rpc.CommitUpload(
                pb.CommitUploadRequest(repository=repo, upload_id=upload.id, digest=digest)
            )
            assert desc == pb.Descriptor(digest=digest, size=len(data))
            got = b"".join(
                m.data for m in rpc.ReadBlob(pb.ReadBlobRequest(repository=repo, digest=digest))
            )
            assert got == data
        finally:
            stack.stop()

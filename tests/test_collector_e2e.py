"""The collector end to end: real blobsvc, linksvc and gateway processes (tests/stack.py), and
`linkedblob gc` / `linkedblob fsck` run as a user runs them, against linksvc and blobsvc (with
blobsvc's grant secret in the environment).

Blobs are pushed with linkedblob.client, or stored as the gateway commits them (Lease, blobsvc
Put, Link with the lease) by `store` below, and unlinked through the gateway (started with
deletes enabled).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from linkedblob.blob.v1 import blob_pb2, blob_pb2_grpc
from linkedblob.client import Client, ClientError
from linkedblob.link.v1 import link_pb2, link_pb2_grpc
from tests.services import spawn
from tests.stack import DB_KINDS, GRANT_SECRET_ENV, Stack, running_stack


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    with running_stack("sqlite", tmp_path) as s:
        yield s


def links(stack: Stack) -> link_pb2_grpc.LinkServiceStub:
    return link_pb2_grpc.LinkServiceStub(stack.link.channel())  # type: ignore[no-untyped-call]


def blobs(stack: Stack) -> blob_pb2_grpc.BlobServiceStub:
    return blob_pb2_grpc.BlobServiceStub(stack.blob.channel())  # type: ignore[no-untyped-call]


def digest_of(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def store(stack: Stack, repository: str, data: bytes) -> str:
    """Commits bytes and links them the way the gateway does: a lease first, then the bytes,
    then the link that consumes the lease."""
    digest = digest_of(data)
    lease = links(stack).Lease(
        link_pb2.LeaseRequest(digest=digest, link_repository=repository, size=len(data))
    )
    if lease.HasField("linked"):
        return digest
    blobs(stack).Put(blob_pb2.PutRequest(data=data, digest=digest), metadata=stack.blob_metadata())
    links(stack).Link(
        link_pb2.LinkRequest(
            repository=repository, digest=digest, size=len(data), lease_id=lease.lease_id
        )
    )
    return digest


def orphan(stack: Stack, data: bytes) -> str:
    """Bytes in blobsvc that linksvc does not know (a crash between commit and link)."""
    blobs(stack).Put(blob_pb2.PutRequest(data=data), metadata=stack.blob_metadata())
    return digest_of(data)


def blob_file(stack: Stack, digest: str) -> Path:
    algorithm, hex_digest = digest.split(":")
    return stack.data / "blobs" / "blobs" / algorithm / hex_digest[:2] / hex_digest


def staging_ids(stack: Stack) -> set[str]:
    listed = blobs(stack).ListUploads(
        blob_pb2.ListUploadsRequest(page_size=1000), metadata=stack.blob_metadata()
    )
    return {u.upload_id for u in listed.uploads}


def run(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    """`linkedblob ARGS` against the stack's linksvc and blobsvc."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "linkedblob.cli",
            *args,
            "--link-addr",
            stack.link.address,
            "--blob-addr",
            stack.blob.address,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, GRANT_SECRET_ENV: stack.grant_secret},
    )


def gc(stack: Stack, *args: str) -> dict[str, object]:
    done = run(stack, "gc", "--json", *args)
    assert done.returncode == 0, done.stdout + done.stderr
    stats: dict[str, object] = json.loads(done.stdout)
    assert stats["outcome"] == "ok", stats
    return stats


def fsck(stack: Stack, *args: str) -> tuple[int, dict[str, object]]:
    done = run(stack, "fsck", "--json", *args)
    assert done.returncode in (0, 1), done.stdout + done.stderr
    return done.returncode, json.loads(done.stdout)


def kinds(report: dict[str, object]) -> set[tuple[str, str]]:
    findings = report["findings"]
    assert isinstance(findings, list)
    return {(f["kind"], f["subject"]) for f in findings}


@pytest.mark.parametrize("kind", DB_KINDS)
def test_gc_reclaims_unlinked_bytes_and_keeps_a_blob_linked_elsewhere(
    kind: str, tmp_path: Path
) -> None:
    with running_stack(kind, tmp_path) as stack:
        repo, other = f"gc/{secrets.token_hex(3)}", f"gc/{secrets.token_hex(3)}"
        # Pushed through the gateway: a streamed push (over a message) and a small one.
        gone_data, shared_data = os.urandom(3 * 1024 * 1024 + 5), os.urandom(200_000)
        with Client(stack.address) as client:
            gone = client.push(repo, gone_data).digest
            shared = client.push(repo, shared_data).digest
            assert client.mount(other, shared, from_repository=repo).digest == shared
            client.delete(repo, gone)
            client.delete(repo, shared)
        assert blob_file(stack, gone).exists() and blob_file(stack, shared).exists()

        # A dry run and a run with the default (long) grace change nothing on disk.
        dry = run(stack, "gc", "--dry-run", "--grace", "0")
        assert dry.returncode == 0 and "dry run" in dry.stdout
        assert gc(stack)["marked"] == 1
        assert blob_file(stack, gone).exists()

        stats = gc(stack, "--grace", "0")
        assert (stats["reclaimed_blobs"], stats["reclaimed_bytes"]) == (1, len(gone_data))
        assert not blob_file(stack, gone).exists()
        assert blob_file(stack, shared).exists()
        with Client(stack.address) as client:
            assert client.get(other, shared) == shared_data
            with pytest.raises(ClientError):
                client.stat(repo, gone)
        with pytest.raises(grpc.RpcError) as info:
            links(stack).StatBlob(link_pb2.StatBlobRequest(digest=gone))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
        assert fsck(stack)[0] == 0


def test_fsck_is_clean_then_reports_a_file_deleted_behind_blobsvcs_back(stack: Stack) -> None:
    repo = f"fsck/{secrets.token_hex(3)}"
    kept = store(stack, repo, os.urandom(1000))
    with Client(stack.address) as client:
        lost = client.push(repo, os.urandom(2000)).digest
    code, report = fsck(stack)
    assert code == 0 and report["clean"] is True
    table = run(stack, "fsck")
    assert table.returncode == 0 and table.stdout.rstrip().endswith(": clean")

    blob_file(stack, lost).unlink()
    code, report = fsck(stack)
    assert code == 1 and report["clean"] is False
    assert kinds(report) == {("missing_bytes", lost), ("dangling_link", lost)}
    assert kept not in {f["subject"] for f in report["findings"]}  # type: ignore[union-attr]
    table = run(stack, "fsck")
    assert table.returncode == 1 and "missing_bytes" in table.stdout and lost in table.stdout
    # --repair never deletes a linked blob, nor invents its bytes: the damage stays reported.
    assert fsck(stack, "--repair")[0] == 1
    assert blob_file(stack, kept).exists()


def test_fsck_repair_adopts_an_orphan_and_gc_reclaims_it(stack: Stack) -> None:
    linked = store(stack, f"fsck/{secrets.token_hex(3)}", os.urandom(1000))
    stray = orphan(stack, os.urandom(5000))
    code, report = fsck(stack)
    assert code == 1 and kinds(report) == {("orphan", stray)}

    code, report = fsck(stack, "--repair")
    assert code == 1
    (finding,) = report["findings"]  # type: ignore[misc]
    assert finding["repair"].startswith("adopted")
    assert fsck(stack)[0] == 0  # indexed now (marked), with its bytes: consistent

    stats = gc(stack, "--grace", "0")
    assert stats["reclaimed_blobs"] == 1 and stats["reclaimed_bytes"] == 5000
    assert not blob_file(stack, stray).exists()
    assert blob_file(stack, linked).exists()
    assert fsck(stack)[0] == 0


def test_abandoned_uploads_are_purged_after_the_expiry(stack: Stack) -> None:
    repo = f"up/{secrets.token_hex(3)}"
    with Client(stack.address, timeout=10) as client:
        relayed = client.start_upload(repo)
        client.append(relayed, 0, [os.urandom(10_000)])
        direct = client.start_upload(repo, direct=True)
        assert direct.direct is not None
        client.append(direct, 0, [os.urandom(10_000)])
        never_written = client.start_upload(repo)
        cancelled = client.start_upload(repo)
        client.append(cancelled, 0, [os.urandom(10_000)])

        # A cancel while blobsvc is down: the session is cancelled, the bytes stay behind.
        port = stack.blob.port
        stack.blob.stop()
        try:
            client.cancel_upload(repo, cancelled.id)
        except ClientError as exc:
            assert exc.code == grpc.StatusCode.UNAVAILABLE
        stack.blob = spawn(
            "blob",
            "--data",
            str(stack.data / "blobs"),
            "--port",
            str(port),
            "--log-level",
            "WARNING",
            env={GRANT_SECRET_ENV: stack.grant_secret},
        )
    # A crashed gateway's push: a staging area no session names.
    blobs(stack).Write(
        iter([blob_pb2.WriteRequest(upload_id="push-crashed", offset=0, data=b"x" * 5000)]),
        metadata=stack.blob_metadata(),
    )
    sessions = {relayed.id, direct.id, never_written.id, cancelled.id}
    assert staging_ids(stack) == {relayed.id, direct.id, cancelled.id, "push-crashed"}

    # Within the expiry nothing goes.
    stats = gc(stack, "--upload-expiry", "1h")
    assert stats["sessions_purged"] == stats["staging_aborted"] == 0
    time.sleep(1.5)
    stats = gc(stack, "--upload-expiry", "1")
    assert stats["sessions_purged"] == 4, stats
    assert stats["staging_aborted"] == 4, stats
    assert staging_ids(stack) == set()
    assert list((stack.data / "blobs" / "uploads").iterdir()) == []
    for session in sessions:
        with pytest.raises(grpc.RpcError) as info:
            links(stack).GetSession(link_pb2.GetSessionRequest(id=session))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
    assert fsck(stack)[0] == 0


def test_a_runner_skips_while_another_holds_the_lock_and_wait_waits(stack: Stack) -> None:
    lock = links(stack).AcquireRunnerLock(
        link_pb2.AcquireRunnerLockRequest(name="gc", holder="elsewhere:1", ttl_seconds=60)
    )
    assert lock.acquired
    skipped = run(stack, "gc")
    assert skipped.returncode == 0
    assert "skipped: the runner lock is held by elsewhere:1" in skipped.stdout

    waiting = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "linkedblob.cli",
            "gc",
            "--wait",
            "--json",
            "--link-addr",
            stack.link.address,
            "--blob-addr",
            stack.blob.address,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, GRANT_SECRET_ENV: stack.grant_secret},
    )
    try:
        # Until it says it waits (it found the lock held), then it is still running.
        said: list[str] = []
        assert waiting.stderr is not None
        for line in waiting.stderr:
            said.append(line)
            if "waiting for" in line:
                break
        assert waiting.poll() is None, "".join(said)  # still waiting for the lock
        links(stack).ReleaseRunnerLock(
            link_pb2.ReleaseRunnerLockRequest(name="gc", holder="elsewhere:1")
        )
        out, err = waiting.communicate(timeout=60)
        err = "".join(said) + err
    finally:
        if waiting.poll() is None:
            waiting.kill()
            waiting.wait()
    assert waiting.returncode == 0, err
    assert json.loads(out)["outcome"] == "ok"
    assert "waiting for elsewhere:1" in err
